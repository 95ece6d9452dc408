"""Datasets as whole tensors, and the same-class pair sampler.

Each dataset is loaded once into an ImageSet: every image as one uint8 tensor
(N, C, H, W) plus its class labels. Training moves the whole set to the training
device and draws pairs by index, so the hot loop does no per-item Python work.
"""
import os
from dataclasses import dataclass, field

import torch

from utils import UserError

DATA_ROOT_ENV = "DISENTANGLE_DATA_ROOT"
NO_DOWNLOAD_ENV = "DISENTANGLE_NO_DOWNLOAD"  # set to 1 to forbid any download (tests, offline clusters)
DEFAULT_DATA_ROOT = "./data"


class DataError(UserError):
    """Missing, unreadable or malformed data."""


@dataclass
class ImageSet:
    images: torch.Tensor          # uint8 (N, C, H, W)
    labels: torch.Tensor          # int64 (N,), the specified factor (class / identity / object)
    num_classes: int
    factors: dict = field(default_factory=dict)  # other per-image labels, name -> int64 (N,)

    def __len__(self):
        return len(self.labels)


def default_data_root():
    return os.environ.get(DATA_ROOT_ENV, DEFAULT_DATA_ROOT)


def downloads_allowed():
    return os.environ.get(NO_DOWNLOAD_ENV, "0") in ("", "0")


# ----------------------------------------------------------------------------- MNIST

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def load_mnist(root, split="train"):
    """MNIST through torchvision from <root>/MNIST/raw/, downloading only where allowed."""
    from torchvision.datasets import MNIST

    if split not in MNIST_FILES:
        raise DataError(f"MNIST has no '{split}' split (choose train or test)")
    raw = os.path.join(root, "MNIST", "raw")
    missing = [f for f in MNIST_FILES[split] if not os.path.isfile(os.path.join(raw, f))]
    if missing:
        hint = (f"MNIST files missing: put {', '.join(missing)} (uncompressed) in {raw}/, "
                f"or run online so torchvision can download them")
        if not downloads_allowed():
            raise DataError(hint + f" ({NO_DOWNLOAD_ENV} is set, so nothing is downloaded)")
        try:
            MNIST(root, train=split == "train", download=True)
        except Exception as e:  # offline: one clear message instead of a urllib traceback
            raise DataError(f"{hint}; download failed: {e.__class__.__name__}: {e}") from None
    try:
        ds = MNIST(root, train=split == "train", download=False)
        images, labels = ds.data, ds.targets
    except Exception as e:
        raise DataError(f"could not read MNIST {split} files in {raw}/ (truncated or corrupted? "
                        f"check them against the MD5s in the README): {e.__class__.__name__}: {e}") from None
    if images.dim() != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels) \
            or len(labels) == 0 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"MNIST {split} files in {raw}/ are malformed: images {tuple(images.shape)}, "
                        f"labels {tuple(labels.shape)}")
    return ImageSet(images.unsqueeze(1).contiguous(), labels.long(), 10)


DATASETS = {
    "mnist": load_mnist,
}


def load_dataset(name, root, split="train"):
    """The ImageSet of `split` of dataset `name` under `root`."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}' (choose from {', '.join(sorted(DATASETS))})")
    if not os.path.isdir(root):
        if os.path.abspath(root) == os.path.abspath(DEFAULT_DATA_ROOT) and downloads_allowed():
            os.makedirs(root, exist_ok=True)  # the default root is made for a first download
        else:
            raise DataError(f"data root '{root}' does not exist")
    return DATASETS[name](root, split)


# ----------------------------------------------------------------------------- pairs

class PairSampler:
    """Anchors in a fresh random order each epoch; for each anchor a random partner of its class.

    Every draw comes from one seeded torch.Generator on the sampler's device, and the
    state (generator, current permutation, position) round-trips through state_dict(),
    so a resumed run draws exactly the pairs an uninterrupted one would.
    """

    def __init__(self, labels, seed, device="cpu"):
        labels = labels.to(device)
        self.device = torch.device(device)
        self.n = len(labels)
        self.labels = labels
        self.order = torch.argsort(labels, stable=True)       # indices grouped by class
        self.counts = torch.bincount(labels)                   # images per class
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(seed)
        self.perm = torch.randperm(self.n, generator=self.gen, device=self.device)
        self.pos = 0

    def anchors(self, batch_size):
        if self.pos + batch_size > self.n:
            self.perm = torch.randperm(self.n, generator=self.gen, device=self.device)
            self.pos = 0
        idx = self.perm[self.pos:self.pos + batch_size]
        self.pos += batch_size
        return idx

    def partners(self, idx):
        """For each index, a uniformly drawn index of the same class (possibly itself)."""
        c = self.labels[idx]
        u = torch.rand(len(idx), generator=self.gen, device=self.device)
        off = torch.minimum((u * self.counts[c]).long(), self.counts[c] - 1)
        return self.order[self.starts[c] + off]

    def pairs(self, batch_size):
        a = self.anchors(batch_size)
        return a, self.partners(a)

    def state_dict(self):
        return {"gen": self.gen.get_state(), "perm": self.perm.cpu(), "pos": self.pos}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])
        self.perm = state["perm"].to(self.device)
        self.pos = int(state["pos"])
