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
CACHE_DIR_ENV = "DISENTANGLE_CACHE_DIR"

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
    """One cache file per (split folder, part, crop settings), in $DISENTANGLE_CACHE_DIR or
    ~/.cache/disentangle: outside the data folder, which may be read-only."""
    import hashlib
    cache_dir = os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "disentangle")
    key = repr((os.path.abspath(split_dir), part, float(min_visibility), int(image_size), float(crop_scale),
                LINEMOD_HOLDOUT_EVERY))
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"linemod_{os.path.basename(split_dir)}_{part}_{digest}.pt")


def linemod_fingerprint(split_dir, scenes):
    """Sizes and mtimes of every scene's annotation files and image folder, and the image count:
    changes when annotations are edited or images are added or removed."""
    import hashlib
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
    import json
    if not os.path.isfile(path):
        raise DataError(f"LINEMOD annotation file missing: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"could not read {path}: {e.__class__.__name__}: {e}") from None


def _numbers(value, n, path, where, field):
    """value as a list of n finite floats, or a DataError naming the file, image and field."""
    import math
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
    import numpy as np
    from PIL import Image
    x, y, w, h = box
    side = max(w, h) * crop_scale
    x0, y0 = round(x + w / 2 - side / 2), round(y + h / 2 - side / 2)
    s = max(1, round(side))
    crop = image.crop((x0, y0, x0 + s, y0 + s))  # PIL fills the part outside the image with 0
    return np.asarray(crop.resize((image_size, image_size), Image.Resampling.BILINEAR))


def build_linemod(split_dir, scenes, part, min_visibility, image_size, crop_scale):
    """Read and crop every kept instance: the cache's content (a dict of tensors)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image
    from tqdm import tqdm

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
    import warnings

    from utils import atomic_save

    if not 0 <= min_visibility <= 1:
        raise DataError(f"the minimum visibility must lie in [0, 1], got {min_visibility}")
    bop_split = {"train": train_split, "test": eval_split}.get(split, split)
    part = split if split in ("train", "test") and train_split == eval_split else "all"
    lm = os.path.join(root, "lm")
    if not os.path.isdir(lm):
        raise DataError(f"no LINEMOD in BOP layout under {root}: expected {lm}/<split>/<scene>/ "
                        f"(see the README's LINEMOD section)")
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
                os.makedirs(os.path.dirname(path), exist_ok=True)
                atomic_save(c, path)
            except OSError as e:  # a read-only home only costs the next run the crop again
                warnings.warn(f"could not write the LINEMOD cache {path}: {e}", stacklevel=2)
    return ImageSet(c["images"], c["labels"], LINEMOD_NUM_OBJECTS, dict(c["factors"]))


DATASETS["linemod"] = load_linemod
