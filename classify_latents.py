"""Latent classification: the class should be readable from the class code s and not from
the style code z (Mathieu et al. 2016, Table 1), plus the swap accuracy of decoded images,
the reconstruction and same-class swap errors, and how q(z|x) sits against the prior N(0, I).

    python classify_latents.py --checkpoint runs/mnist/checkpoints/last.pt --out results/classify.json

Codes are taken from the encoder of the checkpoint alone; the reference classifier
(networks.Classifier) is fitted on the codes of one set of images and tested on another
(evaluation.classifier_split says which, for every dataset). A scikit-learn logistic regression
is reported beside it as a simpler, linear measure. Besides the class, every integer factor
of the dataset (Sprites: action, direction, frame) is classified the same way. On rendered Sprites
the characters' attributes (their layer variants: body, shoes, ...) are classified by a second
protocol, the published table's: fitted on the train split's characters, tested on the test
split's (evaluation.attribute_names; docs/evaluation.md).
"""
import argparse
import json

import torch

import train
from evaluation import (ATTRIBUTE_RULE, Z_SOURCES, accuracy, attribute_names, chance_level, classifier_split,
                        dense_labels, encode_dataset, eval_seed, evaluation_settings, identities, integer_factors,
                        linear_probe, load_eval_data, model_run, posterior_codes, posterior_stats, subset,
                        swap_accuracy, swap_errors, train_classifier, train_image_classifier)
from utils import (HelpFormatter, UserError, atomic_write, checkpoint_dataset, load_model, pick_device, run_cli,
                   training_args)


def get_args_parser():
    p = argparse.ArgumentParser(description="Classify the class (and factors) from the style code z and "
                                            "the class code s of a checkpoint's encoder.",
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file (or run directory) to evaluate")
    p.add_argument("--data-root", default=None,
                   help="data folder (default: $DISENTANGLE_DATA_ROOT, else the checkpoint's, else ./data)")
    p.add_argument("--seed", type=int, default=0,
                   help="evaluation seed (not the training seed) of every random choice: same seed, same numbers")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    p.add_argument("--z-source", default="mean", choices=Z_SOURCES,
                   help="z = the mean of q(z|x), or one reparameterised draw from it (the reference's README "
                        "reports its accuracies after reparameterisation)")
    add_classifier_args(p)
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of each class held out for testing, where the test split's classes are unseen "
                        "in training (Sprites); unused on MNIST")
    p.add_argument("--factors", action=argparse.BooleanOptionalAction, default=True,
                   help="also classify each integer factor of the dataset (Sprites: the pose, and the "
                        "characters' attributes fitted on the train split, tested on the test split)")
    p.add_argument("--linear-probe", action=argparse.BooleanOptionalAction, default=True,
                   help="also fit a logistic regression on each code")
    p.add_argument("--swap", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the swap accuracy with an image classifier")
    p.add_argument("--swap-train-steps", type=int, default=500,
                   help="training steps (batch 128) of the image classifier that judges swapped images")
    p.add_argument("--swap-pairs", type=int, default=10000,
                   help="random (z-source, s-source) pairs judged, and same-class pairs of the swap error")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads of torch: these small models gain little from more, and on a busy "
                        "machine idle threads spin against the other processes (several times slower)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    return p


def add_classifier_args(p):
    """--epochs, --batch-size and --lr of the latent classifiers (scripts/pixel_attributes.py fits the same)."""
    p.add_argument("--epochs", type=int, default=10, help="training epochs of each latent classifier")
    p.add_argument("--batch-size", type=int, default=256, help="batch size of the latent classifiers")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the latent classifiers")


def train_flags():
    """The names of train.py's arguments that change training (all but utils.NOT_TRAINING_ARGS)."""
    return sorted(training_args(vars(train.get_args_parser().parse_args([]))))


def check_args(args):
    for name in ("epochs", "batch_size", "swap_train_steps", "swap_pairs", "threads"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 < args.test_fraction < 1:
        raise UserError(f"--test-fraction must lie in (0, 1), got {args.test_fraction}")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")


def pc(share):
    """A share in [0, 1] as a percentage, rounded for the JSON file."""
    return round(100 * share, 4)


def classify_target(name, fit_y, test_y, codes, args):
    """One table row: the MLP (and linear probe) on z and on s for one label."""
    fit_y, test_y, k = dense_labels(fit_y, test_y)
    row = {"num_classes": k, "chance": pc(chance_level(test_y)), "mlp": {}}
    if args.linear_probe:
        row["linear"] = {}
    for space, (fit_x, test_x) in codes.items():
        model = train_classifier(fit_x, fit_y, k, args.seed, args.epochs, args.batch_size, args.lr)
        row["mlp"][f"{space}_train"] = pc(accuracy(model, fit_x, fit_y))
        row["mlp"][f"{space}_test"] = pc(accuracy(model, test_x, test_y))
        if args.linear_probe:
            tr, te = linear_probe(fit_x, fit_y, test_x, test_y, args.seed)
            row["linear"][f"{space}_train"], row["linear"][f"{space}_test"] = pc(tr), pc(te)
    return row


def mean_row(rows):
    """The mean over targets of their chance and of each accuracy column."""
    rows = list(rows.values())
    mean = {"chance": round(sum(r["chance"] for r in rows) / len(rows), 4)}
    for kind in ("mlp", "linear"):
        if all(kind in r for r in rows):
            mean[kind] = {c: round(sum(r[kind][c] for r in rows) / len(rows), 4) for c in rows[0][kind]}
    return mean


def attributes_section(train, test, rows, protocol=ATTRIBUTE_RULE):
    """The JSON's "attributes": the protocol, the two splits' sizes, a row per attribute and their mean."""
    return {"protocol": protocol, "fit_images": len(train), "test_images": len(test),
            "fit_identities": len(torch.unique(identities(train))),
            "test_identities": len(torch.unique(identities(test))),
            "targets": rows, "mean": mean_row(rows)}


def report(res, text, out=None):
    """Print the Markdown `text` and, given `out`, write the results `res` there as JSON."""
    print(text)
    if out:
        with atomic_write(out, "the results", "w") as f:
            json.dump(res, f, indent=2, allow_nan=False)
            f.write("\n")
    return res


def pct(v):
    return "n/a" if v is None else f"{v:.2f}"


def mse(v):
    return "n/a (no class has two test images)" if v is None else f"{v:.5f}"


def target_tables(targets, mean=None):
    """One Markdown table per classifier kind, a row per target (and the mean row, if given)."""
    cols = ["z_train", "z_test", "s_train", "s_test"]
    lines = []
    for kind, title in (("mlp", "reference MLP"), ("linear", "linear probe")):
        if not all(kind in row for row in targets.values()):
            continue
        lines += [f"| {title}: target | classes | chance | z train | z test | s train | s test |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, row in targets.items():
            lines.append(f"| {name} | {row['num_classes']} | {row['chance']:.2f} | "
                         + " | ".join(f"{row[kind][c]:.2f}" for c in cols) + " |")
        if mean is not None:
            lines.append(f"| mean | | {mean['chance']:.2f} | " + " | ".join(f"{mean[kind][c]:.2f}" for c in cols) + " |")
        lines.append("")
    return lines


def known(v):
    return "unknown" if v is None else v


def run_line(run):
    """One line: the training run of the checkpoint, as recorded."""
    if run is None:
        return "Training run: not recorded (results/RUN_RECORDS_MISSING.md)"
    flags = ", ".join(f"{k} {v}" for k, v in run["flags"].items())
    missing = f"; not recorded: {', '.join(run['unrecorded'])}" if run["unrecorded"] else ""
    return (f"Training run: seed {known(run['seed'])}, {known(run['dataset'])}, recipe {known(run['recipe'])}, "
            f"z={run['style_dim']}, s={run['class_dim']}, step {known(run['step'])}, epoch {known(run['epoch'])}, "
            f"code {known(run['code_version'])}, weights sha256 {run['weights_sha256'][:12]}; "
            f"flags: {flags or 'none recorded'}{missing}")


def header(res):
    """The lines above the tables. A JSON of the older form (a top-level "seed", no records) keeps
    its older one-line header."""
    first = (f"Latent classification: {res['dataset']} (z={res['style_dim']}, s={res['class_dim']}), "
             f"{res['checkpoint']} step {res['step']}, z = {res['z_source']}")
    if "evaluation" not in res:
        return [f"{first}, seed {res['seed']}"]
    ev = res["evaluation"]
    return [f"{first}, evaluation seed {eval_seed(res)}", run_line(res.get("run")),
            f"Evaluation: seed {ev['seed']}, threads {known(ev['threads'])}, device {known(ev['device'])}, "
            f"code {known(ev['code_version'])}"]


def markdown(res):
    """The results as Markdown tables (accuracy in %)."""
    lines = [*header(res),
             f"Split: {res['split']['rule']}; fit {res['split']['fit_images']} images, "
             f"test {res['split']['test_images']} images. Accuracy in %.", ""]
    lines += target_tables(res["targets"])
    if "attributes" in res:
        at = res["attributes"]
        lines += [f"Attributes, the published table's protocol: {at['protocol']}; fit {at['fit_images']} images "
                  f"({at['fit_identities']} characters), test {at['test_images']} images ({at['test_identities']} "
                  f"characters). Chance: the commonest value's share of the test images. Accuracy in %.", ""]
        lines += target_tables(at["targets"], at["mean"])
    if "swap" in res:
        sw = res["swap"]
        lines += ["| swap accuracy (image classifier's label) | % |", "|---|---:|",
                  f"| real test images labelled their class (the classifier's ceiling) | {sw['judge_test']:.2f} |",
                  f"| dec(z_i, s_j) labelled class(j), i != j | {sw['swap']:.2f} |",
                  f"| dec(z ~ N(0, I), s_j) labelled class(j) | {sw['prior']:.2f} |",
                  f"| dec(z_i, s_j) labelled class(i), pairs of different classes | {pct(sw['style_leak'])} |",
                  f"| chance (most frequent class) | {res['targets']['class']['chance']:.2f} |", ""]
        if "by_class" in sw:  # JSONs of older code lack this and the sections below: their tables, as printed then
            lines += ["| class (of s_j) | pairs | dec(z ~ N(0, I), s_j) labelled class(j), % | "
                      "dec(z_i, s_j) labelled class(j), % |", "|---|---:|---:|---:|"]
            lines += [f"| {r['class']} | {r['pairs']} | {pct(r['prior'])} | {pct(r['swap'])} |" for r in sw["by_class"]]
            lines.append("")
    if "errors" in res:
        er, po = res["errors"], res["posterior"]
        lines += [f"| error against x_i, z = mean of q(z\\|x), {er['pairs']} pairs | MSE per pixel |", "|---|---:|",
                  f"| reconstruction: dec(z_i, s_i) | {mse(er['reconstruction'])} |",
                  f"| same-class swap: dec(z_i, s_j), i != j of the same class | {mse(er['same_class_swap'])} |", "",
                  "| q(z\\|x) on the test images | |", "|---|---:|",
                  f"| mean sigma | {po['sigma_mean']:.4f} |", f"| mean \\|mu\\| | {po['abs_mu_mean']:.4f} |",
                  f"| KL(q(z\\|x) ‖ N(0, I)) per dimension, nats | {po['kl_per_dim']:.4f} |", ""]
    return "\n".join(lines)


def main(args):
    check_args(args)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model = load_model(args.checkpoint, device)
    ckpt, cfg, encoder, decoder = model.checkpoint, model.cfg, model.encoder, model.decoder
    checkpoint_dataset(ckpt)
    splits = {name: load_eval_data(ckpt, args.data_root, name) for name in ("train", "test")}
    (fit_split, fit_idx), (test_split, test_idx), rule = classifier_split(splits["train"], splits["test"],
                                                                          args.seed, args.test_fraction)
    fit_set, test_set = subset(splits[fit_split], fit_idx), subset(splits[test_split], test_idx)
    attributes = attribute_names(splits["train"], splits["test"]) if args.factors else []

    # z and s of every image of the splits in use, each split encoded once and its codes shared by
    # both protocols (Sprites' train split is 86,000 images); eps of --z-source sample from one
    # seeded generator, drawn split by split: the class protocol's splits first, so that its numbers
    # do not depend on whether the attributes need another split too (--no-factors)
    g = torch.Generator().manual_seed(args.seed)
    in_use = dict.fromkeys([fit_split, test_split] + (["train", "test"] if attributes else []))
    encoded = {name: encode_dataset(encoder, splits[name].images, z_source=args.z_source, generator=g, cfg=cfg)
               for name in in_use}

    def pick(split, idx):
        z, s = encoded[split]
        return (z, s) if idx is None else (z[idx], s[idx])

    (z_fit, s_fit), (z_test, s_test) = pick(fit_split, fit_idx), pick(test_split, test_idx)
    codes = {"z": (z_fit, z_test), "s": (s_fit, s_test)}

    # the attributes are classified by their own protocol only: under the within-class split an
    # attribute is a function of the identity, whose images sit on both sides
    targets = {"class": (fit_set.labels, test_set.labels)}
    if args.factors:
        for name in integer_factors(fit_set):
            if name in test_set.factors and name not in attributes:
                targets[name] = (fit_set.factors[name], test_set.factors[name])
    # "run": what trained the checkpoint; "evaluation": this command's own settings (its seed is not the run's)
    res = {"checkpoint": ckpt["path"], "step": ckpt.get("step"),
           "dataset": checkpoint_dataset(ckpt), "style_dim": cfg.style_dim, "class_dim": cfg.class_dim,
           "run": model_run(model, train_flags()), "evaluation": evaluation_settings(args.seed, args.threads, device),
           "z_source": args.z_source, "unit": "percent",
           "split": {"rule": rule, "fit_images": len(fit_set), "test_images": len(test_set)},
           "classifier": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr},
           "targets": {name: classify_target(name, fy, ty, codes, args) for name, (fy, ty) in targets.items()}}
    if attributes:
        train, test = splits["train"], splits["test"]
        split_codes = {space: (encoded["train"][k], encoded["test"][k]) for k, space in enumerate(("z", "s"))}
        rows = {name: classify_target(name, train.factors[name], test.factors[name], split_codes, args)
                for name in attributes}
        res["attributes"] = attributes_section(train, test, rows)

    # q(z|x) against the prior, and the errors of decoding from z = mu, on the test images
    mu, logvar, s = posterior_codes(encoder, test_set.images, cfg=cfg)
    res["posterior"] = {k: round(v, 6) if isinstance(v, float) else [round(x, 6) for x in v]
                        for k, v in posterior_stats(mu, logvar).items()}
    res["errors"] = {k: round(v, 8) if isinstance(v, float) else v for k, v in
                     swap_errors(decoder, test_set.images, test_set.labels, mu, s, args.swap_pairs, args.seed, cfg=cfg).items()}

    if args.swap:
        # the judge: a plain CNN trained on the real images the latent classifiers are fitted on
        fit_y, test_y, k = dense_labels(fit_set.labels, test_set.labels)
        judge = train_image_classifier(fit_set.images, fit_y, k, cfg, args.seed, args.swap_train_steps,
                                       device=device)
        sw = swap_accuracy(encoder, decoder, judge, test_set.images, test_y, args.swap_pairs, args.seed, cfg=cfg)
        classes = torch.unique(torch.cat([fit_set.labels, test_set.labels]))  # dense label -> class
        res["swap"] = {"judge_test": pc(accuracy(judge, test_set.images, test_y, cfg=cfg)),
                       "swap": pc(sw["swap"]), "prior": pc(sw["prior"]),
                       "style_leak": None if sw["style_leak"] != sw["style_leak"] else pc(sw["style_leak"]),
                       "pairs": sw["pairs"],
                       "judge_train_steps": args.swap_train_steps,
                       "by_class": [{"class": classes[r["class"]].item(), "pairs": r["pairs"],
                                     **{k: None if r[k] is None else pc(r[k]) for k in ("prior", "swap")}}
                                    for r in sw["by_class"]]}

    return report(res, markdown(res), args.out)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
