"""Markdown table of mean ± standard deviation over seeds, from the JSON files of classify_latents.py.

    python scripts/aggregate_results.py \
        --row "16/16, 50 epochs" results/mnist/seeds/z16_seed0_sample.json results/mnist/seeds/z16_seed1_sample.json \
        --row "16/16, gate off, 20 epochs" results/mnist/ablations/gate_off_sample.json \
        --out results/mnist/table.md

One row per --row (a label, then the JSON files of its seeds). Each cell is the mean over the row's
files ± the sample standard deviation (n - 1 in the denominator); a row of one file shows its value.
`--columns` picks and orders the columns by their headers. `--target NAME` reads the classifiers of
another target of the JSON (e.g. `direction` on Sprites; default `class`, the specified factor), or of
the attribute protocol of rendered Sprites: `attributes.mean` (their mean), `attributes.hair` (one). A
column appears when any file has its number; a row shows "–" where any of its files lacks it. The
files of a row must agree on dataset, code sizes, z source and step, and on the recipe and training
flags their run records hold (but epochs, max_steps and device), so that seeds of one setting are
averaged and nothing else; they must be different training runs (no checkpoint, weights, or training seed and
setting twice: a copy of a file is refused too), and evaluated alike (evaluation seed, threads, device
and code version as recorded in the JSON's "evaluation"; --allow-mixed-evaluation lets that pass).
"seeds" counts the distinct training seeds the files record ("run"); a row with a file of the older
form, without that record, counts its files instead and is named on stderr. "D stepped" is the share of iterations up to the checkpoint's step whose discriminator
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
# What a row's files must share of their evaluation ("evaluation" of the JSON; None in the older form).
SAME_EVALUATION = ("seed", "threads", "device", "code_version")
# Training flags (the run record's "flags") a row's files may differ in: how long a run was meant to be
# (the step is compared above) and where it ran; any other recorded flag must agree.
FLAGS_MAY_DIFFER = ("epochs", "max_steps", "device")
# What tells one training run from another besides its checkpoint and weights: a run trained twice
# with the same seed, setting and code gives the same weights.
RUN_ID_IGNORED = ("checkpoint", "weights_sha256", "step", "epoch", "record_source")


def get_args_parser():
    p = argparse.ArgumentParser(description="Mean ± sd over seeds of classify_latents.py JSON files, as a Markdown table.",
                                formatter_class=HelpFormatter)
    p.add_argument("--row", nargs="+", action="append", required=True, metavar=("LABEL", "JSON"),
                   help="a row: its label, then the JSON files of its seeds")
    p.add_argument("--target", default="class",
                   help="which target's classifiers fill the z/s columns (e.g. identity, direction on Sprites; "
                        "attributes.mean or attributes.NAME for the attribute protocol)")
    p.add_argument("--columns", nargs="+", default=None, metavar="HEADER",
                   help=f"only these columns, in this order (default: every column some file has): "
                        f"{', '.join(repr(h) for h, _, _ in COLUMNS)}")
    p.add_argument("--allow-mixed-evaluation", action="store_true",
                   help="let a row average files evaluated with other settings (seed, threads, device, code)")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    return p


def target_path(target):
    """Where a target's classifiers sit in the JSON: targets.NAME; the attribute protocol's section for
    attributes.NAME (attributes.targets.NAME) and attributes.mean."""
    section, _, name = target.rpartition(".")
    if section == "attributes":
        return "attributes.mean" if name == "mean" else f"attributes.targets.{name}"
    return f"targets.{target}"


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


def evaluation(d):
    """The evaluation settings of a JSON; the older form recorded only its seed, at the top level."""
    ev = d.get("evaluation") or {"seed": d.get("seed")}
    return {k: ev.get(k) for k in SAME_EVALUATION}


def seed_count(ds):
    """(number of seeds, counted from the training runs' records?): the distinct recorded training
    seeds, or, where a file records none, the number of files (the older rule)."""
    seeds = [(d.get("run") or {}).get("seed") for d in ds]
    if any(s is None for s in seeds):
        return len(ds), False
    return len(set(seeds)), True


def same_run(a, b):
    """Why the JSON dicts a and b measure one training run (a reason), or None."""
    ca, cb = a.get("checkpoint"), b.get("checkpoint")
    if ca and cb and os.path.normpath(ca) == os.path.normpath(cb):
        return f"the same checkpoint {ca}"
    ra, rb = a.get("run"), b.get("run")
    if not ra or not rb:
        return None
    if ra.get("weights_sha256") and ra.get("weights_sha256") == rb.get("weights_sha256"):
        return "the same weights (sha256)"

    def run_id(r):
        return json.dumps({k: v for k, v in r.items() if k not in RUN_ID_IGNORED}, sort_keys=True)

    if ra.get("seed") is not None and run_id(ra) == run_id(rb):
        return f"the same training seed {ra['seed']}, setting and code"
    return None


def values(ds, path):
    """The numbers at path of a row's files; none where a file lacks it (a mean over part of a row's
    seeds would pass for the row's)."""
    found = [lookup(d, path) for d in ds]
    return [] if None in found else found


def cell(values, digits=2):
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows, target="class", only=None):
    """rows: [(label, [json dict, ...])] -> Markdown table (str); target: whose classifiers fill z/s;
    only: the headers of the columns to show, in order (None: every column some file has)."""
    columns = {h: (h, path.replace("targets.class.", f"{target_path(target)}."), digits) for h, path, digits in COLUMNS}
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
        cells = [cell(values(ds, path), digits) for _, path, digits in used]
        lines.append(f"| {label} | {seed_count(ds)[0]} | {ds[0].get('z_source', '?')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mixed_key(ds, keys=SAME):
    """The first of `keys` on which the JSON dicts disagree, or None."""
    return next((k for k in keys if len({json.dumps(d.get(k)) for d in ds}) > 1), None)


def mixed_flag(ds):
    """The first training setting, as the files' run records hold it (recipe and every flag that all
    of them record, but FLAGS_MAY_DIFFER), on which they disagree, and its values; or None."""
    runs = [d["run"] for d in ds if d.get("run")]
    settings = [{k: v for k, v in {"recipe": r.get("recipe"), **r.get("flags", {})}.items() if v is not None}
                for r in runs]  # None: not recorded (an older file), not a setting
    shared = set.intersection(*(set(f) for f in settings)) - set(FLAGS_MAY_DIFFER) if settings else set()
    key = mixed_key(settings, sorted(shared))
    return key and (key, sorted({json.dumps(f[key]) for f in settings}))


def check_row(label, files, ds, allow_mixed_evaluation=False):
    key = mixed_key(ds)
    if key is not None:
        values = sorted({json.dumps(d.get(key)) for d in ds})
        raise UserError(f"row '{label}' mixes {key} values {values} ({', '.join(files)}): "
                        f"a row averages seeds of one setting")
    mixed = mixed_flag(ds)
    if mixed:
        raise UserError(f"row '{label}' mixes training {mixed[0]} values {mixed[1]} ({', '.join(files)}): "
                        f"a row averages seeds of one setting")
    for i in range(len(ds)):
        for j in range(i):
            why = same_run(ds[j], ds[i])
            if why:
                raise UserError(f"row '{label}' holds one training run twice ({why}): {files[j]} and {files[i]}")
    evs = [evaluation(d) for d in ds]
    key = mixed_key(evs, SAME_EVALUATION)
    if key is not None and not allow_mixed_evaluation:
        values = sorted({json.dumps(e[key]) for e in evs})
        raise UserError(f"row '{label}' mixes evaluation {key} values {values} ({', '.join(files)}; null: not "
                        f"recorded): evaluate its files alike, or pass --allow-mixed-evaluation")


def main(args):
    rows = []
    for label, *files in args.row:
        if not files:
            raise UserError(f"row '{label}' names no JSON file")
        ds = [read(f) for f in files]
        check_row(label, files, ds, args.allow_mixed_evaluation)
        if not seed_count(ds)[1]:
            print(f"note: row '{label}': a file records no training run, so its seeds column counts files "
                  f"(older rule)", file=sys.stderr)
        rows.append((label, ds))
    if not any(lookup(d, target_path(args.target)) for _, ds in rows for d in ds):
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
