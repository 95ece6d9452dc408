"""One command for a machine with a CUDA GPU: the `gpu` test group (tests/test_gpu.py) and the training
throughput (benchmarks/train_throughput.py) in eager mode, with --amp and with --compile, as one table.
Everything runs within --budget (470 s): a part that would end later is stopped and shown as timed out.

    python benchmarks/gpu_check.py --out results/gpu_check.md

Without a CUDA device it says so and exits with status 0, having run nothing.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

MODES = {"eager": [], "amp": ["--amp"], "compile": ["--compile"]}


def get_args_parser():
    p = argparse.ArgumentParser(description="Run the gpu tests and the GPU throughput benchmark; print one table.")
    p.add_argument("--dataset", default="mnist", help="config the benchmark times (train_throughput.py --datasets)")
    p.add_argument("--data-root", default=None, help="real training data for the benchmark (else random images)")
    p.add_argument("--out", default=None, help="also write the table (Markdown) here")
    p.add_argument("--tests-timeout", type=float, default=300, help="seconds allowed for the gpu tests")
    p.add_argument("--benchmark-timeout", type=float, default=150, help="seconds allowed for each benchmark mode")
    p.add_argument("--budget", type=float, default=470,
                   help="seconds for everything: a part that would end later is cut short, so the check ends in 8 minutes")
    return p


def run_tests(timeout):
    """The `gpu` tests, one row each: (name, outcome, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "gpu.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}",
               os.path.join(REPO, "tests", "test_gpu.py")]
        try:
            p = subprocess.run(cmd, cwd=REPO, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return [("gpu tests", f"timed out after {timeout:.0f} s", None)]
        rows = test_rows(xml) if os.path.exists(xml) else []
        if p.returncode not in (0, 1) or not rows:  # 1: some test failed, which its row says
            last = (p.stdout + p.stderr).strip().splitlines() or ["no output"]
            rows.append(("gpu tests", f"pytest exit status {p.returncode}, {len(rows)} tests reported: {last[-1]}", None))
        return rows


def test_rows(junit_xml):
    """(name, outcome, seconds) of every test case in a pytest JUnit XML report."""
    rows = []
    for case in ET.parse(junit_xml).iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                if tag == "skipped":
                    outcome += f" ({found.get('message', '').removeprefix('Skipped: ')})"
                break
        rows.append((case.get("name"), outcome, float(case.get("time", 0))))
    return rows


def benchmark_command(mode, dataset, data_root, json_path):
    """train_throughput.py's command line for one mode on the GPU."""
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "train_throughput.py"), "--datasets", dataset,
           "--device", "cuda", "--json", json_path, *MODES[mode]]
    return cmd + (["--data-root", data_root] if data_root else [])


def run_benchmark(mode, dataset, data_root, timeout):
    """The benchmark's result row for one mode, or {"error": why}."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        try:
            p = subprocess.run(benchmark_command(mode, dataset, data_root, path), cwd=REPO, timeout=timeout,
                               capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if p.returncode != 0 or not os.path.exists(path):
            return {"error": (p.stderr.strip().splitlines() or ["exit status %d" % p.returncode])[-1]}
        with open(path) as f:
            return json.load(f)["results"][0]


# What the table shows of a benchmark row, where the row has it.
BENCH_FIELDS = [("it_per_s", "{:.1f} it/s"), ("images_per_s", "{:.0f} img/s"), ("epoch_minutes", "{:.2f} min/epoch"),
                ("peak_gpu_mib", "GPU {:.0f} MiB"), ("ops_per_it", "{:.0f} ops/it"), ("syncs_per_it", "{:.1f} syncs/it")]


def table(device_name, tests, benchmarks):
    """One Markdown table: every gpu test, then the benchmark in each mode."""
    lines = [f"GPU check on {device_name}, torch {torch.__version__}", "",
             "| check | result | detail |", "|---|---|---|"]
    for name, outcome, seconds in tests:
        lines.append(f"| test {name} | {outcome} | {'' if seconds is None else f'{seconds:.1f} s'} |")
    for mode, row in benchmarks.items():
        if "error" in row:
            lines.append(f"| benchmark {mode} | FAILED | {row['error']} |")
            continue
        shown = [fmt.format(row[k]) for k, fmt in BENCH_FIELDS if k in row]
        lines.append(f"| benchmark {row.get('dataset', '')} {mode} | {shown[0]} | {', '.join(shown[1:])} |")
    return "\n".join(lines)


def failed(tests, benchmarks):
    return any(o.startswith(("FAILED", "ERROR", "timed out", "pytest")) for _, o, _ in tests) or \
        any("error" in r for r in benchmarks.values())


def main(args):
    if not torch.cuda.is_available():
        print("no CUDA device on this machine: nothing checked (the gpu tests and the GPU benchmark need one)")
        return 0
    start = time.perf_counter()

    def allowed(limit):  # a part's own limit, or what is left of the budget
        return max(1.0, min(limit, args.budget - (time.perf_counter() - start)))

    tests = run_tests(allowed(args.tests_timeout))
    benchmarks = {mode: run_benchmark(mode, args.dataset, args.data_root, allowed(args.benchmark_timeout))
                  for mode in MODES}
    text = table(torch.cuda.get_device_name(), tests, benchmarks)
    text += f"\n\n{time.perf_counter() - start:.0f} s in all; command: python benchmarks/gpu_check.py"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if failed(tests, benchmarks) else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
