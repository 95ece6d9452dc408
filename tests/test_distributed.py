"""Data-parallel training: two CPU processes under torchrun (gloo) against each other and against
one process with the two ranks' batches side by side; one backward per network per update."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, make_fake_mnist
from data_loader import ImageSet, PairSampler, load_dataset
from distributed import World, rank_seed
from networks import Encoder, InstanceNorm, get_config
from utils import CheckpointError, build_models, load_checkpoint, seed_everything

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ddp_worker  # noqa: E402  (its constants: steps, batch, seed, forced accuracies)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Launch tests/ddp_worker.py on 2 CPU processes once; every test below reads its results."""
    root = tmp_path_factory.mktemp("ddp")
    data, out = make_fake_mnist(root / "data"), root / "out"
    out.mkdir()
    env = dict(os.environ, DISENTANGLE_NO_DOWNLOAD="1", OMP_NUM_THREADS="1")
    # --standalone: a private rendezvous on a free local port, so parallel test runs never collide
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "tests", "ddp_worker.py"), str(out), data],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return data, out, ranks


def assert_same(a, b, what):
    """Bit for bit, through nested dicts and lists of tensors."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            assert_same(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), what
    else:
        assert a == b, what


@pytest.mark.parametrize("phase", ["run", "forced"])
def test_ranks_hold_bit_identical_weights_and_optimiser_states(two_ranks, phase):
    _, _, (r0, r1) = two_ranks
    assert not torch.equal(r0[phase]["nets"]["encoder"]["convs.0.weight"],
                           get_fresh_encoder_weight())  # the weights did move
    assert_same(r0[phase]["nets"], r1[phase]["nets"], "nets")
    assert_same(r0[phase]["opts"], r1[phase]["opts"], "optimisers")  # so the ranks stay identical


def get_fresh_encoder_weight():
    seed_everything(ddp_worker.SEED)
    return Encoder(get_config("mnist")).state_dict()["convs.0.weight"]


def test_gate_decision_is_the_same_on_every_rank(two_ranks):
    _, _, (r0, r1) = two_ranks
    for phase in ("run", "forced"):
        assert [m["disc_stepped"] for m in r0[phase]["metrics"]] == [m["disc_stepped"] for m in r1[phase]["metrics"]]
        assert [m["disc_acc"] for m in r0[phase]["metrics"]] == [m["disc_acc"] for m in r1[phase]["metrics"]]
    # Forced phase: each rank alone would have decided the opposite of the other rank at every
    # step; both took the decision of the averaged accuracy, alternately open and closed.
    own = {r: [a < 0.8 for a in ddp_worker.FORCED_ACC[r]] for r in (0, 1)}
    assert all(a != b for a, b in zip(own[0], own[1]))
    mean = [(a + b) / 2 for a, b in zip(ddp_worker.FORCED_ACC[0], ddp_worker.FORCED_ACC[1])]
    assert [m["disc_acc"] for m in r0["forced"]["metrics"]] == pytest.approx(mean)
    assert [m["disc_stepped"] for m in r0["forced"]["metrics"]] == [1, 0, 1, 0]


class SideBySideSampler:
    """Rank 0's and rank 1's pair samplers drawn side by side: a batch of 2B is rank 0's B, then rank 1's B."""

    def __init__(self, samplers):
        self.samplers = samplers

    def anchors(self, n):
        return torch.cat([s.anchors(n // len(self.samplers)) for s in self.samplers])

    def pairs(self, n):
        firsts, seconds = zip(*(s.pairs(n // len(self.samplers)) for s in self.samplers))
        return torch.cat(firsts), torch.cat(seconds)

    def draw(self, kinds, n):
        per_rank = [s.draw(kinds, n // len(self.samplers)).split(n // len(self.samplers)) for s in self.samplers]
        return torch.cat([piece for batch in zip(*per_rank) for piece in batch])


def test_two_ranks_of_batch_b_match_one_process_of_batch_2b(two_ranks):
    data, _, (r0, _) = two_ranks
    B, seed = ddp_worker.BATCH, ddp_worker.SEED
    args = ddp_worker.run_args(data, "unused", "--batch-size", str(2 * B))
    train_set = load_dataset("mnist", data, "train")
    seed_everything(seed)  # as main() does before building the trainer: the same initial weights
    t = train.Trainer(get_config("mnist"), args, train_set, torch.device("cpu"))
    # Feed it exactly the two ranks' samples and noise, concatenated in rank order.
    t.sampler = SideBySideSampler([PairSampler(train_set.labels, rank_seed(seed, r)) for r in (0, 1)])
    noise = [torch.Generator().manual_seed(rank_seed(seed, r) + 1) for r in (0, 1)]
    t.randn = lambda n: torch.cat([torch.randn(n // 2, t.cfg.style_dim, generator=g) for g in noise])
    metrics = [train.train_iteration(t) for _ in range(ddp_worker.STEPS)]

    ddp = r0["run"]["metrics"]
    assert [m["disc_stepped"] for m in metrics] == [m["disc_stepped"] for m in ddp]
    for k in train.METRICS:  # the logged metrics are the ranks' means = the 2B batch's values
        assert metrics[0][k] == pytest.approx(ddp[0][k], rel=1e-4, abs=1e-6), k  # same weights: rounding only
        # Later steps start from weights that differ by rounding noise amplified by Adam (see below):
        # the small KL term moved by up to 7e-4 relative by step 4 on this machine.
        assert [m[k] for m in metrics[1:]] == pytest.approx([m[k] for m in ddp[1:]], rel=2e-3, abs=1e-6), k
    # Adam divides each gradient by its running RMS, so rounding differences between a 2B batch and two
    # all-reduced B batches (different convolution algorithms, summation orders) become weight
    # differences of a fraction of lr, more in elements whose gradient is near zero. Measured on this
    # project's CPU machine after 4 iterations: mean |difference| at most 0.12 lr per tensor, single
    # elements up to 2.8 lr. The tolerance is on the mean (0.25 lr), while the weights moved by about ten
    # steps and a wrong feed moves most elements by whole steps.
    compared = 0
    for name, net in zip(("encoder", "decoder", "discriminator"), t.nets()):
        cancelled = norm_cancelled_biases(net)
        for k, v in net.state_dict().items():
            if k not in cancelled:
                mean_diff = (v - r0["run"]["nets"][name][k]).abs().mean().item()
                assert mean_diff < 0.25 * args.lr, f"{name}.{k}: mean |difference| {mean_diff / args.lr:.2f} lr"
                compared += 1
    assert compared == 30 - 8  # all but the 3 + 2 + 3 conv biases that instance norm cancels


def norm_cancelled_biases(net):
    """Biases of the layers followed by InstanceNorm: the norm subtracts each channel's mean, so
    their exact gradient is 0 and what backward leaves is rounding noise, which Adam (dividing by
    its own square root) turns into steps of about lr in arbitrary directions. One process and two
    differ there by construction; these biases do not change any output."""
    out = set()
    for prefix, m in net.named_modules():
        if isinstance(m, torch.nn.Sequential):
            for i in range(len(m) - 1):
                if isinstance(m[i + 1], InstanceNorm) and getattr(m[i], "bias", None) is not None:
                    out.add(f"{prefix}.{i}.bias")
    return out


def test_rank_zero_alone_writes_one_run_directory(two_ranks):
    _, out, _ = two_ranks
    assert sorted(os.listdir(out)) == ["a", "b", "rank0.pt", "rank1.pt"]
    a = out / "a"
    assert sorted(os.listdir(a)) == ["checkpoints", "config.json", "log.txt", "metrics.csv", "samples", "tb"]
    assert len(os.listdir(a / "tb")) == 1
    with open(a / "log.txt") as f:
        log = f.read()
    assert log.count("training mnist") == 1 and "2 processes x batch 8" in log
    with open(a / "config.json") as f:
        config = json.load(f)
    # an epoch is the 256 fake images seen over both ranks: floor(256 / (8 x 2)) iterations
    assert config["world_size"] == 2 and config["steps_per_epoch"] == 16
    with open(a / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, ddp_worker.STEPS + 1))


def test_resume_restores_every_ranks_streams(two_ranks):
    _, out, _ = two_ranks
    a = torch.load(out / "a" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(out / "b" / "checkpoints" / "last.pt", weights_only=True)
    assert a["world_size"] == b["world_size"] == 2 and a["step"] == b["step"] == ddp_worker.STEPS
    # rank 1's stream is its own, not rank 0's
    assert not torch.equal(a["rank_streams"][0]["noise"], a["rank_streams"][1]["noise"])
    for key in ("encoder", "decoder", "discriminator", "opt_ae", "opt_gen", "opt_disc", "rank_streams",
                "sampler", "noise"):
        assert_same(a[key], b[key], key)
    rows = []
    for run in ("a", "b"):
        with open(out / run / "metrics.csv") as f:
            rows.append(list(csv.reader(f)))
    assert rows[0] == rows[1]


def test_a_distributed_checkpoint_loads_for_evaluation_and_refuses_one_process_resume(two_ranks, tmp_path):
    _, out, _ = two_ranks
    path = str(out / "a" / "checkpoints" / "last.pt")
    ckpt = load_checkpoint(path)
    cfg, encoder, decoder = build_models(ckpt)
    mu, _, s = encoder(torch.rand(2, 1, 28, 28))
    assert mu.shape == (2, cfg.style_dim) and decoder(mu, s).shape == (2, 1, 28, 28)
    with pytest.raises(CheckpointError, match="run of 2 process"):
        train.main(train.get_args_parser().parse_args(
            ["--resume", path, "--run-dir", str(tmp_path / "r"), "--max-steps", "5", "--no-progress"]))
    assert not (tmp_path / "r").exists()  # refused before anything was written


# ---------------------------------------------------------------- one backward per network per update
# DDP averages gradients inside backward and allows each wrapped network one forward per backward.
# The reference's several backward calls on one forward (retain_graph=True) would leave the ranks'
# gradients different, silently; this pins the single-backward form in one process.

def test_one_host_sync_per_iteration_under_torchrun(two_ranks):
    """Two gloo ranks under DDP: a default iteration reads the host once (the averaged metrics)."""
    _, _, (r0, r1) = two_ranks
    assert r0["syncs"] == r1["syncs"] == {"tolist": 1.0}


def test_average_sets_its_flags_on_the_device_and_reads_once(monkeypatch):
    """World.average under torchrun: the stop and write-failure flags ride in the all-reduced buffer,
    set there by fills, not by a tensor made from Python data (on a GPU a pageable copy that waits
    for the stream); the one host read is the result's tolist()."""
    from benchmarks import train_throughput as bench
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda buf, op: buf.mul_(2))  # two ranks alike
    world = World(rank=0, size=2)
    world.share_stop({})
    world.share_failure({})
    values = torch.tensor([0.5, 2.0])
    with bench.OpCounter() as c:
        assert world.average(values) == [0.5, 2.0]
    assert c.syncs == {"tolist": 1} and not world.stop_agreed and not world.failure_agreed
    world.share_stop({"signal": 15})
    world.share_failure({"error": "disk full"})
    assert world.average(torch.tensor([0.5])) == [0.5] and world.stop_agreed and world.failure_agreed


def test_each_update_is_one_backward_after_at_most_one_forward_per_network(monkeypatch):
    args = train.get_args_parser().parse_args(["--batch-size", "8", "--disc-gate", "1.0"])  # gate always open
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 28, 28), generator=g, dtype=torch.uint8)
    t = train.Trainer(get_config("mnist"), args, ImageSet(images, torch.arange(64) % 4, 4), torch.device("cpu"))
    events = []
    for name, net in zip(("encoder", "decoder", "discriminator"), t.nets()):
        net.register_forward_hook(lambda m, i, o, name=name: events.append(name) if torch.is_grad_enabled() else None)
    real_backward = torch.autograd.backward

    def backward(*a, **kw):
        assert not kw.get("retain_graph") and not (len(a) > 2 and a[2]), "backward with retain_graph"
        events.append("backward")
        return real_backward(*a, **kw)

    monkeypatch.setattr(torch.autograd, "backward", backward)
    train.train_iteration(t)
    updates = " ".join(events).split("backward")[:-1]
    # reconstruction, 2 generator updates, 1 discriminator update: 4 backward calls
    assert len(updates) == 1 + args.gen_steps + args.disc_steps
    for forwards in updates:
        names = forwards.split()
        assert len(names) == len(set(names)), f"a network ran twice with gradients in one update: {names}"
