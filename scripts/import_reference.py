"""Convert the reference implementation's released MNIST weights into this project's evaluation file.

    python scripts/import_reference.py --reference-dir REF/checkpoints --out R.pt
    python classify_latents.py --checkpoint R.pt --data-root DIR

REF is a clone of the reference repository, whose checkpoints/ folder holds its released weights.

The reference (ananyahjha93/disentangling-factors-of-variation-using-adversarial-training) saved three
plain state dicts, `encoder`, `decoder` and `discriminator`, of networks with the same layers as ours
under other names. Its instance norms kept running statistics (the `*_in.running_*` entries), used
only in eval mode; in training mode, the mode its weights were trained in, each image is normalised
with its own statistics, which is what our networks always compute. So the import renames the weights
and drops the running statistics, and the imported networks compute what the reference's computed in
training (tests/test_import_reference.py checks this against a forward pass in the reference's form).
z and s sizes are read from the weights.
"""
import argparse
import hashlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from networks import Decoder, Discriminator, Encoder, get_config  # noqa: E402
from utils import CHECKPOINT_FORMAT, CheckpointError, HelpFormatter, atomic_save, load_state, run_cli  # noqa: E402

# The reference's parameter name -> ours, per network. Its three convolutions (and transposed
# convolutions) sit at positions 0, 3, 6 of our Sequentials (layer, norm, activation).
KEYS = {
    "encoder": {**{f"conv_model.convolution_{i}.{p}": f"convs.{3 * (i - 1)}.{p}"
                   for i in (1, 2, 3) for p in ("weight", "bias")},
                **{f"{ref}.{p}": f"{ours}.{p}" for ref, ours in
                   (("style_mu", "style_mu"), ("style_logvar", "style_logvar"), ("class_output", "class_code"))
                   for p in ("weight", "bias")}},
    "decoder": {**{f"deconv_model.deconvolution_{i}.{p}": f"deconvs.{3 * (i - 1)}.{p}"
                   for i in (1, 2, 3) for p in ("weight", "bias")},
                **{f"{ref}.{p}": f"{ours}.{p}" for ref, ours in
                   (("style_input", "style_in"), ("class_input", "class_in")) for p in ("weight", "bias")}},
    "discriminator": {**{f"conv_model.convolution_{i}.{p}": f"convs.{3 * (i - 1)}.{p}"
                         for i in (1, 2, 3) for p in ("weight", "bias")},
                      **{f"fully_connected_model.output.{p}": f"out.{p}" for p in ("weight", "bias")}},
}
# Entries of the reference's state dicts that have no counterpart here: the instance norms' running
# statistics (eval mode only).
DROPPED = ("running_mean", "running_var", "num_batches_tracked")


def get_args_parser():
    p = argparse.ArgumentParser(description="Convert the reference's released MNIST weights into an evaluation "
                                            "file that classify_latents.py, tsne_plot.py and scripts/swap_grid.py take.",
                                formatter_class=HelpFormatter)
    p.add_argument("--reference-dir", required=True,
                   help="folder holding the reference's `encoder`, `decoder` and `discriminator` state dicts")
    p.add_argument("--out", required=True, help="the file to write")
    return p


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_state_dict(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"'{path}' does not exist (expected the reference's state dict there)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"'{path}' is not a readable state dict: {e.__class__.__name__}: "
                              f"{str(e).splitlines()[0][:200]}") from None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f"'{path}' is not a state dict of tensors")
    return sd


def rename(sd, name, path):
    """The reference's state dict `sd` of network `name` under our parameter names."""
    keys = KEYS[name]
    missing = [k for k in keys if k not in sd]
    unknown = [k for k in sd if k not in keys and not k.endswith(DROPPED)]
    if missing or unknown:
        raise CheckpointError(f"'{path}' is not the reference's {name}: "
                              + (f"missing {missing[0]}" if missing else f"unexpected key {unknown[0]}")
                              + (f" (and {len(missing) + len(unknown) - 1} more)" if len(missing) + len(unknown) > 1 else ""))
    return {ours: sd[ref] for ref, ours in keys.items()}


def import_reference(ref_dir):
    """The evaluation-file dict made from the reference's three state dicts in `ref_dir`."""
    paths = {name: os.path.join(ref_dir, name) for name in KEYS}
    states = {name: rename(read_state_dict(path), name, path) for name, path in paths.items()}
    style_dim, class_dim = states["encoder"]["style_mu.weight"].shape[0], states["encoder"]["class_code.weight"].shape[0]
    cfg = get_config("mnist", style_dim=style_dim, class_dim=class_dim)
    for (name, net) in (("encoder", Encoder(cfg)), ("decoder", Decoder(cfg)), ("discriminator", Discriminator(cfg))):
        load_state(net, states[name], name, paths[name])  # one clear line for weights of other shapes
    return {"format": CHECKPOINT_FORMAT, "model_config": cfg.to_dict(),
            "args": {"dataset": "mnist", "style_dim": style_dim, "class_dim": class_dim},
            **states, "step": None,  # no versions: the weights were trained with PyTorch 0.4, not the importing code
            "source": {"what": "the reference implementation's released weights, imported by "
                               "scripts/import_reference.py",
                       "sha256": {name: sha256(path) for name, path in paths.items()}}}


def main(args):
    out = import_reference(args.reference_dir)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_save(out, args.out)
    cfg = out["model_config"]
    print(f"wrote {args.out}: the reference's MNIST encoder, decoder and discriminator "
          f"(z={cfg['style_dim']}, s={cfg['class_dim']})")
    return args.out


if __name__ == "__main__":
    run_cli(main, get_args_parser())
