"""Measures of classify_latents.py JSON files against the training iteration, one line per series.

    S=results/mnist/seeds
    python scripts/plot_results.py --series "seed 0" $S/z16_seed0_epoch{10,20,30,40,50}_sample.json \
        --series "seed 1" $S/z16_seed1_epoch{10,20,30,40,50}_sample.json --out results/mnist/seeds/over_epochs.png

A series is a label and the JSON files of one run's checkpoints (e.g. one seed at several epochs); its
points sit at the checkpoints' steps. One panel per measure, chosen by --columns from the headers of
aggregate_results.py (default: z test, s test, swap, prior swap); the files of one series must share
dataset, code sizes and z source, so that a line follows one run and nothing else.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # aggregate_results, beside this file
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from aggregate_results import COLUMNS, SAME, lookup, mixed_key, read  # noqa: E402
from utils import HelpFormatter, UserError, atomic_write, run_cli  # noqa: E402

DEFAULT = ["z test", "s test", "swap", "prior swap"]


def get_args_parser():
    p = argparse.ArgumentParser(description="Measures of classify_latents.py JSON files against the training "
                                            "iteration, one line per series.", formatter_class=HelpFormatter)
    p.add_argument("--series", nargs="+", action="append", required=True, metavar=("LABEL", "JSON"),
                   help="a line: its label, then the JSON files of one run's checkpoints")
    p.add_argument("--columns", nargs="+", default=DEFAULT, metavar="HEADER",
                   help=f"one panel per measure: {', '.join(repr(h) for h, _, _ in COLUMNS)}")
    p.add_argument("--out", required=True, help="output PNG (or PDF)")
    p.add_argument("--dpi", type=int, default=100)
    return p


def read_series(files):
    """The JSON dicts of one series, read once; they must come from one run's kind of checkpoint."""
    ds = [read(f) for f in files]
    key = mixed_key(ds, [k for k in SAME if k != "step"])  # a run's checkpoints differ in step only
    if key is not None:
        raise UserError(f"the files {', '.join(files)} mix {key} values: a series follows one run")
    return ds


def points(ds, path):
    """(steps, values) of one series, in step order; files whose JSON lacks the measure are left out."""
    pairs = sorted((d["step"], lookup(d, path)) for d in ds if lookup(d, path) is not None)
    return [s for s, _ in pairs], [v for _, v in pairs]


def main(args):
    paths = {h: path for h, path, _ in COLUMNS}
    unknown = [h for h in args.columns if h not in paths]
    if unknown:
        raise UserError(f"unknown column(s) {unknown}; the columns are {list(paths)}")
    for label, *files in args.series:
        if not files:
            raise UserError(f"series '{label}' names no JSON file")
    series = [(label, read_series(files)) for label, *files in args.series]
    lines = {h: [(label, *points(ds, paths[h])) for label, ds in series] for h in args.columns}

    import matplotlib  # here: slow to import; the files are read and checked without it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(args.columns), figsize=(3.6 * len(args.columns), 3.0), squeeze=False)
    for ax, h in zip(axes[0], args.columns):
        for i, (label, steps, values) in enumerate(lines[h]):
            ax.plot(steps, values, "o-", color=f"C{i}", markersize=4, label=label)
        ax.set_title(h)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(args.out, "the plot") as f:
        fig.savefig(f, format=os.path.splitext(args.out)[1][1:].lower() or "png", dpi=args.dpi)
    plt.close(fig)
    print(f"wrote {args.out} ({len(args.series)} series, {len(args.columns)} panels)")
    return lines


if __name__ == "__main__":
    run_cli(main, get_args_parser())
