"""Bring classify_latents.py JSON files of the older form up to the current one, from checkpoints only.

    python scripts/import_reference.py --reference-dir ../shared/reference-checkpoint/mnist_z16_s16 --out runs/reference_mnist_z16_s16.pt
    python scripts/backfill_run_records.py --data-root ../shared/data --candidates pretrained/*.pt --missing results/RUN_RECORDS_MISSING.md

For each JSON (default: every classify_latents.py JSON under results/):
- the older form's top-level "seed", the evaluation's, moves to "evaluation" {"seed": ...}; threads, device
  and code version of that evaluation were not recorded and stay null;
- "run", the record of the training run (evaluation.training_run), is read from the JSON's checkpoint where
  that file still exists, else from a --candidates file that holds the same weights: same dataset, code
  sizes and step, and the posterior statistics of q(z|x) on the evaluation's test images (mean sigma, mean
  |mu|, KL per dimension, in the JSON to 6 decimals) equal to within 1e-5. The weights are measured, never
  named: nothing is read from a file name. Where the JSON's own checkpoint exists and the JSON holds those
  statistics, they are checked too;
- where no file holds the run, "run" is null and the JSON is listed in --missing, with the reason;
- the first line of the .md file beside the JSON, where it is the older header of that JSON, becomes the
  header lines of the current form (classify_latents.header); the rest of the file is left as it is.
A JSON that already records its run is left alone, so the command can be run again.
"""
import argparse
import glob
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from classify_latents import header, train_flags  # noqa: E402
from evaluation import classifier_sets, eval_seed, load_eval_data, model_run, posterior_codes, posterior_stats  # noqa: E402
from utils import HelpFormatter, UserError, atomic_write, load_model, run_cli  # noqa: E402

USAGE = "--data-root ../shared/data --candidates pretrained/*.pt --missing results/RUN_RECORDS_MISSING.md"
STATS = ("sigma_mean", "abs_mu_mean", "kl_per_dim", "kl_each_dim")
TOLERANCE = 1e-5  # the JSON rounds to 6 decimals; another weight set differs by far more


def get_args_parser():
    p = argparse.ArgumentParser(description="Add the training run record to classify_latents.py JSON files of "
                                            "the older form, from the checkpoints that still exist.",
                                formatter_class=HelpFormatter)
    p.add_argument("files", nargs="*", help="JSON files (default: every classify_latents.py JSON under results/)")
    p.add_argument("--candidates", nargs="*", default=[],
                   help="checkpoints or pretrained files that may hold the weights of a JSON whose checkpoint is gone")
    p.add_argument("--data-root", default=None,
                   help="data folder (default: $DISENTANGLE_DATA_ROOT, else the checkpoint's, else ./data)")
    p.add_argument("--missing", default=None, help="write the list of JSONs left without a record to this Markdown file")
    p.add_argument("--dry-run", action="store_true", help="report what would change, write nothing")
    return p


def result_files():
    """Every classify_latents.py JSON under results/ (those that name a checkpoint)."""
    out = []
    for path in sorted(glob.glob(os.path.join("results", "**", "*.json"), recursive=True)):
        with open(path) as f:
            if "checkpoint" in json.load(f):
                out.append(path)
    return out


class Weights:
    """One checkpoint file, loaded once, with its posterior statistics computed once per evaluation seed."""

    def __init__(self, path):
        self.path, self.model, self.stats = path, load_model(path), {}
        self.ckpt = self.model.checkpoint

    def fits(self, d):
        cfg = self.ckpt["model_config"]
        return ((self.ckpt.get("args") or {}).get("dataset") == d["dataset"] and cfg.get("style_dim") == d["style_dim"]
                and cfg.get("class_dim") == d["class_dim"] and self.ckpt.get("step") == d["step"])

    def posterior(self, seed, data_root):
        """posterior_stats on the images classify_latents.py tests on (classifier_sets, its default split)."""
        if seed not in self.stats:
            cfg, encoder = self.model.cfg, self.model.encoder
            _, test_set, _ = classifier_sets(load_eval_data(self.ckpt, data_root, "train"),
                                             load_eval_data(self.ckpt, data_root, "test"), seed)
            mu, logvar, _ = posterior_codes(encoder, test_set.images, cfg=cfg)
            self.stats[seed] = posterior_stats(mu, logvar)
        return self.stats[seed]

    def matches(self, d, data_root):
        po = d.get("posterior")
        if not po:
            return None  # nothing to measure against
        mine = self.posterior(eval_seed(d) or 0, data_root)
        return all(close(po[k], mine[k]) for k in STATS if k in po)


def close(a, b):
    """Numbers (or lists of numbers) equal to within TOLERANCE."""
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    return abs(a - b) <= TOLERANCE


def find_run(d, candidates, data_root, loaded):
    """(run record or None, how it was found or why not)."""
    def weights(path):
        if path not in loaded:
            loaded[path] = Weights(path)
        return loaded[path]

    own = d["checkpoint"]
    if os.path.isfile(own):
        w = weights(own)
        if not w.fits(d):
            return None, f"its checkpoint {own} now holds another run (dataset, code sizes or step differ)"
        ok = w.matches(d, data_root)
        if ok is False:
            return None, f"its checkpoint {own} now holds other weights (posterior statistics differ)"
        how = "the JSON's checkpoint" + (", posterior statistics checked" if ok else
                                         " (still at its path; the JSON holds no posterior statistics to check)")
        return {**model_run(w.model, train_flags()), "record_source": {"file": own, "how": how}}, how
    if not d.get("posterior"):
        return None, f"its checkpoint {own} is gone, and the JSON holds no posterior statistics to match a candidate"
    for path in candidates:
        w = weights(path)
        if w.fits(d) and w.matches(d, data_root):
            how = f"same weights as {path}: dataset, code sizes, step and posterior statistics match"
            return {**model_run(w.model, train_flags()), "record_source": {"file": path, "how": how}}, how
    return None, f"its checkpoint {own} is gone, and no candidate holds its weights"


def upgraded(d, run):
    """The JSON dict in the current form, its keys in classify_latents.py's order."""
    if "evaluation" in d:
        return {**d, "run": run}
    out = {}
    for k, v in d.items():
        if k == "seed":  # the evaluation's seed, not the training run's
            out["run"] = run
            out["evaluation"] = {"seed": v, "threads": None, "device": None, "code_version": None}
        else:
            out[k] = v
    return out


def new_markdown(md, old, new):
    """The .md text with its first line, the older header of `old`, replaced by the header of `new`;
    None where the first line is not that header."""
    first, _, rest = md.partition("\n")
    if first != "\n".join(header(old)):
        return None
    return "\n".join(header(new)) + "\n" + rest


def missing_file(rows, argv):
    """The Markdown list of JSONs left without a record; argv: the backfill's arguments, as run."""
    lines = ["<!-- quoted: the list scripts/backfill_run_records.py writes; no numbers -->",
             "# classify_latents.py JSONs without a training run record", "",
             "Written by `scripts/backfill_run_records.py`; these JSONs have `\"run\": null`: the checkpoint they",
             "name is gone (run folders are not kept in git) and no file at hand holds the same weights. Their",
             "training seed, flags and code version are not recorded; re-evaluating the checkpoint (where it",
             "still exists) with today's `classify_latents.py` records them. Command:", "",
             "    python scripts/import_reference.py --reference-dir ../shared/reference-checkpoint/mnist_z16_s16 "
             "--out runs/reference_mnist_z16_s16.pt",
             "    python scripts/backfill_run_records.py " + argv, "",
             "| JSON | why |", "|---|---|"]
    lines += [f"| {path} | {why} |" for path, why in rows]
    return "\n".join(lines) + "\n"


def main(args, argv=None):
    """argv: the command line, for the list of missing records (default: the module's usage line)."""
    torch.set_num_threads(1)  # small models; one thread also keeps the statistics' float sums reproducible
    files = args.files or result_files()
    loaded, missing, done = {}, [], 0
    for path in files:
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read '{path}': {e}") from None
        if "checkpoint" not in d:
            raise UserError(f"'{path}' is not a classify_latents.py JSON (no checkpoint)")
        if d.get("run") is not None:
            continue
        run, how = find_run(d, args.candidates, args.data_root, loaded)
        new = upgraded(d, run)
        if run is None:
            missing.append((path, how))
        print(f"{path}: {'run recorded from ' + how if run else 'no record: ' + how}")
        done += run is not None
        if args.dry_run or new == d:  # nothing found again for a JSON already in the current form
            continue
        md_path = os.path.splitext(path)[0] + ".md"
        if os.path.isfile(md_path):
            with open(md_path) as f:
                md = new_markdown(f.read(), d, new)
            if md is None:
                print(f"{md_path}: its first line is not the JSON's older header: left as it is")
            else:
                with atomic_write(md_path, "the Markdown", "w") as f:
                    f.write(md)
        with atomic_write(path, "the results", "w") as f:
            json.dump(new, f, indent=2, allow_nan=False)
            f.write("\n")
    if args.missing and not args.dry_run:
        with atomic_write(args.missing, "the list", "w") as f:
            f.write(missing_file(missing, USAGE if argv is None else " ".join(argv)))
    print(f"{done} JSONs given a run record, {len(missing)} without")
    return missing


if __name__ == "__main__":
    run_cli(lambda a: main(a, sys.argv[1:]), get_args_parser())
