"""Shared helpers: errors, devices, seeding, checkpoints, swap grids."""
import argparse
import os
import platform
import random
import subprocess
import sys
import warnings

import numpy as np
import torch

CHECKPOINT_FORMAT = "disentangle-checkpoint-v1"
REPO_DIR = os.path.dirname(os.path.abspath(__file__))


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr, exit status 2, no traceback."""


class CheckpointError(UserError):
    pass


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults in --help, except None ones and where the help text already says."""

    def _get_help_string(self, action):
        if action.default in (None, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def one_line_errors(parser):
    """Make argparse report bad arguments as one `error:` line (exit 2) instead of usage + error."""
    def error(message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
    parser.error = error
    return parser


def run_cli(main, parser):
    """Parse arguments, run main(args), and turn a UserError into one clear line."""
    args = one_line_errors(parser).parse_args()
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))


# ----------------------------------------------------------------------------- devices, seeds

def pick_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps asked for, but MPS is not available")
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Global RNG states of python, numpy and torch as values torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- versions

def code_version():
    """The git commit of this code (with -dirty for uncommitted changes), or 'unknown'."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=REPO_DIR,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions():
    import torchvision
    return {"code": code_version(), "python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "numpy": str(np.__version__)}


def check_versions(saved, path):
    """Warn when a checkpoint was written by other code or libraries than the ones running now."""
    if not saved:
        return
    now = library_versions()
    diff = [f"{k} {saved[k]} -> {now[k]}" for k in saved if k in now and saved[k] != now[k]]
    if diff:
        warnings.warn(f"{path} was written with other versions: {', '.join(diff)}", stacklevel=2)


# ----------------------------------------------------------------------------- checkpoints

def atomic_save(obj, path):
    """torch.save to a temporary file, fsync, then rename: a crash at any moment leaves
    either the previous file or the new one, never a partial one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path, map_location="cpu"):
    """Load and validate a checkpoint written by train.py (or a pretrained encoder/decoder file)."""
    if os.path.isdir(path):
        cand = os.path.join(path, "checkpoints", "last.pt")
        if not os.path.isfile(cand):
            raise CheckpointError(f"{path} is a directory without checkpoints/last.pt")
        path = cand
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"'{path}' is not a readable checkpoint (truncated, corrupted or "
                              f"another kind of file): {e.__class__.__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"'{path}' is not a checkpoint of this project (no '{CHECKPOINT_FORMAT}' marker)")
    for key in ("model_config", "encoder", "decoder"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint '{path}' lacks '{key}'")
    check_versions(ckpt.get("versions"), path)
    ckpt["path"] = path
    return ckpt


def load_state(module, state, what, path):
    """load_state_dict with a clear error when the checkpoint's sizes differ from the model's."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = [l.strip() for l in str(e).splitlines() if l.strip()][1:2] or [str(e)[:200]]
        raise CheckpointError(f"checkpoint '{path}' holds a {what} of other sizes than this model: {first[0]}") from None


def build_models(ckpt, device="cpu", with_discriminator=False):
    """Rebuild encoder and decoder (and discriminator) from a checkpoint alone, in eval mode."""
    from networks import Decoder, Discriminator, Encoder, ModelConfig
    try:
        cfg = ModelConfig.from_dict(ckpt["model_config"])
    except TypeError as e:
        raise CheckpointError(f"checkpoint '{ckpt.get('path')}' has an unknown model config: {e}") from None
    nets = [Encoder(cfg), Decoder(cfg)]
    names = ["encoder", "decoder"]
    if with_discriminator:
        if "discriminator" not in ckpt:
            raise CheckpointError(f"checkpoint '{ckpt.get('path')}' holds no discriminator")
        nets.append(Discriminator(cfg))
        names.append("discriminator")
    for net, name in zip(nets, names):
        load_state(net, ckpt[name], name, ckpt.get("path"))
        net.to(device).eval()
    return (cfg, *nets)


# ----------------------------------------------------------------------------- images

def to_float(images_u8):
    """uint8 images -> float in [0, 1]."""
    return images_u8.float().div_(255)


@torch.no_grad()
def swap_grid(encoder, decoder, x_style, x_class):
    """The paper's figure as a (rows, cols, C, H, W) tensor of images.

    The top row holds the images that give the class code s, the left column those
    that give the style z (the mean of q(z|x)); cell (i, j) is dec(z_i, s_j).
    The top-left corner is left white.
    """
    mu, _, _ = encoder(x_style)
    _, _, s = encoder(x_class)
    nz, ns = len(x_style), len(x_class)
    cells = decoder(mu.repeat_interleave(ns, 0), s.repeat(nz, 1))
    grid = torch.ones(nz + 1, ns + 1, *x_style.shape[1:], device=x_style.device)
    grid[0, 1:] = x_class
    grid[1:, 0] = x_style
    grid[1:, 1:] = cells.view(nz, ns, *x_style.shape[1:])
    return grid


def save_grid_png(grid, path):
    """Write a (rows, cols, C, H, W) image grid as one PNG."""
    from torchvision.utils import save_image
    save_image(grid.flatten(0, 1).float().cpu(), path, nrow=grid.shape[1], padding=2, pad_value=0.5)
