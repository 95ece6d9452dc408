"""Datasets as whole tensors, the same-class pair sampler and the authors' triplet sampler.

Each dataset is loaded once into an ImageSet: every image as one uint8 tensor
(N, C, H, W) plus its class labels. Training moves the whole set to the training
device and draws pairs by index, so the hot loop does no per-item Python work.
"""
import hashlib
import json
import math
import os
import re
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from utils import UserError, WriteError, atomic_save

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


CACHE_DIR_ENV = "DISENTANGLE_CACHE_DIR"


def cache_dir():
    """Where derived data (e.g. the rendered sprites) is kept: $DISENTANGLE_CACHE_DIR, else
    $XDG_CACHE_HOME/disentangle, else ~/.cache/disentangle. Never inside the data root."""
    if os.environ.get(CACHE_DIR_ENV):
        return os.environ[CACHE_DIR_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "disentangle")


# ----------------------------------------------------------------------------- MNIST

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def load_mnist(root, split="train"):
    """MNIST through torchvision from <root>/MNIST/raw/, downloading only where allowed."""
    from torchvision.datasets import MNIST  # here, not at the top: torchvision takes a second to import

    if split not in MNIST_FILES:
        raise DataError(f"MNIST has no '{split}' split (choose train or test)")
    raw = os.path.join(root, "MNIST", "raw")
    missing = [f for f in MNIST_FILES[split] if not os.path.isfile(os.path.join(raw, f))]
    if missing:
        hint = (f"MNIST files missing: put {', '.join(missing)} (uncompressed) in {raw}/ (or point --data-root "
                f"or ${DATA_ROOT_ENV} at a folder whose MNIST/raw/ holds them), or run online so torchvision "
                f"can download them")
        if not downloads_allowed():
            raise DataError(hint + f" ({NO_DOWNLOAD_ENV} is set, so nothing is downloaded)")
        try:
            MNIST(root, train=split == "train", download=True)
        except Exception as e:  # offline: one clear message instead of a urllib traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""  # torchvision lists every mirror tried
            raise DataError(f"{hint}; download failed: {e.__class__.__name__}: {first}") from None
    try:
        ds = MNIST(root, train=split == "train", download=False)
        images, labels = ds.data, ds.targets
    except Exception as e:
        raise DataError(f"could not read MNIST {split} files in {raw}/ (truncated or corrupted? "
                        f"check them against the MD5s in docs/datasets.md): {e.__class__.__name__}: {e}") from None
    if images.dim() != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels) \
            or len(labels) == 0 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"MNIST {split} files in {raw}/ are malformed: images {tuple(images.shape)}, "
                        f"labels {tuple(labels.shape)}")
    return ImageSet(images.unsqueeze(1).contiguous(), labels.long(), 10)


def load_dataset(name, root, split="train", **options):
    """The ImageSet of `split` of dataset `name` under `root`; options go to the dataset's loader
    (see dataset_options)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}' (choose from {', '.join(sorted(DATASETS))})")
    if not os.path.isdir(root):
        if os.path.abspath(root) == os.path.abspath(DEFAULT_DATA_ROOT) and downloads_allowed():
            os.makedirs(root, exist_ok=True)  # the default root is made for a first download
        else:
            raise DataError(f"data root '{root}' does not exist")
    return DATASETS[name](root, split, **options)


# ----------------------------------------------------------------------------- pairs

class PairSampler:
    """Anchors in a fresh random order each epoch; for each anchor a random partner of its class.

    frozen=True reproduces the reference's stream instead: it wrapped its DataLoader in
    itertools.cycle, which stores the first pass, so every epoch replays the same batches in the
    same order, each image with the one partner drawn for it at the start. Here: one order and
    one partner per image drawn at the start, the order replayed whenever it runs out.

    Every draw comes from one seeded torch.Generator on the sampler's device, and the
    state (generator, current permutation, position) round-trips through state_dict(),
    so a resumed run draws exactly the pairs an uninterrupted one would.
    """

    def __init__(self, labels, seed, device="cpu", frozen=False):
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
        self.frozen = frozen
        self.partner = self.partners(torch.arange(self.n, device=self.device)) if frozen else None

    def anchors(self, batch_size):
        if self.pos + batch_size > self.n:  # an epoch is over (the last incomplete batch is dropped)
            if not self.frozen:
                self.perm = torch.randperm(self.n, generator=self.gen, device=self.device)
            self.pos = 0
        idx = self.perm[self.pos:self.pos + batch_size]
        self.pos += batch_size
        return idx

    def partners(self, idx, u=None):
        """For each index, a uniformly drawn index of the same class (possibly itself); `u`: the
        uniform draws to use, drawn here if not given."""
        c = self.labels[idx]
        if u is None:
            u = torch.rand(len(idx), generator=self.gen, device=self.device)
        off = torch.minimum((u * self.counts[c]).long(), self.counts[c] - 1)
        return self.order[self.starts[c] + off]

    def pairs(self, batch_size):
        a = self.anchors(batch_size)
        return a, self.partner[a] if self.frozen else self.partners(a)

    def draw(self, kinds, batch_size):
        """The batches of one iteration as one index tensor, for one gather: for each entry of `kinds`,
        "anchors" (batch_size anchors) or "pairs" (batch_size anchors, then their partners), in order.
        The generator is drawn in the order of the same anchors()/pairs() calls (an epoch's new
        order between two pairs' partner draws stays there), so the batches are theirs."""
        pieces, slots, u = [], [], []
        for kind in kinds:
            pieces.append(self.anchors(batch_size))
            if kind == "pairs":
                slots.append(len(pieces))
                pieces.append(None)  # the partners, filled in below, all in one go
                if not self.frozen:
                    u.append(torch.rand(batch_size, generator=self.gen, device=self.device))
        if slots:
            a = torch.cat([pieces[i - 1] for i in slots])
            partners = self.partner[a] if self.frozen else self.partners(a, torch.cat(u))
            for k, i in enumerate(slots):
                pieces[i] = partners[k * batch_size:(k + 1) * batch_size]
        return torch.cat(pieces)

    def state_dict(self):
        state = {"gen": self.gen.get_state(), "perm": self.perm.cpu(), "pos": self.pos}
        return {**state, "partner": self.partner.cpu()} if self.frozen else state

    def load_state_dict(self, state, reseed=None):
        """Restore `state`; with `reseed`, seed the generator with it instead of restoring its state
        (a state saved on another device type cannot load on this one)."""
        if self.frozen != ("partner" in state):
            raise ValueError("the checkpoint's pair stream is " + ("frozen" if "partner" in state else "fresh"))
        if reseed is None:
            self.gen.set_state(state["gen"])
        else:
            self.gen.manual_seed(reseed)
        self.perm = state["perm"].to(self.device)
        self.pos = int(state["pos"])
        if self.frozen:
            self.partner = state["partner"].to(self.device)


class TripletSampler:
    """The authors' batches: for each row a class drawn uniformly (not by its share of the
    images), x1 and x2 two independent uniform draws of that class, and x3 a uniform draw of a
    second, independently drawn class (which may be the same one).

    Every draw comes from one seeded torch.Generator whose state round-trips through
    state_dict(), so a resumed run draws exactly the triplets an uninterrupted one would.
    """

    def __init__(self, labels, seed, device="cpu"):
        labels = labels.to(device)
        self.device = torch.device(device)
        self.order = torch.argsort(labels, stable=True)       # indices grouped by class
        self.counts = torch.bincount(labels)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.classes = torch.nonzero(self.counts).squeeze(1)  # classes that have images
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(seed)

    def draw(self, c):
        """A uniformly drawn image index of each class in c."""
        u = torch.rand(len(c), generator=self.gen, device=self.device)
        off = torch.minimum((u * self.counts[c]).long(), self.counts[c] - 1)
        return self.order[self.starts[c] + off]

    def triplets(self, batch_size):
        pick = torch.randint(len(self.classes), (2, batch_size), generator=self.gen, device=self.device)
        c12, c3 = self.classes[pick]
        return self.draw(c12), self.draw(c12), self.draw(c3)

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state, reseed=None):
        """As PairSampler.load_state_dict: `reseed` seeds the generator instead (another device type)."""
        if reseed is None:
            self.gen.set_state(state["gen"])
        else:
            self.gen.manual_seed(reseed)


def conditioning_labels(image_set):
    """The labels the authors' discriminator is conditioned on, (N, number of labels), and how
    many values each takes: the layer variants where the set has them (rendered Sprites: body,
    shoes, ... as their Sprites labels were per attribute), else the class alone."""
    names = [n for n in SPRITES_LAYERS if n in image_set.factors]
    if len(names) < len(SPRITES_LAYERS):
        return image_set.labels.unsqueeze(1), (image_set.num_classes,)
    labels = torch.stack([image_set.factors[n] for n in names], 1)
    return labels, tuple(int(v) + 1 for v in labels.max(0).values)


# ----------------------------------------------------------------------------- LINEMOD (BOP layout)
#
# LINEMOD (Hinterstoisser et al. 2012) as the BOP benchmark distributes it:
#   <root>/lm/<split>/<scene:06d>/rgb/<image:06d>.png   (.jpg in train_pbr)
#   <root>/lm/<split>/<scene:06d>/scene_gt.json         image id -> [{obj_id, cam_R_m2c, cam_t_m2c}, ...]
#   <root>/lm/<split>/<scene:06d>/scene_gt_info.json    image id -> [{bbox_obj, bbox_visib, visib_fract}, ...]
# Every annotated instance becomes one sample: a square crop around its bbox_obj (zero-padded
# where it leaves the image), resized to 64 x 64 RGB. The object is the specified factor
# (label = obj_id - 1); the viewpoint (the rotation cam_R_m2c) is the unspecified one.

LINEMOD_NUM_OBJECTS = 15         # BOP LM object ids are 1..15
LINEMOD_TRAIN_SPLIT = "train_pbr"  # rendered training images (BOP's PBR renders)
LINEMOD_EVAL_SPLIT = "test"      # photographed test images
LINEMOD_MIN_VISIBILITY = 0.1     # skip instances less visible than this (BOP's visib_fract)
LINEMOD_CROP_SCALE = 1.2         # crop side = 1.2 x the box's longer side: a little context around it
LINEMOD_HOLDOUT_EVERY = 10       # train split == eval split: images with id % 10 == 0 are held out for eval
LINEMOD_CACHE_FORMAT = "disentangle-linemod-cache-v1"

# train.py argument -> load_linemod keyword; dataset_options() passes them on
DATASET_OPTIONS = {"linemod": {"linemod_train_split": "train_split", "linemod_eval_split": "eval_split",
                               "min_visibility": "min_visibility"}}


def dataset_options(args):
    """The extra load_dataset keywords of args' dataset, from a Namespace or a checkpoint's args dict.

    Arguments a checkpoint lacks are left out, so the loader's defaults apply."""
    args = args if isinstance(args, dict) else vars(args)
    names = DATASET_OPTIONS.get(args.get("dataset"), {})
    return {kw: args[name] for name, kw in names.items() if args.get(name) is not None}


def linemod_cache_path(split_dir, part, min_visibility, image_size, crop_scale):
    """One cache file per (split folder, part, crop settings), in cache_dir(): outside the data
    folder, which may be read-only."""
    key = repr((os.path.abspath(split_dir), part, float(min_visibility), int(image_size), float(crop_scale),
                LINEMOD_HOLDOUT_EVERY))
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"linemod_{os.path.basename(split_dir)}_{part}_{digest}.pt")


def linemod_fingerprint(split_dir, scenes):
    """Sizes and mtimes of every scene's annotation files and image folder, and the image count:
    changes when annotations are edited or images are added or removed."""
    h = hashlib.sha1()
    for scene in scenes:
        d = os.path.join(split_dir, scene)
        for name in ("scene_gt.json", "scene_gt_info.json", "rgb"):
            p = os.path.join(d, name)
            st = os.stat(p) if os.path.exists(p) else None
            h.update(f"{scene}/{name}:{st and st.st_size}:{st and st.st_mtime_ns};".encode())
        rgb = os.path.join(d, "rgb")
        h.update(f"n={len(os.listdir(rgb)) if os.path.isdir(rgb) else -1};".encode())
    return h.hexdigest()


def _read_json(path):
    if not os.path.isfile(path):
        raise DataError(f"LINEMOD annotation file missing: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"could not read {path}: {e.__class__.__name__}: {e}") from None


def _numbers(value, n, path, where, field):
    """value as a list of n finite floats, or a DataError naming the file, image and field."""
    ok = isinstance(value, (list, tuple)) and len(value) == n and \
        all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok:
        raise DataError(f"{path}: {where}: '{field}' must be {n} finite numbers, got {value!r}")
    return [float(v) for v in value]


def viewpoint_bin(R, t):
    """Coarse viewpoint class 0..31 of rotations (N, 3, 3) and translations (N, 3) (model -> camera).

    The camera centre in object coordinates is c = -R^T t; its azimuth (8 bins of 45 degrees, about
    the object's z axis; 0 straight above or below) and elevation (4 bins of 45 degrees, -90..90)
    give bin = 8 * elev + azim.
    """
    c = -(R.transpose(1, 2) @ t.unsqueeze(2)).squeeze(2)                  # (N, 3)
    c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)
    azim = torch.remainder(torch.atan2(c[:, 1], c[:, 0]), 2 * torch.pi)  # [0, 2 pi)
    azim = torch.where(c[:, :2].norm(dim=1) < 1e-6, 0.0, azim)  # straight above / below: azimuth 0
    elev = torch.asin(c[:, 2].clamp(-1, 1))                               # [-pi/2, pi/2]
    a = (azim / (torch.pi / 4)).long().clamp(0, 7)
    e = ((elev + torch.pi / 2) / (torch.pi / 4)).long().clamp(0, 3)
    return 8 * e + a


def _linemod_instances(split_dir, scenes, part, min_visibility):
    """Pass 1, annotations only (so bad input fails before any image is decoded): per image,
    (image path, [(obj_id, R, t, bbox_obj, visib_fract, scene id, image id), ...])."""
    jobs = []
    for scene in scenes:
        d = os.path.join(split_dir, scene)
        gt_path, info_path = os.path.join(d, "scene_gt.json"), os.path.join(d, "scene_gt_info.json")
        gt, info = _read_json(gt_path), _read_json(info_path)
        if not isinstance(gt, dict) or not isinstance(info, dict):
            raise DataError(f"{gt_path if not isinstance(gt, dict) else info_path}: expected an object "
                            f"mapping image ids to instance lists")
        for key in sorted(gt, key=lambda k: int(k) if str(k).isdigit() else -1):
            if not str(key).isdigit():
                raise DataError(f"{gt_path}: image id '{key}' is not a number")
            im_id = int(key)
            if part != "all" and (im_id % LINEMOD_HOLDOUT_EVERY == 0) != (part == "test"):
                continue
            where = f"image {im_id}"
            insts, infos = gt[key], info.get(key)
            if infos is None:
                raise DataError(f"{info_path}: no entry for {where} (listed in {gt_path})")
            if not isinstance(insts, list) or not isinstance(infos, list) or len(insts) != len(infos):
                raise DataError(f"{info_path}: {where} has {len(infos) if isinstance(infos, list) else 'no list of'} "
                                f"instances but {gt_path} {len(insts) if isinstance(insts, list) else 'no list'} "
                                f"(both must list the same instances in the same order)")
            kept = []
            for k, (g, i) in enumerate(zip(insts, infos)):
                if not isinstance(g, dict) or not isinstance(i, dict):
                    raise DataError(f"{gt_path}: {where}, instance {k} is not an object")
                vis = i.get("visib_fract")
                if not isinstance(vis, (int, float)) or isinstance(vis, bool) or not 0 <= vis <= 1:
                    raise DataError(f"{info_path}: {where}, instance {k}: 'visib_fract' must be in [0, 1], "
                                    f"got {vis!r}")
                if vis < min_visibility or vis == 0:  # an invisible instance has nothing to crop
                    continue
                box = _numbers(i.get("bbox_obj"), 4, info_path, f"{where}, instance {k}", "bbox_obj")
                if box[2] <= 0 or box[3] <= 0:
                    raise DataError(f"{info_path}: {where}, instance {k}: 'bbox_obj' {box} has a width or "
                                    f"height <= 0 (expected [x, y, w, h])")
                obj = g.get("obj_id")
                if not isinstance(obj, int) or not 1 <= obj <= LINEMOD_NUM_OBJECTS:
                    raise DataError(f"{gt_path}: {where}, instance {k}: 'obj_id' must be an integer in "
                                    f"1..{LINEMOD_NUM_OBJECTS}, got {obj!r}")
                R = _numbers(g.get("cam_R_m2c"), 9, gt_path, f"{where}, instance {k}", "cam_R_m2c")
                t = _numbers(g.get("cam_t_m2c"), 3, gt_path, f"{where}, instance {k}", "cam_t_m2c")
                kept.append((obj, R, t, box, float(vis), int(scene), im_id))
            if not kept:
                continue
            stem = os.path.join(d, "rgb", f"{im_id:06d}")
            path = next((stem + ext for ext in (".png", ".jpg") if os.path.isfile(stem + ext)), None)
            if path is None:
                raise DataError(f"{gt_path}: {where} is listed but its image {stem}.png (or .jpg) is missing")
            jobs.append((path, kept))
    return jobs


def linemod_crop(image, box, image_size, crop_scale=LINEMOD_CROP_SCALE):
    """The square crop around box [x, y, w, h] (side crop_scale x the longer side, same centre),
    zero-padded outside the image, resized to image_size: a uint8 array (image_size, image_size, 3)."""
    x, y, w, h = box
    side = max(w, h) * crop_scale
    x0, y0 = round(x + w / 2 - side / 2), round(y + h / 2 - side / 2)
    s = max(1, round(side))
    crop = image.crop((x0, y0, x0 + s, y0 + s))  # PIL fills the part outside the image with 0
    return np.asarray(crop.resize((image_size, image_size), Image.Resampling.BILINEAR))


def build_linemod(split_dir, scenes, part, min_visibility, image_size, crop_scale):
    """Read and crop every kept instance: the cache's content (a dict of tensors)."""

    jobs = _linemod_instances(split_dir, scenes, part, min_visibility)
    rows = [inst for _, kept in jobs for inst in kept]
    if not rows:
        raise DataError(f"no LINEMOD instances with visib_fract >= {min_visibility} in {split_dir}")
    images = torch.empty(len(rows), image_size, image_size, 3, dtype=torch.uint8)
    starts, n = [], 0
    for _, kept in jobs:
        starts.append(n)
        n += len(kept)

    def crop_all(job_start):
        (path, kept), start = job_start
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except OSError as e:
            raise DataError(f"could not read image {path}: {e}") from None
        for j, inst in enumerate(kept):
            images[start + j] = torch.from_numpy(linemod_crop(im, inst[3], image_size, crop_scale).copy())

    # PIL releases the GIL while it decodes and resizes, so threads share the work across cores
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for _ in tqdm(pool.map(crop_all, zip(jobs, starts)), total=len(jobs), leave=False,
                      desc=f"cropping LINEMOD {os.path.basename(split_dir)}", disable=None):
            pass
    obj = torch.tensor([r[0] for r in rows], dtype=torch.long)
    R = torch.tensor([r[1] for r in rows], dtype=torch.float32)    # (N, 9), row-major cam_R_m2c
    t = torch.tensor([r[2] for r in rows], dtype=torch.float32)    # (N, 3), millimetres
    return {"images": images.permute(0, 3, 1, 2).contiguous(),    # (N, 3, S, S)
            "labels": obj - 1,
            "factors": {"obj_id": obj, "rotation": R, "translation": t,
                        "viewpoint": viewpoint_bin(R.view(-1, 3, 3), t),
                        "visib_fract": torch.tensor([r[4] for r in rows], dtype=torch.float32),
                        "scene_id": torch.tensor([r[5] for r in rows], dtype=torch.long),
                        "image_id": torch.tensor([r[6] for r in rows], dtype=torch.long)}}


def _valid_linemod_cache(c, fingerprint, image_size):
    """True when c is a complete cache of this fingerprint: every tensor present, one row per sample."""
    try:
        n = len(c["labels"])
        return (c["format"] == LINEMOD_CACHE_FORMAT and c["fingerprint"] == fingerprint and n > 0
                and c["images"].dtype == torch.uint8 and c["images"].shape == (n, 3, image_size, image_size)
                and c["labels"].shape == (n,) and all(len(v) == n for v in c["factors"].values()))
    except (KeyError, TypeError, AttributeError):
        return False


def load_linemod(root, split="train", train_split=LINEMOD_TRAIN_SPLIT, eval_split=LINEMOD_EVAL_SPLIT,
                 min_visibility=LINEMOD_MIN_VISIBILITY, image_size=64, crop_scale=LINEMOD_CROP_SCALE, cache=True):
    """LINEMOD crops from <root>/lm/<BOP split>/: split "train" reads train_split, "test" eval_split,
    any other name that BOP split whole. When train_split == eval_split, images with
    id % LINEMOD_HOLDOUT_EVERY == 0 form "test" and the others "train".

    factors: obj_id, viewpoint (int64 bin, see viewpoint_bin), scene_id, image_id (int64 (N,)),
    rotation (float (N, 9), cam_R_m2c), translation (float (N, 3)), visib_fract (float (N,)).
    """
    if not 0 <= min_visibility <= 1:
        raise DataError(f"the minimum visibility must lie in [0, 1], got {min_visibility}")
    bop_split = {"train": train_split, "test": eval_split}.get(split, split)
    part = split if split in ("train", "test") and train_split == eval_split else "all"
    lm = os.path.join(root, "lm")
    if not os.path.isdir(lm):
        raise DataError(f"no LINEMOD in BOP layout under {root}: expected {lm}/<split>/<scene>/ "
                        f"(see docs/datasets.md, LINEMOD)")
    split_dir = os.path.join(lm, bop_split)
    if not os.path.isdir(split_dir):
        have = sorted(n for n in os.listdir(lm) if os.path.isdir(os.path.join(lm, n)))
        raise DataError(f"LINEMOD split '{bop_split}' not found: {split_dir} does not exist "
                        f"(splits present: {', '.join(have) or 'none'})")
    scenes = sorted(n for n in os.listdir(split_dir) if n.isdigit() and os.path.isdir(os.path.join(split_dir, n)))
    if not scenes:
        raise DataError(f"{split_dir} holds no scene folders (<scene:06d>/)")

    fingerprint = linemod_fingerprint(split_dir, scenes)
    path = linemod_cache_path(split_dir, part, min_visibility, image_size, crop_scale)
    c = None
    if cache and os.path.isfile(path):
        try:
            c = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # truncated or foreign file: rebuilt below
            c = None
        if not _valid_linemod_cache(c, fingerprint, image_size):
            c = None  # stale (the data changed) or partial: rebuilt below
    if c is None:
        c = build_linemod(split_dir, scenes, part, min_visibility, image_size, crop_scale)
        c.update(format=LINEMOD_CACHE_FORMAT, fingerprint=fingerprint)
        if cache:
            try:
                atomic_save(c, path, "the LINEMOD cache")
            except WriteError as e:  # a read-only or full disk only costs the next run the crop again
                warnings.warn(str(e), stacklevel=2)
    return ImageSet(c["images"], c["labels"], LINEMOD_NUM_OBJECTS, dict(c["factors"]))


# ----------------------------------------------------------------------------- 2D Sprites
#
# Reed et al. (2015), "Deep Visual Analogy-Making": game characters whose identity (the
# choice of body, clothes, hair, ...) is the specified factor and whose pose (action,
# viewpoint, frame) is the unspecified one. Two sources, chosen by what <root> holds:
#   <root>/sprites/      Reed's own files (sprites_<i>.mat + sprites_splits.mat), read as they are;
#   <root>/lpc-sprites/  the LPC layer sheets, from which an equivalent set is rendered once
#                        into a cache outside <root> (the data folder may be read-only).


SPRITES_SPLITS = ("train", "val", "test")
SPRITES_ACTIONS = ("spellcast", "thrust", "walk", "slash", "shoot")
SPRITES_DIRECTIONS = ("up", "left", "down", "right")  # LPC row order within an action
SPRITES_LAYERS = ("body", "shoes", "bottomwear", "topwear", "hair", "eyes")  # factor names
SPRITES_SIZE = 60
REED_ANIMATIONS = 20  # 5 actions x 4 viewpoints; Reed's 21st animation (hurt) is dropped

# The LPC sheets: 64 x 64 cells, one row per (action, direction), frames along the row.
LPC_SHEET_SIZE = (832, 1344)  # width, height: 13 x 21 cells
LPC_CELL = 64
LPC_ACTION_ROWS = (0, 4, 8, 12, 16)   # first row of each action, one row per direction
LPC_ACTION_FRAMES = (7, 8, 9, 6, 13)  # frames of each action: 43 per direction, 172 per character
LPC_DRAW_ORDER = ("body", "eyes", "shoes", "bottomwear", "topwear", "hair")  # back to front
# The 60 x 60 window cut from each 64 x 64 cell: across all shared sheets the art lies in
# rows 9-63 and columns 7-57 of a cell, so cutting rows 4-63 and columns 2-61 loses nothing
# and keeps the pixel art unresampled.
LPC_CROP_TOP, LPC_CROP_LEFT = 4, 2


def _check_split(split):
    if split not in SPRITES_SPLITS:
        raise DataError(f"2D Sprites has no '{split}' split (choose {', '.join(SPRITES_SPLITS)})")


def load_sprites(root, split="train"):
    """2D Sprites: Reed's files if <root>/sprites/ exists, else rendered from <root>/lpc-sprites/."""
    _check_split(split)
    reed, sheets = os.path.join(root, "sprites"), os.path.join(root, "lpc-sprites")
    if os.path.isdir(reed):
        return load_reed_sprites(reed, split)
    if os.path.isdir(sheets):
        return load_rendered_sprites(sheets, split)
    raise DataError(f"2D Sprites not found in {root}: put Reed's files (sprites_<i>.mat, sprites_splits.mat) "
                    f"in {reed}/, or the LPC layer sheets in {sheets}/ to render an equivalent set (see docs/datasets.md)")


# ---------------------------------------------------------------- Reed's files

def _numbered_files(folder, pattern):
    """{number: path} of the files in `folder` whose names match `pattern` (one integer group)."""
    found = {}
    for name in os.listdir(folder):
        m = re.fullmatch(pattern, name)
        if m:
            found[int(m.group(1))] = os.path.join(folder, name)
    return dict(sorted(found.items()))


def read_reed_character(path):
    """One sprites_<i>.mat: uint8 images (N, 3, 60, 60) of its first 20 animations and their
    action, direction and frame labels.

    The file is MATLAB v7.3 (HDF5). `sprites` is a cell array of references, one per
    animation; each animation is a frames x 10800 MATLAB array whose rows are 60 x 60 x 3
    images flattened in MATLAB's column-major order (row index fastest, then column, then
    channel). HDF5 stores MATLAB arrays with their dimensions reversed, so h5py sees
    10800 x frames; the frame axis is found as the one that is not 10800 long.
    """
    import h5py  # here: only Reed's .mat files need it

    n_pix = 3 * SPRITES_SIZE * SPRITES_SIZE
    images, action, direction, frame = [], [], [], []
    try:
        with h5py.File(path, "r") as f:
            if "sprites" not in f:
                raise DataError(f"{path} holds no 'sprites' cell array (keys: {', '.join(f.keys())})")
            refs = np.asarray(f["sprites"][()]).ravel()
            if len(refs) < REED_ANIMATIONS:
                raise DataError(f"{path}: 'sprites' has {len(refs)} animations, expected at least {REED_ANIMATIONS}")
            for a in range(REED_ANIMATIONS):
                x = np.asarray(f[refs[a]][()])
                if x.ndim != 2 or n_pix not in x.shape:
                    raise DataError(f"{path}: animation {a + 1} has shape {x.shape}, expected frames x {n_pix}")
                if x.shape[1] != n_pix:
                    x = x.T  # (frames, 10800)
                # flat index = h + 60 w + 3600 c, so a C-order reshape gives [c, w, h]
                x = x.reshape(len(x), 3, SPRITES_SIZE, SPRITES_SIZE).transpose(0, 1, 3, 2)
                images.append(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8))
                action += [a // 4] * len(x)
                direction += [a % 4] * len(x)
                frame += list(range(len(x)))
    except DataError:
        raise
    except Exception as e:  # truncated file, not HDF5 (e.g. an old-format .mat), bad reference
        raise DataError(f"could not read {path} as a MATLAB v7.3 (HDF5) sprites file: "
                        f"{e.__class__.__name__}: {e}") from None
    return np.concatenate(images), {"action": np.array(action), "direction": np.array(direction),
                                    "frame": np.array(frame)}


def load_reed_sprites(folder, split="train"):
    """Reed's 2D Sprites from `folder` (= <root>/sprites): the characters of one split.

    sprites_splits.mat holds 1-based character indices `trainidx`, `validx`, `testidx`;
    character k is the k-th sprites_<i>.mat in numeric order of i. Labels are the
    characters' positions within the split (0..K-1); factors: action (0-4, as in
    SPRITES_ACTIONS), direction (0-3, SPRITES_DIRECTIONS), frame, and identity (the
    0-based character index over all splits). Layer labels are not in Reed's files.
    """
    import scipy.io  # here: only Reed's older .mat files need it

    _check_split(split)
    splits_path = os.path.join(folder, "sprites_splits.mat")
    if not os.path.isfile(splits_path):
        raise DataError(f"{splits_path} is missing (Reed's split of the characters)")
    try:
        idx = scipy.io.loadmat(splits_path)[{"train": "trainidx", "val": "validx", "test": "testidx"}[split]]
    except Exception as e:
        raise DataError(f"could not read {splits_path}: {e.__class__.__name__}: {e}") from None
    chars = np.asarray(idx).ravel().astype(np.int64) - 1  # MATLAB indices are 1-based
    files = list(_numbered_files(folder, r"sprites_(\d+)\.mat").values())
    if len(chars) == 0:
        raise DataError(f"{splits_path} lists no characters for the {split} split")
    if chars.min() < 0 or chars.max() >= len(files):
        raise DataError(f"{splits_path} refers to character {chars.max() + 1}, but {folder} holds "
                        f"{len(files)} sprites_<i>.mat files")
    images, labels, factors = [], [], {k: [] for k in ("action", "direction", "frame", "identity")}
    for label, c in enumerate(chars):
        x, f = read_reed_character(files[c])
        images.append(x)
        labels.append(np.full(len(x), label))
        for k in ("action", "direction", "frame"):
            factors[k].append(f[k])
        factors["identity"].append(np.full(len(x), c))
    return ImageSet(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)).long(),
                    len(chars), {k: torch.from_numpy(np.concatenate(v)).long() for k, v in factors.items()})


# ---------------------------------------------------------------- rendering from the LPC sheets

SPRITES_RENDER_VERSION = 1   # bump whenever rendering changes: old caches are then ignored
SPRITES_SEED = 0             # which identities are drawn, and their split
SPRITES_IDENTITIES = (500, 72, 100)  # train / val / test identities, as Reed's split of his 672
SPRITES_BACKGROUND = 255     # white, opaque


def lpc_poses():
    """Sheet row, sheet column and (action, direction, frame) of the 172 cells of a character,
    in the order the rendered images take: action, then direction, then frame."""
    rows, cols, action, direction, frame = [], [], [], [], []
    for a, (row0, n_frames) in enumerate(zip(LPC_ACTION_ROWS, LPC_ACTION_FRAMES)):
        for d in range(len(SPRITES_DIRECTIONS)):
            for f in range(n_frames):
                rows.append(row0 + d)
                cols.append(f)
                action.append(a)
                direction.append(d)
                frame.append(f)
    return tuple(np.array(v) for v in (rows, cols, action, direction, frame))


def lpc_layer_files(sheet_dir):
    """{layer: [sheet paths of variants 0, 1, ...]} for every layer in SPRITES_LAYERS."""
    files = {}
    for layer in SPRITES_LAYERS:
        folder = os.path.join(sheet_dir, layer)
        found = _numbered_files(folder, r"(\d+)\.png") if os.path.isdir(folder) else {}
        if not found:
            raise DataError(f"no LPC sheets for layer '{layer}': expected {folder}/0.png, 1.png, ...")
        if list(found) != list(range(len(found))):
            raise DataError(f"LPC variants of '{layer}' in {folder} are not numbered 0..{len(found) - 1}")
        files[layer] = list(found.values())
    return files


def read_lpc_sheet(path):
    """The 172 pose cells of one sheet, cut to 60 x 60: uint8 RGBA (172, 60, 60, 4)."""

    try:
        with Image.open(path) as im:
            if im.size != LPC_SHEET_SIZE:
                raise DataError(f"{path} is {im.size[0]} x {im.size[1]} pixels, expected "
                                f"{LPC_SHEET_SIZE[0]} x {LPC_SHEET_SIZE[1]} (13 x 21 cells of 64 x 64)")
            sheet = np.asarray(im.convert("RGBA"))  # palette sheets become RGBA here
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"could not read LPC sheet {path}: {e.__class__.__name__}: {e}") from None
    cells = sheet.reshape(LPC_SHEET_SIZE[1] // LPC_CELL, LPC_CELL, LPC_SHEET_SIZE[0] // LPC_CELL, LPC_CELL, 4)
    rows, cols = lpc_poses()[:2]
    cells = cells[rows, :, cols]  # (172, 64, 64, 4)
    return cells[:, LPC_CROP_TOP:LPC_CROP_TOP + SPRITES_SIZE, LPC_CROP_LEFT:LPC_CROP_LEFT + SPRITES_SIZE]


def draw_identities(counts, n, seed):
    """n distinct layer combinations (n, len(counts)) out of all prod(counts), drawn by `seed`.

    Each combination is ranked by a SHA-256 of (seed, combination), so the draw is the same on
    every platform and for every numpy version (numpy's generators promise no stable stream).
    """
    total = int(np.prod(counts))
    if n > total:
        raise DataError(f"{n} identities asked for, but the sheets allow only {total} combinations")
    rank = sorted(range(total), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    return np.stack(np.unravel_index(np.array(rank[:n], dtype=np.int64), counts), 1)


def composite(cells, variants, background=SPRITES_BACKGROUND):
    """Characters drawn over an opaque background: uint8 (n, 172, 3, 60, 60).

    cells: {layer: uint8 RGBA (variants, 172, 60, 60, 4)}; variants: (n, 6) in
    SPRITES_LAYERS order. Layers go back to front (LPC_DRAW_ORDER) with the "over" operator
    in exact integer arithmetic, out = round((out * (255 - a) + rgb * a) / 255), so the same
    inputs give the same bytes on every machine. Only a layer's non-transparent pixels are
    touched (about 46% of one image's pixels over all six layers), all characters that share a
    variant at once: about ten times less work than blending every pixel of every layer.
    """
    n, (n_poses, h, w) = len(variants), cells[SPRITES_LAYERS[0]].shape[1:4]
    out = np.full((n, n_poses * h * w, 3), background, np.uint8)
    for layer in LPC_DRAW_ORDER:
        column = variants[:, SPRITES_LAYERS.index(layer)]
        for v in np.unique(column):
            rows = np.nonzero(column == v)[0][:, None]        # characters wearing variant v
            src = cells[layer][v].reshape(-1, 4)               # (172 * 60 * 60, RGBA)
            pos = np.nonzero(src[:, 3])[0]                     # its non-transparent pixels
            a = src[pos, 3:].astype(np.uint16)                 # (P, 1)
            t = out[rows, pos].astype(np.uint16) * (255 - a) + src[pos, :3] * a + 128  # (r, P, 3)
            out[rows, pos] = (t + (t >> 8)) >> 8               # = round(t' / 255), exact for t' <= 65025
    return out.reshape(n, n_poses, h, w, 3).transpose(0, 1, 4, 2, 3)


def render_sprites(sheet_dir, seed=SPRITES_SEED, identities=SPRITES_IDENTITIES,
                   background=SPRITES_BACKGROUND, chunk=64):
    """Render 2D Sprites from the LPC sheets: a dict of tensors, images ordered by identity
    (train identities first, then val, then test), 172 poses each.

    images uint8 (N, 3, 60, 60); identity (N,) 0..sum(identities)-1; action, direction,
    frame (N,); one (N,) variant index per layer; variants (identities, 6); split_identities.
    """
    files = lpc_layer_files(sheet_dir)
    cells = {layer: np.stack([read_lpc_sheet(p) for p in paths]) for layer, paths in files.items()}
    n_ids = int(sum(identities))
    variants = draw_identities([len(files[layer]) for layer in SPRITES_LAYERS], n_ids, seed)
    _, _, action, direction, frame = lpc_poses()
    n_poses = len(action)
    images = np.empty((n_ids, n_poses, 3, SPRITES_SIZE, SPRITES_SIZE), np.uint8)  # 1.25 GB for 672
    for i in tqdm(range(0, n_ids, chunk), desc="rendering sprites", unit="chunk", leave=False):
        images[i:i + chunk] = composite(cells, variants[i:i + chunk], background)  # chunks bound memory
    out = {"images": torch.from_numpy(images.reshape(-1, 3, SPRITES_SIZE, SPRITES_SIZE)),
           "identity": torch.arange(n_ids).repeat_interleave(n_poses),
           "variants": torch.from_numpy(variants).long(),
           "split_identities": torch.tensor(identities)}
    for name, v in (("action", action), ("direction", direction), ("frame", frame)):
        out[name] = torch.from_numpy(np.tile(v, n_ids)).long()
    for j, layer in enumerate(SPRITES_LAYERS):
        out[layer] = out["variants"][:, j].repeat_interleave(n_poses)
    return out


def sheets_digest(sheet_dir):
    """SHA-256 over every sheet's bytes: a changed sheet means a new cache."""
    h = hashlib.sha256()
    for layer, paths in lpc_layer_files(sheet_dir).items():
        for p in paths:
            with open(p, "rb") as f:
                h.update(f"{layer}/{os.path.basename(p)}:".encode() + f.read())
    return h.hexdigest()


def _read_sprites_cache(path, key):
    """The cached render at `path` if it is complete and was made with `key`, else None."""
    if not os.path.isfile(path):
        return None
    try:
        data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        n = int(data["split_identities"].sum()) * len(SPRITES_DIRECTIONS) * sum(LPC_ACTION_FRAMES)
        ok = data["key"] == key and data["images"].shape == (n, 3, SPRITES_SIZE, SPRITES_SIZE) \
            and all(len(data[k]) == n for k in ("identity", "action", "direction", "frame") + SPRITES_LAYERS)
        if ok:
            return data
        warnings.warn(f"sprites cache {path} does not match its parameters; rendering again", stacklevel=3)
    except Exception as e:  # truncated or corrupted file
        warnings.warn(f"sprites cache {path} is unreadable ({e.__class__.__name__}); rendering again", stacklevel=3)
    return None


def load_rendered_sprites(sheet_dir, split="train", seed=None, identities=None, background=None):
    """One split of the set rendered from the LPC sheets in `sheet_dir`, rendered on first use
    into cache_dir() and read from there afterwards. seed, identities and background default
    to SPRITES_SEED, SPRITES_IDENTITIES and SPRITES_BACKGROUND.

    Labels are the identities' positions within the split (0..K-1). Factors: identity (index
    over all splits), action, direction, frame, and the variant of each layer in SPRITES_LAYERS.
    """
    _check_split(split)
    seed = SPRITES_SEED if seed is None else seed
    identities = SPRITES_IDENTITIES if identities is None else identities
    background = SPRITES_BACKGROUND if background is None else background
    params = {"version": SPRITES_RENDER_VERSION, "seed": seed, "identities": list(identities),
              "background": background, "crop": [LPC_CROP_TOP, LPC_CROP_LEFT], "sheets": sheets_digest(sheet_dir)}
    key = json.dumps(params, sort_keys=True)
    path = os.path.join(cache_dir(), f"sprites-lpc-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt")
    data = _read_sprites_cache(path, key)
    if data is None:
        print(f"rendering 2D Sprites from {sheet_dir} (once; cached in {path})", file=sys.stderr)
        t0 = time.perf_counter()
        data = render_sprites(sheet_dir, seed, identities, background)
        data["key"] = key
        try:
            atomic_save(data, path, "the sprites cache")
        except WriteError as e:  # a read-only or full disk: the set is still usable, only not kept
            warnings.warn(f"{e}; set ${CACHE_DIR_ENV} to a writable folder to avoid rendering again",
                          stacklevel=2)
        print(f"rendered {len(data['images'])} images in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    n_poses = len(data["identity"]) // int(data["split_identities"].sum())
    first = [0] + torch.cumsum(data["split_identities"], 0).tolist()
    i = SPRITES_SPLITS.index(split)
    lo, hi = first[i] * n_poses, first[i + 1] * n_poses
    # clone: copies this split out of the memory-mapped file, which can then be closed
    factors = {k: data[k][lo:hi].clone() for k in ("identity", "action", "direction", "frame") + SPRITES_LAYERS}
    return ImageSet(data["images"][lo:hi].clone(), factors["identity"] - first[i],
                    int(data["split_identities"][i]), factors)


# Every dataset by name: its loader (root, split, **options) -> ImageSet.
DATASETS = {"mnist": load_mnist, "sprites": load_sprites, "linemod": load_linemod}
