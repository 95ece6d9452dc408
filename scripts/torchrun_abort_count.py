"""Run a tiny two-rank torchrun job (CPU, gloo, synthetic MNIST) many times and count the runs that
did not exit cleanly: a non-zero exit status, or a rank that aborted at teardown ("terminate called
...", which torchrun reports as a failed rank although training had finished).

    nice -n 10 python scripts/torchrun_abort_count.py --runs 30 --out results/torchrun_aborts.json

--job train runs `train.py` itself (the library's own setup and teardown); --job ddp_worker and
--job ddp_disk_worker run the two-rank workers of tests/test_distributed.py and tests/test_disk_full.py.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

import torch  # noqa: E402

from conftest import make_fake_mnist  # noqa: E402  (the tests' tiny MNIST in the real IDX format)

JOBS = ("train", "ddp_worker", "ddp_disk_worker")


def get_args_parser():
    p = argparse.ArgumentParser(description="Count aborts and failed exits of a two-rank torchrun job.")
    p.add_argument("--runs", type=int, default=30, help="how many times to run the job")
    p.add_argument("--job", default="train", choices=JOBS, help="what each rank runs")
    p.add_argument("--steps", type=int, default=4, help="training iterations of --job train")
    p.add_argument("--timeout", type=float, default=300, help="seconds before one run counts as hung")
    p.add_argument("--out", default=None, help="write the counts and every run's outcome here as JSON")
    return p


def job_command(job, data, out, steps):
    if job == "train":
        return [os.path.join(REPO, "train.py"), "--dataset", "mnist", "--data-root", data, "--run-dir",
                os.path.join(out, "run"), "--device", "cpu", "--batch-size", "8", "--max-steps", str(steps),
                "--sample-every", "100", "--no-progress"]
    return [os.path.join(REPO, "tests", f"{job}.py"), out, data]


def run_once(job, data, work, steps, timeout):
    """One torchrun of the job: {exit status, aborted, seconds, the stderr lines that say why}."""
    out = tempfile.mkdtemp(dir=work)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *job_command(job, data, out, steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1", DISENTANGLE_NO_DOWNLOAD="1")
    start = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        code, err = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired:
        code, err = "timeout", ""
    aborted = "terminate called" in err
    out = {"code": code, "aborted": aborted, "seconds": round(time.perf_counter() - start, 1)}
    if aborted or code != 0:  # the end of the output: faulthandler's Python stack of an aborted rank
        out["output_tail"] = err.splitlines()[-60:]
    return out


def main(args):
    with tempfile.TemporaryDirectory() as work:
        data = make_fake_mnist(os.path.join(work, "data"))
        runs = []
        for i in range(args.runs):
            r = run_once(args.job, data, work, args.steps, args.timeout)
            runs.append(r)
            print(f"run {i + 1}/{args.runs}: exit {r['code']}{' ABORT' if r['aborted'] else ''} ({r['seconds']} s)",
                  flush=True)
    result = {"job": args.job, "runs": len(runs), "aborts": sum(r["aborted"] for r in runs),
              "nonzero_exits": sum(r["code"] != 0 for r in runs), "torch": torch.__version__,
              "outcomes": runs}
    print(f"{result['aborts']} aborts and {result['nonzero_exits']} non-zero exits in {result['runs']} runs")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if result["nonzero_exits"] else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
