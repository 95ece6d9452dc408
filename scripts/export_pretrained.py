"""Write a small evaluation-only copy of a checkpoint: encoder, decoder, model config and a few args.

    python scripts/export_pretrained.py --checkpoint runs/mnist/checkpoints/last.pt --out pretrained/mnist_z16_s16.pt

The file is what every evaluation script needs, without the discriminator, optimisers or RNG
states a training checkpoint carries for resuming (it cannot resume training). The file keeps the
code and library versions the checkpoint recorded. A checkpoint trained from uncommitted changes
(code version ending in '-dirty') is refused unless --allow-dirty is given; the file then records
that version, and the command says so.
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
    p.add_argument("--allow-dirty", action="store_true",
                   help="export a checkpoint trained from uncommitted changes (code version '...-dirty')")
    return p


def main(args):
    small = export_pretrained(args.checkpoint, args.out, args.allow_dirty)
    code = str((small["versions"] or {}).get("code", ""))
    dirty = f"; trained from uncommitted changes, recorded as code {code}" if code.endswith("-dirty") else ""
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB){dirty}")
    return args.out


if __name__ == "__main__":
    run_cli(main, get_args_parser())
