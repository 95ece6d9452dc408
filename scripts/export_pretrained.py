"""Write a small evaluation-only copy of a checkpoint: encoder, decoder, model config and a few args.

    python scripts/export_pretrained.py --checkpoint runs/mnist/checkpoints/last.pt --out pretrained/mnist_z16_s16.pt

The file is what every evaluation script needs, without the discriminator, optimisers or RNG
states a training checkpoint carries for resuming (it cannot resume training).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from utils import HelpFormatter, export_pretrained, run_cli  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description="Export the encoder/decoder of a checkpoint as a small file.",
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (or run directory)")
    p.add_argument("--out", required=True, help="the file to write")
    return p


def main(args):
    export_pretrained(args.checkpoint, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
    return args.out


if __name__ == "__main__":
    run_cli(main, get_args_parser())
