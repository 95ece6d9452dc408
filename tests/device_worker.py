"""One rank of the two-process gloo run in test_devices.py, started there with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set (as torchrun would set them, but each rank's exit status and stderr
its own).

    python tests/device_worker.py OUT DATA

It runs train.py's command line into OUT/run for 4 steps with a checkpoint every step, and
  - appends to OUT/loads.txt when each rank starts and finishes loading the training set (rank 0
    takes a second over it), so the test sees whether rank 1 waited for rank 0;
  - fills one encoder weight with NaN on rank 1 only, after iteration 2: rank 0's own weights stay
    finite, so only an agreement between the ranks can stop both before the checkpoint of step 2.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from utils import run_cli  # noqa: E402


def main(out, data):
    rank = int(os.environ["RANK"])
    real_load, real_iteration, steps = train.load_dataset, train.train_iteration, []

    def note(event):
        with open(os.path.join(out, "loads.txt"), "a") as f:
            f.write(f"rank{rank}-{event}\n")

    def slow_load(name, root, split="train", **kw):
        if split != "train":
            return real_load(name, root, split, **kw)
        note("start")
        if rank == 0:
            time.sleep(1.0)  # a download or render takes a while
        s = real_load(name, root, split, **kw)
        if rank == 0:
            note("done")
        return s

    def poisoned_iteration(t):
        m = real_iteration(t)
        steps.append(1)
        if len(steps) == 2 and rank == 1:
            with torch.no_grad():
                next(t.encoder.parameters()).fill_(float("nan"))
        return m

    train.load_dataset, train.train_iteration = slow_load, poisoned_iteration
    sys.argv = ["train.py", "--data-root", data, "--run-dir", os.path.join(out, "run"), "--device", "cpu",
                "--batch-size", "8", "--max-steps", "4", "--checkpoint-every", "1", "--sample-every", "100",
                "--no-progress"]
    return run_cli(train.main, train.get_args_parser())


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
