"""One rank of the two-process full-disk test in test_disk_full.py, launched there by torchrun on the CPU.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_disk_worker.py OUT DATA

Rank 0's checkpoint writes fail (part of the file, then ENOSPC) in two runs: OUT/a, whose periodic
checkpoint of step 4 fails mid-run and which both ranks then resume to step 8 from the checkpoint the
error line names; OUT/c, whose only checkpoint, at its last step, fails; and OUT/file/run, which
cannot be made because OUT/file is a file. Each rank saves
OUT/rank{R}.json with the exit status and stderr of the three failed runs.

FullDisk, refuse_writes and fail_torch_save, the ways to make a write fail, are test_disk_full.py's too.
"""
import contextlib
import errno
import faulthandler
import gc
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


class FullDisk:
    """A file that takes `budget` more bytes, writes part of the next write, then raises ENOSPC."""

    def __init__(self, f, budget):
        self.f, self.budget = f, budget

    def write(self, data):
        if len(data) > self.budget:
            self.f.write(data[:self.budget])
            self.f.flush()
            self.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(data)
        return self.f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):  # flush, fileno, close, name, tell, ...
        return getattr(self.f, name)


def refuse_writes(monkeypatch, module, match, budget=100):
    """Files whose name contains `match`, opened for writing by `module`, fill the disk after `budget` bytes."""
    real_open = open

    def full_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return FullDisk(f, budget) if match in str(path) and any(c in mode for c in "wa") else f

    monkeypatch.setattr(module, "open", full_open, raising=False)


def fail_torch_save(monkeypatch, match, nth=1):
    """The nth torch.save into a file whose name contains `match` writes part of the file and then
    meets a full disk, inside torch.save, as on a real full file system (torch reports it as a
    RuntimeError "unexpected pos" whose context holds the OSError)."""
    real_save, seen = torch.save, []

    def save(obj, f, *a, **kw):
        if match in getattr(f, "name", str(f)):
            seen.append(1)
            if len(seen) == nth:
                return real_save(obj, FullDisk(f, 100_000), *a, **kw)
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(utils.torch, "save", save)


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
    """train.py's command line with rank 0's `match` checkpoint failing: {code, err, iterations run}."""
    patch, iterations = Patch(), []
    fail_torch_save(patch, match)
    real_iteration = train.train_iteration

    def counted(t):
        iterations.append(1)
        return real_iteration(t)

    patch.setattr(train, "train_iteration", counted)
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
    return {"code": code, "err": err.getvalue(), "iterations": len(iterations)}


def main(out, data):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    common = ["--data-root", data, "--sample-every", "100"]
    result = {"mid_run": failed_run([*common, "--run-dir", os.path.join(out, "a"), "--max-steps", "8",
                                      "--checkpoint-every", "2"], "step_0000004.pt")}
    path = re.search(r"--resume (\S+)$", result["mid_run"]["err"].strip()).group(1)
    assert train.main(train.get_args_parser().parse_args(["--resume", path, "--no-progress"])) == 0
    result["at_end"] = failed_run([*common, "--run-dir", os.path.join(out, "c"), "--max-steps", "2"], "last.pt")
    # the run directory cannot be made (a file stands where its parent folder should be)
    if rank == 0:
        open(os.path.join(out, "file"), "w").close()
    dist.barrier()
    result["run_dir"] = failed_run([*common, "--run-dir", os.path.join(out, "file", "run")], "-")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    # Free the failed runs' DistributedDataParallel wrappers (kept alive by their exceptions' traceback
    # cycles) while the group still exists, and let no rank leave before the others are done with it.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    faulthandler.enable()  # a rank that aborts in C++ still shows where Python was
    torch.set_num_threads(1)
    main(*sys.argv[1:3])
