"""One rank of the two-process test in test_distributed.py, launched there by torchrun on the CPU.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUT DATA

Each rank saves OUT/rank{R}.pt with what it ended with, for the test to compare:
  "run":    train.main() for STEPS iterations into OUT/a: the trainer's weights and optimiser
            states, and the metrics of every iteration (the gate decisions among them);
  "forced": a few iterations in which each rank's discriminator reports its own made-up
            accuracy, so that the ranks' own gate decisions differ and only the averaged
            accuracy can make them agree;
  "syncs":  host syncs per iteration, by kind, over two more iterations (benchmarks/train_throughput.py).
Both ranks also train OUT/b for STEPS // 2 iterations and resume it to STEPS, for the resume check.
"""
import faulthandler
import gc
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from benchmarks.train_throughput import count_ops, optimizer_host_tensors  # noqa: E402
from distributed import setup_distributed  # noqa: E402
from utils import seed_everything  # noqa: E402

STEPS, BATCH, SEED = 4, 8, 3
# Per-rank accuracies in the forced phase: the means alternate 0.775 (open) and 0.825 (closed),
# while each rank alone would decide the opposite of the other rank at every step.
FORCED_ACC = {0: [0.70, 0.70, 0.90, 0.90], 1: [0.85, 0.95, 0.65, 0.75]}


def run_args(data, run_dir, *extra):
    return train.get_args_parser().parse_args(
        ["--data-root", data, "--run-dir", run_dir, "--device", "cpu", "--batch-size", str(BATCH),
         "--seed", str(SEED), "--sample-every", "100", "--log-every", "1", "--no-progress", *extra])


def trainer_state(t):
    return {"nets": {n: {k: v.clone() for k, v in net.state_dict().items()}
                     for n, net in zip(("encoder", "decoder", "discriminator"), t.nets())},
            "opts": {n: getattr(t, n).state_dict() for n in ("opt_ae", "opt_gen", "opt_disc")}}


def main(out, data):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    Trainer, made, metrics = train.Trainer, [], []

    class RecordingTrainer(Trainer):  # keeps hold of main()'s trainer for the comparison
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    real_iteration = train.train_iteration

    def recording_iteration(t):
        m = real_iteration(t)
        metrics.append(m)
        return m

    train.Trainer, train.train_iteration = RecordingTrainer, recording_iteration
    result = {}
    assert train.main(run_args(data, os.path.join(out, "a"), "--max-steps", str(STEPS))) == 0
    result["run"] = {**trainer_state(made[-1]), "metrics": list(metrics)}

    # Resume: half the steps, then the rest from the checkpoint, in another run directory.
    b = os.path.join(out, "b")
    assert train.main(run_args(data, b, "--max-steps", str(STEPS // 2))) == 0
    assert train.main(train.get_args_parser().parse_args(
        ["--resume", os.path.join(b, "checkpoints", "last.pt"), "--max-steps", str(STEPS), "--no-progress"])) == 0

    # Forced gate: each rank's discriminator_loss reports its own accuracy.
    real_loss = train.discriminator_loss
    local_acc = iter(FORCED_ACC[rank])

    def forced_loss(t, *xs):
        loss, _ = real_loss(t, *xs)
        return loss, torch.tensor(next(local_acc))

    train.discriminator_loss = forced_loss
    world, device = setup_distributed("cpu")  # joins the group made above
    seed_everything(SEED)
    t = Trainer(train.get_config("mnist"), run_args(data, "unused"), train.load_dataset("mnist", data, "train"),
                device, world)
    forced = [real_iteration(t) for _ in FORCED_ACC[rank]]
    result["forced"] = {**trainer_state(t), "metrics": forced}
    train.discriminator_loss = real_loss
    host = optimizer_host_tensors([getattr(t, name) for name in t.OPTIMIZERS])
    result["syncs"] = count_ops(lambda: real_iteration(t), 2, host)[2]  # host syncs per DDP iteration

    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    # Free every DistributedDataParallel wrapper while the group exists (train.Trainer, patched above,
    # would keep main()'s trainers alive until the interpreter exits: see World.close), and let no rank
    # leave while another still uses the group.
    train.Trainer, train.train_iteration, train.discriminator_loss = Trainer, real_iteration, real_loss
    del made[:], t, world
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    faulthandler.enable()  # a rank that aborts in C++ still shows where Python was
    main(*sys.argv[1:3])
