"""The training curves of one run directory, or of several overlaid, as one PNG.

    python scripts/loss_curves.py runs/mnist --out figs/loss_curves.png
    python scripts/loss_curves.py runs/seed0 runs/gate_off --labels "gate 0.8" "gate off" --out figs/gate.png

Reads <run_dir>/metrics.csv (one row per iteration, written by train.py). Each panel shows
the moving average of a curve (one run: the raw curve faintly beneath it); the discriminator-accuracy
panel marks the gate above which the discriminator is not updated (reference recipe; the authors'
recipe has none), and the last panel the share of iterations so far whose discriminator stepped. The
KL panel turns logarithmic when a curve spans more than two decades (the authors' recipe starts near
10^5 nats).
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
STEPPED = ("disc_stepped", "share of iterations\nwhose discriminator stepped")  # older runs lack the column


def get_args_parser():
    p = argparse.ArgumentParser(description="Plot the training curves of one run directory, or of several overlaid.",
                                formatter_class=HelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="run_dir", help="run directory holding metrics.csv")
    p.add_argument("--labels", nargs="+", default=None,
                   help="one legend label per run directory (default: the directories' names)")
    p.add_argument("--out", default=None,
                   help="output PNG (default: <run_dir>/loss_curves.png; required for several runs)")
    p.add_argument("--smooth", type=int, default=None,
                   help="moving-average window in iterations (default: 1%% of the run, at least 1)")
    p.add_argument("--gate", type=float, default=None,
                   help="discriminator gate to mark (default: the run's --disc-gate from config.json, none for "
                        "an authors-recipe run, else 0.8)")
    p.add_argument("--max-step", type=int, default=None,
                   help="plot iterations up to this one only (e.g. the first 20 epochs of a 50-epoch run)")
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
        keys = ["step"] + [k for k, _ in PANELS] + [STEPPED[0]] * (STEPPED[0] in reader.fieldnames)
        rows = []
        for r in reader:
            try:
                rows.append({k: float(r[k]) for k in keys})
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


def running_share(x):
    """The share of the first n entries that are 1, for every n: the tables' "D stepped" column."""
    return np.cumsum(x) / np.arange(1, len(x) + 1)


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


def plot(runs, window, gates):
    """The figure: one column of panels per curve, one colour per run; runs = [(label, metrics)]."""
    import matplotlib  # here: slow to import; the curves are read and checked without it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = PANELS + [STEPPED] * all(STEPPED[0] in m for _, m in runs)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for i, (label, m) in enumerate(runs):
        for ax, (key, title) in zip(axes, panels):
            if len(runs) == 1 and key != STEPPED[0]:
                ax.plot(m["step"], m[key], color="C0", alpha=0.25, linewidth=0.6, label="raw")
            y = running_share(m[key]) if key == STEPPED[0] else moving_average(m[key], window)
            ax.plot(m["step"], y, color=f"C{i}", linewidth=1.5,
                    label=label if len(runs) > 1 else f"mean of {window}")
            ax.set_title(title)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
    for ax, (key, _) in zip(axes, panels):
        if key == "kl":
            ax.set_yscale("log" if any(y_scale(m[key]) == "log" for _, m in runs) else "linear")
        if key in ("disc_acc", STEPPED[0]):
            ax.set_ylim(-0.02, 1.02)
    acc = axes[[k for k, _ in panels].index("disc_acc")]
    for gate in gates:
        acc.axhline(gate, color="k", linestyle="--", linewidth=0.8, label=f"gate {gate:g}")
    acc.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def main(args):
    if args.labels is not None and len(args.labels) != len(args.run_dirs):
        raise UserError(f"--labels gives {len(args.labels)} label(s) for {len(args.run_dirs)} run directories")
    if args.out is None and len(args.run_dirs) > 1:
        raise UserError("several run directories need --out")
    labels = args.labels or [os.path.basename(os.path.normpath(d)) for d in args.run_dirs]
    runs = [(label, read_metrics(d)) for label, d in zip(labels, args.run_dirs)]
    if args.max_step is not None:
        runs = [(label, {k: v[m["step"] <= args.max_step] for k, v in m.items()}) for label, m in runs]
        if min(len(m["step"]) for _, m in runs) == 0:
            raise UserError(f"--max-step {args.max_step} leaves a run without iterations")
    n = max(len(m["step"]) for _, m in runs)
    window = args.smooth if args.smooth is not None else max(1, n // 100)
    if window <= 0:
        raise UserError(f"--smooth must be positive, got {window}")
    gates = [args.gate] if args.gate is not None else sorted({g for g in map(run_gate, args.run_dirs) if g is not None})
    out = args.out or os.path.join(args.run_dirs[0], "loss_curves.png")

    fig = plot(runs, window, gates)
    with atomic_write(out, "the loss curves") as f:
        fig.savefig(f, format=os.path.splitext(out)[1][1:].lower() or "png", dpi=args.dpi)
    import matplotlib.pyplot as plt
    plt.close(fig)
    print(f"wrote {out} ({', '.join(str(len(m['step'])) for _, m in runs)} iterations, moving average over {window})")
    return out


if __name__ == "__main__":
    run_cli(main, get_args_parser())
