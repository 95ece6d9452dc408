"""A small summary of a training run, read from its run folder, to commit beside its evaluations.

    python scripts/run_summary.py runs/mnist16_seed0 --out results/mnist/seeds/mnist16_seed0_run.json

Run folders (checkpoints, metrics.csv, log.txt) are not committed, so every number a table or README
takes from a run's logs is read from this file instead: the share of iterations whose discriminator
stepped up to each epoch end and checkpoint, the speed and time the log shows, the threads and the
steps at which the run was started and resumed. aggregate_results.py finds the summary of the run that
a classify_latents.py JSON measured as NAME_run.json in the JSON's folder, NAME being the run folder's
name in the JSON's checkpoint path (runs/NAME/checkpoints/step_....pt).
"""
import argparse
import csv
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from utils import HelpFormatter, UserError, atomic_write, run_cli  # noqa: E402

# The training flags a summary repeats from config.json, to tell runs apart at a glance.
FLAGS = ("dataset", "recipe", "seed", "style_dim", "class_dim", "batch_size", "pairs", "disc_fakes", "kl_weight",
         "gen_steps", "disc_steps", "disc_gate", "amp")
START = re.compile(r"^(training|resuming) .* step (\d+) -> (\d+)")
THREADS = re.compile(r"(\d+) CPU threads")
SPEED = re.compile(r"^step (\d+) epoch \d+ \| ([\d.]+) it/s")


def get_args_parser():
    p = argparse.ArgumentParser(description="Summarise a run folder (metrics.csv, log.txt, config.json) "
                                            "as a small JSON file to commit.", formatter_class=HelpFormatter)
    p.add_argument("run_dir", help="the run folder (train.py's --run-dir)")
    p.add_argument("--out", default=None, help="write the summary to this JSON file (e.g. results/.../NAME_run.json)")
    return p


def read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {what} '{path}': {e}") from None


def stepped_flags(path):
    """{step: 1 if the discriminator stepped, else 0} from metrics.csv (a resumed run's rows once each)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise UserError(f"cannot read the metrics '{path}': {e}") from None
    if not rows or "disc_stepped" not in rows[0] or "step" not in rows[0]:
        raise UserError(f"'{path}' has no step and disc_stepped columns (a metrics.csv of train.py)")
    return {int(r["step"]): int(r["disc_stepped"]) for r in rows if r["step"].isdigit()}


def read_log(path):
    """The starts (first step, threads) and the (step, it/s) lines of train.py's log.txt."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UserError(f"cannot read the log '{path}': {e}") from None
    starts, speeds = [], []
    for line in lines:
        m = START.match(line)
        if m:
            threads = THREADS.search(line)  # logged from the commit that added this script on
            starts.append({"step": int(m.group(2)), "threads": int(threads.group(1)) if threads else None})
            speeds.append([])
            continue
        m = SPEED.match(line)
        if m and speeds:
            speeds[-1].append((int(m.group(1)), float(m.group(2))))
    return starts, speeds


def summarize(run_dir):
    config = read_json(os.path.join(run_dir, "config.json"), "the run's config")
    flags = stepped_flags(os.path.join(run_dir, "metrics.csv"))
    starts, speeds = read_log(os.path.join(run_dir, "log.txt"))
    args, per_epoch = config.get("args", {}), config.get("steps_per_epoch")
    last = max(flags, default=0)
    # the share of iterations 1..S whose discriminator stepped, at every epoch end and checkpoint S
    ends = set(range(per_epoch, last + 1, per_epoch)) if per_epoch else set()
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    ends |= {int(m.group(1)) for m in map(re.compile(r"^step_(\d+)\.pt$").match, names) if m}
    stepped, count, total = [], 0, 0
    for s in range(1, last + 1):
        if s in flags:
            count, total = count + flags[s], total + 1
        if s in ends or s == last:
            stepped.append({"step": s, "iterations": total, "disc_stepped": count})
    # time between log lines, summed: what the log shows of the training time (pauses inside it included)
    seconds, timed = 0.0, 0
    for segment, start in zip(speeds, starts):
        prev = start["step"]
        for step, speed in segment:
            if speed > 0:
                seconds += (step - prev) / speed
                timed += step - prev
            prev = step
    return {"run_dir": run_dir, **{k: args.get(k) for k in FLAGS}, "steps_per_epoch": per_epoch,
            "last_step": last, "metrics_rows": len(flags),
            "starts": starts, "resumes": max(len(starts) - 1, 0),
            "logged_seconds": round(seconds, 1), "logged_it_per_s": round(timed / seconds, 3) if seconds else None,
            "disc_stepped": stepped}


def disc_stepped_share(summary, step):
    """% of iterations 1..step whose discriminator stepped, or None where the summary has no entry at step."""
    entry = next((e for e in summary.get("disc_stepped", []) if e["step"] == step), None)
    if entry is None or not entry["iterations"]:
        return None
    return 100.0 * entry["disc_stepped"] / entry["iterations"]


def summary_path(result_path, d):
    """Where the summary of the run a classify_latents.py JSON measured lies: NAME_run.json beside it."""
    ckpt = d.get("checkpoint") or ""
    if os.path.basename(os.path.dirname(ckpt)) != "checkpoints":
        return None  # an exported or imported file: no run folder named
    name = os.path.basename(os.path.dirname(os.path.dirname(ckpt)))
    return os.path.join(os.path.dirname(result_path), f"{name}_run.json")


def disc_stepped(result_path, d):
    """The "D stepped" cell of a classify_latents.py JSON from its run's committed summary, or None."""
    path = summary_path(result_path, d)
    if path is None or not d.get("step") or not os.path.isfile(path):
        return None
    return disc_stepped_share(read_json(path, "the run summary"), d["step"])


def main(args):
    summary = summarize(args.run_dir)
    text = json.dumps(summary, indent=2) + "\n"
    print(text, end="")
    if args.out:
        with atomic_write(args.out, "the run summary", "w") as f:
            f.write(text)
    return summary


if __name__ == "__main__":
    run_cli(main, get_args_parser())
