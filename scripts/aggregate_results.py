"""Markdown table of mean ± standard deviation over seeds, from the JSON files of classify_latents.py.

    python scripts/aggregate_results.py \
        --row "16/16, 50 epochs" results/mnist/seeds/z16_seed0_sample.json results/mnist/seeds/z16_seed1_sample.json \
        --row "16/16, gate off, 20 epochs" results/mnist/ablations/gate_off_sample.json \
        --out results/mnist/table.md

One row per --row (a label, then the JSON files of its seeds). Each cell is the mean over the row's
files ± the sample standard deviation (n - 1 in the denominator); a row of one file shows its value.
`--columns` picks and orders the columns by their headers. `--target NAME` reads the classifiers of
another target of the JSON (e.g. `direction` on Sprites; default `class`, the specified factor). A
column appears when any file has its number; a row whose files lack it shows "–". The files of a row
must agree on dataset, code sizes, z source and step, so that seeds of one setting are averaged and
nothing else. "D stepped" is the share of iterations up to the checkpoint's step whose discriminator
stepped (the 80% gate open), read from the run's committed summary (scripts/run_summary.py) when one lies
beside the JSON; no number comes from an uncommitted run folder.
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from run_summary import disc_stepped  # noqa: E402
from utils import HelpFormatter, UserError, run_cli  # noqa: E402

# (header, path of the number in classify_latents.py's JSON, decimals)
COLUMNS = [
    ("z train", "targets.class.mlp.z_train", 2), ("z test", "targets.class.mlp.z_test", 2),
    ("s train", "targets.class.mlp.s_train", 2), ("s test", "targets.class.mlp.s_test", 2),
    ("linear z test", "targets.class.linear.z_test", 2), ("linear s test", "targets.class.linear.s_test", 2),
    ("swap", "swap.swap", 2), ("prior swap", "swap.prior", 2), ("z leak", "swap.style_leak", 2),
    ("rec MSE", "errors.reconstruction", 4), ("same-class swap MSE", "errors.same_class_swap", 4),
    ("KL/dim", "posterior.kl_per_dim", 3), ("mean σ", "posterior.sigma_mean", 3), ("mean abs μ", "posterior.abs_mu_mean", 3),
    ("D stepped", "disc_stepped", 2),  # from the run's summary, see run_summary.disc_stepped()
]
# What the files of one row must share.
SAME = ("dataset", "style_dim", "class_dim", "z_source", "step")


def get_args_parser():
    p = argparse.ArgumentParser(description="Mean ± sd over seeds of classify_latents.py JSON files, as a Markdown table.",
                                formatter_class=HelpFormatter)
    p.add_argument("--row", nargs="+", action="append", required=True, metavar=("LABEL", "JSON"),
                   help="a row: its label, then the JSON files of its seeds")
    p.add_argument("--target", default="class",
                   help="which target's classifiers fill the z/s columns (e.g. identity, direction on Sprites)")
    p.add_argument("--columns", nargs="+", default=None, metavar="HEADER",
                   help=f"only these columns, in this order (default: every column some file has): "
                        f"{', '.join(repr(h) for h, _, _ in COLUMNS)}")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    return p


def lookup(d, path):
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def read(path):
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read '{path}': {e}") from None
    d["disc_stepped"] = disc_stepped(path, d)
    return d


def cell(values, digits=2):
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows, target="class", only=None):
    """rows: [(label, [json dict, ...])] -> Markdown table (str); target: whose classifiers fill z/s;
    only: the headers of the columns to show, in order (None: every column some file has)."""
    columns = {h: (h, path.replace("targets.class.", f"targets.{target}."), digits) for h, path, digits in COLUMNS}
    if only is not None:
        unknown = [h for h in only if h not in columns]
        if unknown:
            raise UserError(f"unknown column(s) {unknown}; the columns are {list(columns)}")
        used = [columns[h] for h in only]
    else:
        used = [c for c in columns.values() if any(lookup(d, c[1]) is not None for _, ds in rows for d in ds)]
    first = "setting" if target == "class" else f"setting (target: {target})"
    lines = [f"| {first} | seeds | z | " + " | ".join(h for h, _, _ in used) + " |",
             "|---|---:|---|" + "---:|" * len(used)]
    for label, ds in rows:
        cells = [cell([lookup(d, path) for d in ds if lookup(d, path) is not None], digits) for _, path, digits in used]
        lines.append(f"| {label} | {len(ds)} | {ds[0].get('z_source', '?')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mixed_key(ds, keys=SAME):
    """The first of `keys` on which the JSON dicts disagree, or None."""
    return next((k for k in keys if len({json.dumps(d.get(k)) for d in ds}) > 1), None)


def check_row(label, files, ds):
    key = mixed_key(ds)
    if key is not None:
        values = sorted({json.dumps(d.get(key)) for d in ds})
        raise UserError(f"row '{label}' mixes {key} values {values} ({', '.join(files)}): "
                        f"a row averages seeds of one setting")


def main(args):
    rows = []
    for label, *files in args.row:
        if not files:
            raise UserError(f"row '{label}' names no JSON file")
        ds = [read(f) for f in files]
        check_row(label, files, ds)
        rows.append((label, ds))
    if not any(lookup(d, f"targets.{args.target}") for _, ds in rows for d in ds):
        raise UserError(f"no file has the target '{args.target}'")
    md = table(rows, args.target, args.columns)
    print(md, end="")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(md)
    return md


if __name__ == "__main__":
    run_cli(main, get_args_parser())
