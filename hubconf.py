"""torch.hub entry points: one per file in pretrained/, each returning a utils.TrainedModel in eval mode
(encode, decode, swap, sample; images float in [0, 1], (N, C, H, W)).

    model = torch.hub.load("OWNER/REPO", "mnist_z16_s16_prior")          # the published repository
    model = torch.hub.load(".", "mnist_z16_s16_prior", source="local")   # a checkout, offline

Numbers: the test split, from the results file named (classify_latents.py, seed 0; in %, chance
11.35 on MNIST, 1 on Sprites): "s" and "z" the reference MLP's class accuracy on s and on z (on Sprites
the identity of the 100 unseen test characters, fitted on 80% of each one's images), "swap" the share
of dec(z_i, s_j) a small CNN labels class j, "prior" the same for dec(z ~ N(0, I), s_j).
A new pretrained file is one more line below (tests/test_model_api.py checks files and entries match).
"""
import os

from utils import load_model as _load_model

dependencies = ["torch"]

_PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")


def _entry(name, doc):
    """The entry point that loads pretrained/NAME.pt."""
    def entry(device="cpu"):
        return _load_model(os.path.join(_PRETRAINED, f"{name}.pt"), device)
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = doc + "\n\n    device: where the model runs ('cpu', 'cuda', 'mps' or 'auto')."
    return entry


mnist_z16_s16 = _entry("mnist_z16_s16", """MNIST, z 16 / s 16, the reference recipe, seed 0, 50 epochs (46,850 steps).
    s 98.40, z sampled 70.25 / mean of q(z|x) 90.30, swap 94.38, prior 22.85 (its prior decodes fail)
    (results/mnist/classify_z_sample.json, results/mnist/classify_z_mean.json).""")
mnist_z64_s64 = _entry("mnist_z64_s64", """MNIST, z 64 / s 64, the reference recipe, seed 0, 50 epochs (46,850 steps).
    s 98.61, z sampled 66.13 / mean of q(z|x) 97.15, swap 95.61, prior 95.61
    (results/mnist/seeds/z64_seed0_epoch50_sample.json, results/mnist/seeds/z64_seed0_epoch50_mean.json).""")
mnist_z16_s16_prior = _entry("mnist_z16_s16_prior", """MNIST, z 16 / s 16, --disc-fakes posterior+prior, seed 0, 50 epochs (46,850 steps): decodes from the prior.
    s 98.48, z sampled 61.91 / mean of q(z|x) 87.83, swap 95.77, prior 95.93
    (results/mnist-prior/pp_seed0_epoch50_sample.json, results/mnist-prior/pp_seed0_epoch50_mean.json).""")
sprites_z512_s64 = _entry("sprites_z512_s64", """2D Sprites (rendered from the LPC sheets; CC-BY-SA 3.0 art), z 512 / s 64, the reference recipe, --amp, seed 0, 10 epochs (13,430 steps).
    s 94.26, z sampled 15.82 / mean of q(z|x) 90.03, swap 57.33, prior 30.04; attributes of unseen characters from s 64.28 (chance 22.33)
    (results/sprites/z512_seed0_amp3_epoch10_sample.json, results/sprites/z512_seed0_amp3_epoch10_mean.json).""")
