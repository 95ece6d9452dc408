"""One rank of the two-process full-disk test in test_disk_full.py, launched there by torchrun on the CPU.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_disk_worker.py OUT DATA

Rank 0's checkpoint writes fail (part of the file, then ENOSPC) in two runs: OUT/a, whose periodic
checkpoint of step 4 fails mid-run and which both ranks then resume to step 6 from the checkpoint the
error line names; and OUT/c, whose only checkpoint, at its last step, fails. Each rank saves
OUT/rank{R}.json with the exit status and stderr of the two failed runs.
"""
import contextlib
import io
import json
import os
import re
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
import utils  # noqa: E402
from test_disk_full import fail_torch_save  # noqa: E402


class Patch:
    """The little of pytest's monkeypatch that fail_torch_save needs."""

    def __init__(self):
        self.undo_list = []

    def setattr(self, obj, name, value):
        self.undo_list.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def undo(self):
        for obj, name, value in reversed(self.undo_list):
            setattr(obj, name, value)
        self.undo_list = []


def failed_run(argv, match):
    """train.py's command line with rank 0's `match` checkpoint failing: {code, err}."""
    patch = Patch()
    fail_torch_save(patch, match)
    sys.argv = ["train.py", "--device", "cpu", "--batch-size", "8", "--no-progress", *argv]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            utils.run_cli(train.main, train.get_args_parser())
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        patch.undo()
    return {"code": code, "err": err.getvalue()}


def main(out, data):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    common = ["--data-root", data, "--sample-every", "100"]
    result = {"mid_run": failed_run([*common, "--run-dir", os.path.join(out, "a"), "--max-steps", "6",
                                      "--checkpoint-every", "2"], "step_0000004.pt")}
    path = re.search(r"--resume (\S+)$", result["mid_run"]["err"].strip()).group(1)
    assert train.main(train.get_args_parser().parse_args(["--resume", path, "--no-progress"])) == 0
    result["at_end"] = failed_run([*common, "--run-dir", os.path.join(out, "c"), "--max-steps", "2"], "last.pt")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:3])
