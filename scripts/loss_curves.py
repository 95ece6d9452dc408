"""The five training curves of a run directory as one PNG.

    python scripts/loss_curves.py runs/mnist --out figs/loss_curves.png

Reads <run_dir>/metrics.csv (one row per iteration, written by train.py). Each panel shows
the raw curve faintly and its moving average on top; the discriminator-accuracy panel marks
the gate above which the discriminator is not updated (reference recipe; the authors' recipe has
none). The KL panel turns logarithmic when the curve spans more than two decades (the authors'
recipe starts near 10^5 nats).
"""
import argparse
import csv
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import numpy as np  # noqa: E402

from utils import HelpFormatter, UserError, atomic_write, run_cli  # noqa: E402

PANELS = [("recon_loss", "reconstruction loss"), ("kl", "KL divergence"), ("gen_loss", "generator loss"),
          ("disc_loss", "discriminator loss"), ("disc_acc", "discriminator accuracy")]


def get_args_parser():
    p = argparse.ArgumentParser(description="Plot the training curves of a run directory.",
                                formatter_class=HelpFormatter)
    p.add_argument("run_dir", help="run directory holding metrics.csv")
    p.add_argument("--out", default=None, help="output PNG (default: <run_dir>/loss_curves.png)")
    p.add_argument("--smooth", type=int, default=None,
                   help="moving-average window in iterations (default: 1%% of the run, at least 1)")
    p.add_argument("--gate", type=float, default=None,
                   help="discriminator gate to mark (default: the run's --disc-gate from config.json, none for "
                        "an authors-recipe run, else 0.8)")
    p.add_argument("--dpi", type=int, default=150)
    return p


def read_metrics(run_dir):
    """The columns of <run_dir>/metrics.csv as float arrays, name -> (N,)."""
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        raise UserError(f"'{path}' does not exist (is '{run_dir}' a run directory of train.py?)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [k for k in ["step"] + [k for k, _ in PANELS] if k not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"'{path}' lacks the column(s) {', '.join(missing)}")
        rows = []
        for r in reader:
            try:
                rows.append({k: float(r[k]) for k in ["step"] + [k for k, _ in PANELS]})
            except (TypeError, ValueError):
                continue  # a half-written last line of a running or killed run
    if not rows:
        raise UserError(f"'{path}' holds no iterations yet")
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def moving_average(y, window):
    """Trailing mean over `window` points (shorter at the start), same length as y."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    n = np.arange(1, len(y) + 1)
    lo = np.maximum(n - window, 0)
    return (c[n] - c[lo]) / (n - lo)


def run_gate(run_dir):
    """The run's discriminator gate; None for the authors' recipe, whose discriminator always steps."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            args = json.load(f)["args"]
        return None if args.get("recipe") == "authors" else float(args["disc_gate"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0.8


def y_scale(y):
    """'log' for a positive curve spanning more than two decades, else 'linear'."""
    return "log" if y.min() > 0 and y.max() > 100 * y.min() else "linear"


def main(args):
    m = read_metrics(args.run_dir)
    n = len(m["step"])
    window = args.smooth if args.smooth is not None else max(1, n // 100)
    if window <= 0:
        raise UserError(f"--smooth must be positive, got {window}")
    gate = args.gate if args.gate is not None else run_gate(args.run_dir)
    out = args.out or os.path.join(args.run_dir, "loss_curves.png")

    import matplotlib  # here: slow to import; the curves are read and checked without it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (key, title) in zip(axes, PANELS):
        ax.plot(m["step"], m[key], color="C0", alpha=0.25, linewidth=0.6, label="raw")
        ax.plot(m["step"], moving_average(m[key], window), color="C0", linewidth=1.5,
                label=f"mean of {window}")
        ax.set_yscale(y_scale(m[key]) if key == "kl" else "linear")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    if gate is not None:
        axes[-1].axhline(gate, color="C3", linestyle="--", linewidth=1, label=f"gate {gate:g}")
    axes[-1].set_ylim(-0.02, 1.02)
    axes[-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_write(out, "the loss curves") as f:
        fig.savefig(f, format=os.path.splitext(out)[1][1:].lower() or "png", dpi=args.dpi)
    plt.close(fig)
    print(f"wrote {out} ({n} iterations, moving average over {window})")
    return out


if __name__ == "__main__":
    run_cli(main, get_args_parser())
