"""How far the attribute protocol can go on rendered 2D Sprites: its classifiers fitted on the
images themselves instead of on a model's codes.

    python scripts/pixel_attributes.py --data-root ../shared/data --fit-every 4 --out results/sprites/pixel_attributes.json

classify_latents.py fits, for each attribute (body, shoes, ... of a character), the reference
classifier on the codes of the train split's characters and tests it on the test split's unseen
characters. This fits the same classifier, with the same seed and settings, on the flattened pixels
(3 x 60 x 60 in [0, 1]) of the same images: what the images let a classifier of this kind name,
the level a class code s that kept every attribute could reach. No model is involved, so the JSON
names the data (root as given, render version) where an evaluation names its run. Both of
classify_latents.py's classifiers are fitted: the reference MLP, made for codes of a few hundred
values, may underfit 10,800 pixels (its train column says so), and the linear probe (scikit-learn's
logistic regression on standardised inputs), the fairer ceiling for a linear reading of s.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import classify_latents  # noqa: E402
from data_loader import SPRITES_RENDER_VERSION, default_data_root, load_dataset  # noqa: E402
from evaluation import ATTRIBUTE_RULE, attribute_names, evaluation_settings, subset  # noqa: E402
from utils import HelpFormatter, UserError, run_cli  # noqa: E402

FEATURES = "pixels: the images flattened, 3 x 60 x 60 values in [0, 1]"


def get_args_parser():
    p = argparse.ArgumentParser(description="Fit the attribute protocol's classifiers on the pixels of rendered "
                                            "2D Sprites (the ceiling for a class code).", formatter_class=HelpFormatter)
    p.add_argument("--data-root", default=None, help="folder holding lpc-sprites/ (default: $DISENTANGLE_DATA_ROOT "
                                                     "or ./data)")
    p.add_argument("--seed", type=int, default=0, help="seed of the classifiers (weights and batch order)")
    classify_latents.add_classifier_args(p)
    p.add_argument("--fit-every", type=int, default=1,
                   help="fit on every Nth image of the train split only (all its characters, 1/N of their poses): "
                        "a fit on 86,000 x 10,800 pixels takes hours on a CPU")
    p.add_argument("--linear-probe", action=argparse.BooleanOptionalAction, default=True,
                   help="also fit the linear probe (scikit-learn logistic regression) on the pixels")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    return p


def pixels(image_set):
    return image_set.images.flatten(1).float().div_(255)


def markdown(res):
    at = res["attributes"]
    lines = [f"Attributes of rendered 2D Sprites from the pixels (no model), data {res['data_root']}, "
             f"render version {res['render_version']}",
             f"Evaluation: seed {res['evaluation']['seed']}, threads {res['evaluation']['threads']}, "
             f"code {res['evaluation']['code_version'] or 'unknown'}",
             f"Features: {res['features']}; fitted on every {res['fit_every']} image(s) of the train split",
             f"Protocol: {at['protocol']}; fit {at['fit_images']} images ({at['fit_identities']} characters), "
             f"test {at['test_images']} images ({at['test_identities']} characters). Chance: the commonest "
             "value's share of the test images. Accuracy in %.", ""]
    m = at["mean"]
    for kind, title in (("mlp", "reference MLP"), ("linear", "linear probe")):
        if kind not in m:
            continue
        lines += [f"| {title}: target | classes | chance | pixels train | pixels test |", "|---|---:|---:|---:|---:|"]
        for name, row in at["targets"].items():
            lines.append(f"| {name} | {row['num_classes']} | {row['chance']:.2f} | "
                         f"{row[kind]['pixels_train']:.2f} | {row[kind]['pixels_test']:.2f} |")
        lines += [f"| mean | | {m['chance']:.2f} | {m[kind]['pixels_train']:.2f} | {m[kind]['pixels_test']:.2f} |", ""]
    return "\n".join(lines).rstrip("\n")


def main(args):
    if args.epochs < 1 or args.fit_every < 1 or args.batch_size < 2 or args.threads < 1:
        raise UserError("--epochs, --fit-every and --threads must be at least 1, --batch-size at least 2")
    torch.set_num_threads(args.threads)
    root = args.data_root or default_data_root()
    train, test = (load_dataset("sprites", root, split) for split in ("train", "test"))
    train = subset(train, torch.arange(0, len(train), args.fit_every))
    names = attribute_names(train, test)
    if not names:
        raise UserError(f"the sprites of {root} carry no attribute labels (Reed's files lack them; "
                        "the set rendered from lpc-sprites/ has them)")
    codes = {"pixels": (pixels(train), pixels(test))}
    settings = argparse.Namespace(seed=args.seed, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  linear_probe=args.linear_probe)
    rows = {name: classify_latents.classify_target(name, train.factors[name], test.factors[name], codes, settings)
            for name in names}
    res = {"features": FEATURES, "dataset": "sprites", "data_root": root, "render_version": SPRITES_RENDER_VERSION,
           "run": None, "evaluation": evaluation_settings(args.seed, args.threads, "cpu"), "unit": "percent",
           "classifier": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr},
           "fit_every": args.fit_every,
           "attributes": classify_latents.attributes_section(
               train, test, rows, ATTRIBUTE_RULE.replace("the codes of", "the pixels of"))}
    return classify_latents.report(res, markdown(res), args.out)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
