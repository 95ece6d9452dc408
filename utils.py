"""Shared helpers: errors, devices, seeding, checkpoints, swap grids."""
import argparse
import errno
import os
import platform
import random
import subprocess
import sys
import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

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
    import torchvision
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
    """Every output file of the project is written through this: the block writes into a temporary
    file beside `path`, which is then fsynced and renamed over `path`. A crash at any moment leaves
    either the previous file or the new one, never a partial one; a failure (disk full, an
    exception inside torch.save, ...) also removes the temporary file, so the space is back, and
    an OSError becomes a WriteError naming `what` and `path`. The folder is made if missing."""
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
    from networks import config_from_dict, network_classes
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
    edges = torch.arange(size + 1, dtype=torch.float64) * n / size
    j = torch.arange(n, dtype=torch.float64)
    cover = (torch.minimum(edges[1:, None], j + 1) - torch.maximum(edges[:-1, None], j)).clamp(min=0)
    w = (cover / (edges[1:] - edges[:-1])[:, None]).to(x.device, x.dtype)  # (size, n), rows sum to 1
    return w @ x @ w.T


def model_images(images_u8, cfg=None):
    """uint8 images -> the float images the networks of `cfg` take: [0, 1] for the reference
    recipe; for the authors' recipe [-1, 1] (their scaling) at cfg.image_size (Sprites: 60 -> 32)."""
    if getattr(cfg, "recipe", "reference") != "authors":
        return to_float(images_u8)
    x = images_u8.float().mul_(2 / 255).sub_(1)
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
    from torchvision.utils import save_image
    with atomic_write(path, "the swap grid") as f:
        save_image(grid.flatten(0, 1).float().cpu(), f, format="png", nrow=grid.shape[1], padding=2, pad_value=0.5)


# ----------------------------------------------------------------------------- evaluation
#
# Shared by classify_latents.py, tsne_plot.py and scripts/: loading a checkpoint's data,
# encoding it, the classifier split, the latent classifiers and the swap accuracy.

Z_SOURCES = ("mean", "sample")
PRETRAINED_ARGS = ("dataset", "style_dim", "class_dim", "seed", "data_root",
                   "linemod_train_split", "linemod_eval_split", "min_visibility")


def export_pretrained(ckpt_path, out_path, allow_dirty=False):
    """Write the small file evaluation needs: encoder, decoder, model config and a few args
    (no discriminator, optimisers, sampler or RNG states). Returns the dict written.

    A checkpoint trained from uncommitted changes (code version '...-dirty') is refused unless
    `allow_dirty`: no commit holds the code that made such weights, which a shared file should say
    out loud rather than in a suffix nobody reads."""
    ckpt = load_checkpoint(ckpt_path)
    build_models(ckpt)  # refuse to export weights that do not fit their own config
    code = str((ckpt.get("versions") or {}).get("code", ""))
    if code.endswith("-dirty") and not allow_dirty:
        raise UserError(f"'{ckpt_path}' was trained from uncommitted changes (code {code}): export a checkpoint "
                        f"trained from committed code, or pass --allow-dirty (the file then records '{code}')")
    args = ckpt.get("args") or {}
    small = {"format": CHECKPOINT_FORMAT, "model_config": ckpt["model_config"],
             "args": {k: args[k] for k in PRETRAINED_ARGS if k in args},
             "encoder": ckpt["encoder"], "decoder": ckpt["decoder"],
             "step": ckpt.get("step"), "versions": ckpt.get("versions")}
    atomic_save(small, out_path, "the pretrained file")
    return small


def checkpoint_dataset(ckpt):
    """The dataset name a checkpoint was trained on."""
    name = (ckpt.get("args") or {}).get("dataset")
    if not name:
        raise CheckpointError(f"checkpoint '{ckpt.get('path')}' does not say which dataset it was trained on "
                              f"(no args.dataset)")
    return name


def load_eval_data(ckpt, data_root=None, split="test"):
    """The ImageSet of `split` of the checkpoint's dataset; the data root is --data-root if given,
    else the checkpoint's own, else the default one."""
    from data_loader import DataError, dataset_options, default_data_root, load_dataset
    args = ckpt.get("args") or {}
    root = data_root or args.get("data_root") or default_data_root()
    try:  # dataset options (e.g. LINEMOD's BOP splits) as the checkpoint was trained with
        return load_dataset(checkpoint_dataset(ckpt), root, split, **dataset_options(args))
    except DataError as e:
        if data_root:
            raise
        raise DataError(f"{e} (the data root comes from the checkpoint; pass --data-root to use another)") from None


@torch.no_grad()
def encode_dataset(encoder, images_u8, batch_size=1000, z_source="mean", generator=None, cfg=None):
    """Codes of uint8 images (N, C, H, W) -> (z (N, style_dim), s (N, class_dim)) on the CPU.

    z is the mean of q(z|x), or with z_source="sample" one reparameterised draw
    mu + sigma * eps (the reference's choice), eps from `generator` (a CPU torch.Generator).
    Each image is encoded on its own statistics (instance norm), so batching changes nothing
    beyond float rounding.
    """
    from networks import reparameterize
    if z_source not in Z_SOURCES:
        raise ValueError(f"z_source must be one of {Z_SOURCES}, got {z_source!r}")
    device = next(encoder.parameters()).device
    zs, ss = [], []
    for i in range(0, len(images_u8), batch_size):
        mu, logvar, s = encoder(model_images(images_u8[i:i + batch_size].to(device), cfg))
        if z_source == "sample":
            eps = torch.randn(mu.shape, generator=generator).to(device)
            mu = reparameterize(mu, logvar, eps)
        zs.append(mu.float().cpu())
        ss.append(s.float().cpu())
    return torch.cat(zs), torch.cat(ss)


@torch.no_grad()
def posterior_codes(encoder, images_u8, batch_size=1000):
    """mu and log-variance of q(z|x), and s, of uint8 images (N, C, H, W), on the CPU."""
    device = next(encoder.parameters()).device
    out = [encoder(to_float(images_u8[i:i + batch_size].to(device))) for i in range(0, len(images_u8), batch_size)]
    return tuple(torch.cat([o[k].float().cpu() for o in out]) for k in range(3))


def posterior_stats(mu, logvar):
    """Where q(z|x) = N(mu, sigma^2) sits against the prior N(0, I), averaged over images:
    mean sigma, mean |mu|, and KL(q(z|x) || N(0, I)) per dimension in nats (the training loss
    sums it over the code and divides by pixels instead). A dimension near 0 nats carries nothing."""
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)  # (N, D) nats
    return {"sigma_mean": torch.exp(0.5 * logvar).mean().item(), "abs_mu_mean": mu.abs().mean().item(),
            "kl_per_dim": kl.mean().item(), "kl_each_dim": kl.mean(0).tolist()}


def same_class_pairs(labels, num_pairs, generator):
    """num_pairs index pairs (i, j), i != j of the same class: i uniform over the images whose
    class has two or more, j uniform over the other images of that class. None if no class has two."""
    n = len(labels)
    order = torch.argsort(labels, stable=True)  # indices grouped by class
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n) - starts[labels[order]]  # each image's place within its class
    eligible = torch.nonzero(counts[labels] >= 2).flatten()
    if len(eligible) == 0:
        return None
    i = eligible[torch.randint(0, len(eligible), (num_pairs,), generator=generator)]
    c = labels[i]
    off = torch.randint(0, 2 ** 62, (num_pairs,), generator=generator) % (counts[c] - 1) + 1  # 1 .. n_c - 1
    return i, order[starts[c] + (rank[i] + off) % counts[c]]


@torch.no_grad()
def swap_errors(decoder, images_u8, labels, mu, s, num_pairs, seed, batch_size=1000):
    """Per-pixel mean squared error against x_i of dec(z_i, s_i) ("reconstruction") and of
    dec(z_i, s_j) for random same-class pairs i != j ("same_class_swap"), z = the mean mu of
    q(z|x). A z that carries no style cannot put x_i's style back, so its swap error is high.
    Both None (0 pairs) where no class has two images."""
    device = next(decoder.parameters()).device
    pairs = same_class_pairs(labels, num_pairs, torch.Generator().manual_seed(seed))
    if pairs is None:
        return {"reconstruction": None, "same_class_swap": None, "pairs": 0}
    i, j = pairs
    total = {"reconstruction": 0.0, "same_class_swap": 0.0}
    for k in range(0, num_pairs, batch_size):
        bi, bj = i[k:k + batch_size], j[k:k + batch_size]
        x, z = to_float(images_u8[bi]).to(device), mu[bi].to(device)
        for name, s_src in (("reconstruction", bi), ("same_class_swap", bj)):
            total[name] += (decoder(z, s[s_src].to(device)).float() - x).pow(2).flatten(1).mean(1).double().sum().item()
    return {**{k: v / num_pairs for k, v in total.items()}, "pairs": num_pairs}


def classes_are_shared(train_labels, test_labels):
    """The split rule: True when every class of the test split also occurs in the train split."""
    return bool(torch.isin(torch.unique(test_labels), torch.unique(train_labels)).all())


def per_class_split(labels, test_fraction, seed):
    """Seeded split of indices into (fit, test), within every class: round(test_fraction * n_c)
    of class c's n_c images go to test, so every class with two or more images is on both sides."""
    g = torch.Generator().manual_seed(seed)
    fit, test = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = min(int(round(test_fraction * len(idx))), len(idx) - 1)
        if len(idx) >= 2:
            n_test = max(n_test, 1)
        test.append(idx[:n_test])
        fit.append(idx[n_test:])
    return torch.sort(torch.cat(fit)).values, torch.sort(torch.cat(test)).values


def classifier_sets(train_set, test_set, seed, test_fraction=0.2):
    """The images the latent classifiers are fitted on and tested on, by one rule for every dataset.

    - The test split's classes all occur in the train split (MNIST: the same ten digits):
      fit on the train split, test on the test split.
    - The test split holds classes the train split lacks (Sprites: identities unseen in
      training): a classifier cannot name a class it never saw, so the test split alone is
      the pool, split within each class (seeded, `test_fraction` of each class to the test
      side): every identity is on both sides, on disjoint images, and the encoder saw none of them.

    Returns (fit ImageSet, test ImageSet, description of the rule used).
    """
    from data_loader import ImageSet
    # Sprites numbers identities 0..K-1 within each split; factors["identity"] is the global number.
    ids = [s.factors.get("identity", s.labels) for s in (train_set, test_set)]
    if classes_are_shared(*ids):
        return train_set, test_set, "splits: classifiers fitted on the train split, tested on the test split"
    fit, test = per_class_split(test_set.labels, test_fraction, seed)

    def subset(idx):
        return ImageSet(test_set.images[idx], test_set.labels[idx], test_set.num_classes,
                        {k: v[idx] for k, v in test_set.factors.items()})

    return subset(fit), subset(test), (
        f"within-class: the test split's classes are unseen in training, so its images are split "
        f"within each class ({1 - test_fraction:.0%} fit / {test_fraction:.0%} test, seed {seed})")


def integer_factors(image_set):
    """The names of the set's per-image integer factors with at least two values (others are skipped)."""
    return [k for k, v in image_set.factors.items()
            if torch.is_tensor(v) and v.dim() == 1 and not v.is_floating_point() and not v.is_complex()
            and len(torch.unique(v)) > 1]


def dense_labels(fit_labels, test_labels):
    """Labels renumbered 0..K-1 over the classes present in either set; returns (fit, test, K)."""
    classes, inverse = torch.unique(torch.cat([fit_labels, test_labels]), return_inverse=True)
    return inverse[:len(fit_labels)], inverse[len(fit_labels):], len(classes)


def chance_level(labels):
    """Accuracy of always answering the most frequent class of these labels."""
    return torch.bincount(labels).max().item() / len(labels)


def train_classifier(features, labels, num_classes, seed, epochs=10, batch_size=256, lr=1e-3):
    """The reference latent classifier (networks.Classifier) fitted with Adam on (features, labels).

    Deterministic for a seed: the weights and the batch order come from seeded generators, and
    the global RNG is left as it was.
    """
    from networks import Classifier
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(features.shape[1], num_classes)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    n = len(features)
    from tqdm import tqdm
    for _ in tqdm(range(epochs), desc="latent classifier", unit="epoch", leave=False):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            loss = F.cross_entropy(model(features[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict(model, inputs, batch_size=2000, cfg=None):
    """Arg-max class of each input (codes, or uint8 images converted batch by batch as the networks
    of `cfg` take them), in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(inputs), batch_size):
        x = inputs[i:i + batch_size].to(device)
        out.append(model(model_images(x, cfg) if x.dtype == torch.uint8 else x).argmax(1).cpu())
    return torch.cat(out)


def accuracy(model, inputs, labels, batch_size=2000, cfg=None):
    return (predict(model, inputs, batch_size, cfg) == labels).float().mean().item()


def linear_probe(fit_x, fit_y, test_x, test_y, seed, max_iter=200):
    """Multinomial logistic regression on standardised codes (scikit-learn): (fit acc, test acc)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings():  # too few iterations is a weaker probe, not an error
        warnings.simplefilter("ignore", category=UserWarning)
        from sklearn.exceptions import ConvergenceWarning
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        probe.fit(fit_x.numpy(), fit_y.numpy())
    return probe.score(fit_x.numpy(), fit_y.numpy()), probe.score(test_x.numpy(), test_y.numpy())


def train_image_classifier(images_u8, labels, num_classes, cfg, seed, steps=500, batch_size=128, lr=1e-3,
                           device="cpu"):
    """A plain CNN (networks.ImageClassifier) trained on real images, the judge of swapped images."""
    from networks import ImageClassifier
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ImageClassifier(cfg, num_classes).to(device)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    perm, pos = torch.randperm(len(labels), generator=g), 0
    from tqdm import tqdm
    for _ in tqdm(range(steps), desc="image classifier", unit="step", leave=False):
        if pos + batch_size > len(labels):
            perm, pos = torch.randperm(len(labels), generator=g), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        loss = F.cross_entropy(model(model_images(images_u8[idx].to(device), cfg)), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def random_pairs(n, num_pairs, generator):
    """num_pairs index pairs (i, j) with i != j, drawn uniformly from range(n)."""
    i = torch.randint(0, n, (num_pairs,), generator=generator)
    j = (i + torch.randint(1, n, (num_pairs,), generator=generator)) % n  # j != i, uniform over the rest
    return i, j


@torch.no_grad()
def swap_accuracy(encoder, decoder, judge, images_u8, labels, num_pairs, seed, batch_size=1000, cfg=None):
    """How often a classifier of real images names the class of the s-source in a swapped image.

    For random pairs i != j: dec(z_i, s_j) with z_i the style mean of image i, and
    dec(z ~ N(0, I), s_j). Returns the share of each labelled class(j) ("swap", "prior"), and,
    among pairs of different classes, the share of dec(z_i, s_j) labelled class(i)
    ("style_leak": the class travelling with z instead of s). "by_class" splits "swap" and
    "prior" by class(j): one row per class of `labels`, its share None where no pair drew it.
    """
    device = next(decoder.parameters()).device
    style_dim = decoder.style_in.in_features
    g = torch.Generator().manual_seed(seed)
    i, j = random_pairs(len(labels), num_pairs, g)
    prior_z = torch.randn(num_pairs, style_dim, generator=g)
    hits = {"swap": [], "prior": [], "leak": []}
    for k in range(0, num_pairs, batch_size):
        bi, bj = i[k:k + batch_size], j[k:k + batch_size]
        mu, _, _ = encoder(model_images(images_u8[bi].to(device), cfg))
        _, _, s = encoder(model_images(images_u8[bj].to(device), cfg))
        swapped = judge(decoder(mu, s)).argmax(1).cpu()
        prior = judge(decoder(prior_z[k:k + batch_size].to(device), s)).argmax(1).cpu()
        hits["swap"].append(swapped == labels[bj])
        hits["prior"].append(prior == labels[bj])
        hits["leak"].append((swapped == labels[bi])[labels[bi] != labels[bj]])
    share = {k: torch.cat(v).float() for k, v in hits.items()}
    by_class = []
    for c in torch.unique(labels).tolist():
        drawn = labels[j] == c
        n = int(drawn.sum())
        by_class.append({"class": c, "pairs": n, **{k: share[k][drawn].mean().item() if n else None
                                                     for k in ("swap", "prior")}})
    return {"swap": share["swap"].mean().item(), "prior": share["prior"].mean().item(),
            "style_leak": share["leak"].mean().item() if len(share["leak"]) else float("nan"),
            "pairs": num_pairs, "by_class": by_class}
