"""Infrastructure every script shares: errors and the command line, devices and seeding, versions,
checkpoint files (and the small pretrained files), image grids, and the model API (load_model: a
trained model with encode, decode, swap and sample). It knows the networks, to rebuild them from a
checkpoint, and nothing of datasets or evaluation (data_loader.py, evaluation.py)."""
import argparse
import errno
import functools
import os
import platform
import random
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn

from networks import CONFIGS, config_from_dict, network_classes, reparameterize

CHECKPOINT_FORMAT = "disentangle-checkpoint-v1"
REPO_DIR = os.path.dirname(os.path.abspath(__file__))


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr, exit status 2, no traceback."""


class CheckpointError(UserError):
    pass


class WriteError(UserError):
    """A file could not be written (disk full, quota, I/O error, a folder that became unwritable):
    one line on stderr and exit status 74 (EX_IOERR of sysexits.h), no traceback."""
    exit_code = 74


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

AUTO_DEVICE_ENV = "DISENTANGLE_AUTO_DEVICE"  # e.g. cpu: what --device auto means (the tests set cpu)


def auto_device_name():
    """What --device auto resolves to: $DISENTANGLE_AUTO_DEVICE where set, else cuda, then mps, then cpu."""
    forced = os.environ.get(AUTO_DEVICE_ENV)
    if forced:
        if forced not in ("cpu", "cuda", "mps"):
            raise UserError(f"${AUTO_DEVICE_ENV} must be cpu, cuda or mps, got '{forced}'")
        return forced
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_device(name="auto"):
    if name == "auto":
        name = auto_device_name()
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps asked for, but MPS is not available")
    return torch.device(name)


def device_info(device):
    """The name of `device` and its CUDA compute capability ("9.0"; None off CUDA), for config.json."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}
    name = "Apple GPU (MPS)" if device.type == "mps" else (platform.processor() or platform.machine())
    return {"type": device.type, "name": name, "compute_capability": None}


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
    if torch.cuda.is_initialized():  # a process that never used CUDA has no CUDA draws to continue
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU the saving run could see; a run resumed on fewer GPUs restores those it has.
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


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
    import torchvision  # here, not at the top: a second to import, and only for the version record
    return {"code": code_version(), "python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "numpy": str(np.__version__)}


def major_minor(version):
    """'2.14.1+cu130' -> '2.14'."""
    return ".".join(str(version).split("+")[0].split(".")[:2])


def check_versions(saved, path, resuming=False):
    """Print one warning line when a checkpoint's versions matter: torch or torchvision of another
    major.minor (results may differ), or, when resuming training, other code. Evaluation of a file
    written by other code says nothing: every commit changes the code version, so the line would
    always print. Python, numpy and patch releases stay in the record without a warning."""
    if not saved:
        return
    now = library_versions()
    differs = {"torch": major_minor(saved.get("torch")) != major_minor(now["torch"]),
               "torchvision": major_minor(saved.get("torchvision")) != major_minor(now["torchvision"]),
               "code": resuming and saved.get("code") != now["code"]}
    diff = [f"{k} {saved[k]} -> {now[k]}" for k in differs if k in saved and differs[k]]
    # One plain line on stderr (no Python source line), from one process under torchrun.
    if diff and os.environ.get("RANK", "0") == "0":
        print(f"warning: {path} was written with other versions: {', '.join(diff)}", file=sys.stderr)


# ----------------------------------------------------------------------------- checkpoints

def os_error_of(e):
    """The OSError behind exception e, or None. torch.save reports a failed write as a
    RuntimeError ("unexpected pos ...") whose context holds the OSError, so the chain is searched."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


@contextmanager
def writing(what, path):
    """Turn a failure to write `path` (an OSError, also one hidden by torch.save) into a WriteError
    that says what could not be written and why: one clear line instead of a traceback."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        err = os_error_of(e)
        if err is None:
            raise
        why = err.strerror or str(err)
        if errno.errorcode.get(err.errno):
            why += f" ({errno.errorcode[err.errno]})"
        raise WriteError(f"could not write {what} {path}: {why}") from None


@contextmanager
def atomic_write(path, what="the file", mode="wb", **open_kwargs):
    """Checkpoints, config.json, the data caches, classify_latents.py's results and the figures are
    written through this (metrics.csv, log.txt and the TensorBoard events are appended instead).
    The block writes into a temporary file beside `path`, which is then fsynced and renamed over
    `path`. A crash at any moment leaves either the previous file or the new one, never a partial
    one; a failure (disk full, an exception inside torch.save, ...) also removes the temporary file,
    so the space is back, and an OSError becomes a WriteError naming `what` and `path`. The folder
    is made if missing."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with writing(what, path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(tmp, mode, **open_kwargs) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass  # never made, or already renamed
        raise


def atomic_save(obj, path, what="the checkpoint"):
    """torch.save through atomic_write."""
    with atomic_write(path, what) as f:
        torch.save(obj, f)


def load_checkpoint(path, map_location="cpu", resuming=False):
    """Load and validate a checkpoint written by train.py (or a pretrained encoder/decoder file);
    `resuming`: it will continue training, so other code is worth a warning."""
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
    check_versions(ckpt.get("versions"), path, resuming)
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
    try:
        cfg = config_from_dict(ckpt["model_config"])
    except TypeError as e:
        raise CheckpointError(f"checkpoint '{ckpt.get('path')}' has an unknown model config: {e}") from None
    Encoder, Decoder, Discriminator = network_classes(cfg)
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


def image_background(images):
    """(C,) colour of the images' background: the per-channel median of their border pixels
    (black for MNIST)."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], -1)
    return border.transpose(0, 1).flatten(1).median(dim=1).values


def area_resize(x, size):
    """Shrink square images (..., H, H) to (..., size, size) by area averaging: output pixel i
    averages the input pixels under [i, i + 1) * H / size, each by the share of it covered (what
    Torch7's image.scale does when it shrinks). One small matrix product per side."""
    n = x.shape[-1]
    if size > n:
        raise ValueError(f"area_resize only shrinks ({n} -> {size})")
    w = area_weights(n, size, x.device, x.dtype)
    return w @ x @ w.T


@functools.lru_cache(maxsize=16)
def area_weights(n, size, device, dtype):
    """area_resize's (size, n) matrix, rows summing to 1; made once per shape and device (training
    resizes every batch), so callers must not modify it."""
    edges = torch.arange(size + 1, dtype=torch.float64) * n / size
    j = torch.arange(n, dtype=torch.float64)
    cover = (torch.minimum(edges[1:, None], j + 1) - torch.maximum(edges[:-1, None], j)).clamp(min=0)
    return (cover / (edges[1:] - edges[:-1])[:, None]).to(device, dtype)


def model_images(images, cfg=None):
    """uint8 images (or float ones in [0, 1]) -> the float images the networks of `cfg` take: [0, 1]
    for the reference recipe; for the authors' recipe [-1, 1] (their scaling) at cfg.image_size
    (Sprites: 60 -> 32)."""
    u8 = images.dtype == torch.uint8
    if getattr(cfg, "recipe", "reference") != "authors":
        return to_float(images) if u8 else images
    x = images.float().mul_(2 / 255).sub_(1) if u8 else images * 2 - 1
    return x if x.shape[-1] == cfg.image_size else area_resize(x, cfg.image_size)


def display_images(x, cfg=None):
    """The networks' images (model_images, decoder outputs) -> [0, 1] for saving and plotting."""
    return (x + 1) / 2 if getattr(cfg, "recipe", "reference") == "authors" else x


@torch.no_grad()
def swap_grid(encoder, decoder, x_style, x_class):
    """The paper's figure as a (rows, cols, C, H, W) tensor of images.

    The top row holds the images that give the class code s, the left column those
    that give the style z (the mean of q(z|x)); cell (i, j) is dec(z_i, s_j).
    The empty top-left corner takes the images' background colour, so that it reads as blank
    (a white corner stands out on MNIST's black).
    """
    mu, _, _ = encoder(x_style)
    _, _, s = encoder(x_class)
    nz, ns = len(x_style), len(x_class)
    cells = decoder(mu.repeat_interleave(ns, 0), s.repeat(nz, 1))
    grid = torch.ones(nz + 1, ns + 1, *x_style.shape[1:], device=x_style.device)
    grid[0, 0] = image_background(torch.cat([x_style, x_class]))[:, None, None]
    grid[0, 1:] = x_class
    grid[1:, 0] = x_style
    grid[1:, 1:] = cells.view(nz, ns, *x_style.shape[1:])
    return grid


def save_grid_png(grid, path):
    """Write a (rows, cols, C, H, W) image grid as one PNG."""
    from torchvision.utils import save_image  # here: torchvision is slow to import, grids are rare
    with atomic_write(path, "the swap grid") as f:
        save_image(grid.flatten(0, 1).float().cpu(), f, format="png", nrow=grid.shape[1], padding=2, pad_value=0.5)


# ----------------------------------------------------------------------------- pretrained files

# train.py's arguments that do not change what is trained: where it reads and writes, and what it
# reports. A pretrained file keeps every other argument (the record of its run) and none of these:
# a data folder or run folder of the machine that trained it means nothing on another.
NOT_TRAINING_ARGS = ("data_root", "run_dir", "resume", "overwrite", "checkpoint_every", "keep_checkpoints",
                     "log_every", "sample_every", "progress", "dist_timeout")


def training_args(args):
    """The arguments of a checkpoint's args dict that change training (all but NOT_TRAINING_ARGS)."""
    return {k: v for k, v in (args or {}).items() if k not in NOT_TRAINING_ARGS}


def export_pretrained(ckpt_path, out_path, allow_dirty=False):
    """Write the small file evaluation needs: encoder, decoder, model config and the training args
    (training_args: no data or run folder), without discriminator, optimisers, sampler or RNG
    states. Returns the dict written.

    A checkpoint trained from uncommitted changes (code version '...-dirty') is refused unless
    `allow_dirty`: no commit holds the code that made such weights, which a shared file should say
    out loud rather than in a suffix nobody reads."""
    ckpt = load_checkpoint(ckpt_path)
    build_models(ckpt)  # refuse to export weights that do not fit their own config
    code = str((ckpt.get("versions") or {}).get("code", ""))
    if code.endswith("-dirty") and not allow_dirty:
        raise UserError(f"'{ckpt_path}' was trained from uncommitted changes (code {code}): export a checkpoint "
                        f"trained from committed code, or pass --allow-dirty (the file then records '{code}')")
    small = {"format": CHECKPOINT_FORMAT, "model_config": ckpt["model_config"],
             "args": training_args(ckpt.get("args")),
             "encoder": ckpt["encoder"], "decoder": ckpt["decoder"],
             "step": ckpt.get("step"), "epoch": ckpt.get("epoch"), "versions": ckpt.get("versions")}
    atomic_save(small, out_path, "the pretrained file")
    return small


def checkpoint_dataset(ckpt):
    """The dataset name a checkpoint was trained on."""
    name = (ckpt.get("args") or {}).get("dataset")
    if not name:
        raise CheckpointError(f"checkpoint '{ckpt.get('path')}' does not say which dataset it was trained on "
                              f"(no args.dataset)")
    return name


# ----------------------------------------------------------------------------- the model API

class ModelInputError(UserError, ValueError):
    """Images or codes the model cannot take (other shape, channels, dtype or range): a ValueError for
    Python callers, one line for the command line."""


class TrainedModel(nn.Module):
    """A trained encoder and decoder with the verbs of the paper's figures (load_model makes one).

    Images in and out are float tensors in [0, 1] of shape (N, C, H, W); uint8 ones in [0, 255],
    and (N, H, W) for one-channel data, are accepted too. The range the recipe's networks work in
    ([-1, 1] for the authors' recipe) stays inside. The verbs run without gradients, on the model's
    device (inputs are moved there); `encoder`, `decoder` and `cfg` are the networks and their config.
    """

    def __init__(self, cfg, encoder, decoder, checkpoint=None):
        super().__init__()
        self.cfg, self.encoder, self.decoder = cfg, encoder, decoder
        self.checkpoint = checkpoint or {}  # path, step, args, versions: no weights
        # The authors' networks also take the dataset's own size (Sprites 60), resized as in training.
        dataset = (self.checkpoint.get("args") or {}).get("dataset")
        native = CONFIGS[dataset].image_size if cfg.recipe == "authors" and dataset in CONFIGS else cfg.image_size
        self.input_sizes = sorted({cfg.image_size, native})
        self.eval()

    @property
    def device(self):
        return next(self.decoder.parameters()).device

    def expected_shape(self):
        c = self.cfg.channels
        shapes = [f"(N, {c}, {n}, {n})" for n in self.input_sizes]
        shapes += [f"(N, {n}, {n})" for n in self.input_sizes] if c == 1 else []
        return " or ".join(shapes)

    def network_images(self, images, what="images"):
        """Images in [0, 1] (or uint8) -> the networks' input on the model's device."""
        if not torch.is_tensor(images):
            raise ModelInputError(f"{what}: expected a tensor of shape {self.expected_shape()}, "
                                  f"got {type(images).__name__}")
        x = images.unsqueeze(1) if images.dim() == 3 and self.cfg.channels == 1 else images
        if x.dim() != 4 or x.shape[1] != self.cfg.channels or x.shape[2] != x.shape[3] \
                or x.shape[3] not in self.input_sizes:
            raise ModelInputError(f"{what}: expected images of shape {self.expected_shape()}, got {tuple(images.shape)}")
        if x.is_floating_point():
            x = x.float()
            if x.numel() and (x.min() < 0 or x.max() > 1):
                raise ModelInputError(f"{what}: float images must lie in [0, 1] (uint8 ones in [0, 255]), "
                                      f"got values in [{x.min().item():.3g}, {x.max().item():.3g}]")
        elif x.dtype != torch.uint8:
            raise ModelInputError(f"{what}: expected float images in [0, 1] or uint8 ones, got {x.dtype}")
        return model_images(x.to(self.device), self.cfg)

    def randn(self, shape, generator):
        """N(0, I) draws from `generator` (on its own device, so a CPU generator gives the same
        numbers whatever the model's device), or from the global RNG."""
        device = generator.device if generator is not None else self.device
        return torch.randn(shape, generator=generator, device=device).to(self.device)

    @torch.no_grad()
    def encode(self, images, sample=False, generator=None):
        """images -> (z (N, style_dim), s (N, class_dim)): z the mean of q(z|x), or with sample=True
        one draw mu + sigma * eps from it (eps from `generator` where given)."""
        mu, logvar, s = self.encoder(self.network_images(images))
        if sample:
            mu = reparameterize(mu, logvar, self.randn(mu.shape, generator))
        return mu, s

    @torch.no_grad()
    def decode(self, z, s):
        """(z (N, style_dim), s (N, class_dim)) -> images (N, C, H, W) in [0, 1]."""
        want = {"z": self.cfg.style_dim, "s": self.cfg.class_dim}
        for name, code in (("z", z), ("s", s)):
            if not torch.is_tensor(code) or code.dim() != 2 or code.shape[1] != want[name]:
                got = tuple(code.shape) if torch.is_tensor(code) else type(code).__name__
                raise ModelInputError(f"{name}: expected a code of shape (N, {want[name]}), got {got}")
        if len(z) != len(s):
            raise ModelInputError(f"z and s: one of each per image, got {len(z)} and {len(s)}")
        return display_images(self.decoder(z.float().to(self.device), s.float().to(self.device)), self.cfg)

    @torch.no_grad()
    def swap(self, style_images, class_images):
        """dec(z of style_images[i], s of class_images[i]) for each i: images (N, C, H, W) in [0, 1]
        (z the mean of q(z|x))."""
        x_style = self.network_images(style_images, "style_images")
        x_class = self.network_images(class_images, "class_images")
        if len(x_style) != len(x_class):
            raise ModelInputError(f"swap takes one class image per style image, got {len(x_style)} style and "
                                  f"{len(x_class)} class images")
        z, _, _ = self.encoder(x_style)
        _, _, s = self.encoder(x_class)
        return self.decode(z, s)

    @torch.no_grad()
    def sample(self, class_images, generator=None):
        """dec(z ~ N(0, I), s of class_images[i]) for each i (z from `generator` where given)."""
        _, _, s = self.encoder(self.network_images(class_images, "class_images"))
        return self.decode(self.randn((len(s), self.cfg.style_dim), generator), s)


def load_model(path, device="cpu"):
    """The TrainedModel of a training checkpoint, a run directory or a pretrained/ file (either
    recipe), in evaluation mode on `device` ("auto": as --device auto, see pick_device). The same loader
    serves every evaluation script."""
    ckpt = load_checkpoint(path)
    cfg, encoder, decoder = build_models(ckpt, pick_device(str(device)))
    info = {k: ckpt[k] for k in ("path", "step", "epoch", "args", "versions", "model_config") if k in ckpt}
    return TrainedModel(cfg, encoder, decoder, info)
