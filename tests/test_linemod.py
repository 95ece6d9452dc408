"""LINEMOD in BOP layout: crops, labels, the visibility filter, border padding, the cache,
clear errors, and train.py end to end, all on a tiny BOP tree drawn here."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data_loader
from conftest import ROOT
from data_loader import DataError, dataset_options, linemod_cache_path, load_dataset, viewpoint_bin
from networks import Decoder, Encoder, get_config

W, H = 160, 120
BACKGROUND = (40, 40, 40)
COLOURS = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 5: (255, 255, 0)}
# (rotation 180 degrees about x: the camera looks down on the object from +z)
R_TOP = [1, 0, 0, 0, -1, 0, 0, 0, -1]
R_ID = [1, 0, 0, 0, 1, 0, 0, 0, 1]


def instance(obj, box, vis=1.0, R=R_ID):
    return {"obj_id": obj, "cam_R_m2c": list(R), "cam_t_m2c": [0, 0, 1000]}, \
        {"bbox_obj": list(box), "bbox_visib": list(box), "visib_fract": vis}


def write_scene(split_dir, scene, images, ext=".png"):
    """images: {image id: [(gt, info), ...]}; each object drawn as a filled rectangle at its box."""
    d = os.path.join(split_dir, f"{scene:06d}")
    os.makedirs(os.path.join(d, "rgb"), exist_ok=True)
    gt, info = {}, {}
    for im_id, insts in images.items():
        a = np.zeros((H, W, 3), np.uint8)
        a[:] = BACKGROUND
        for g, i in insts:
            x, y, w, h = i["bbox_obj"]
            a[max(0, y):max(0, y + h), max(0, x):max(0, x + w)] = COLOURS[g["obj_id"]]
        Image.fromarray(a).save(os.path.join(d, "rgb", f"{im_id:06d}{ext}"), quality=95)
        gt[str(im_id)] = [g for g, _ in insts]
        info[str(im_id)] = [i for _, i in insts]
    for name, obj in (("scene_gt.json", gt), ("scene_gt_info.json", info)):
        with open(os.path.join(d, name), "w") as f:
            json.dump(obj, f)
    return d


def make_tiny_bop(root):
    """<root>/lm/{test,train_pbr}: test has 2 scenes of 4 images with 2 instances each (one 5% visible,
    one on the left border in image 3); train_pbr has 2 scenes of 6 JPEG images."""
    lm = os.path.join(root, "lm")
    for scene, obj in ((1, 1), (2, 2)):
        write_scene(os.path.join(lm, "test"), scene, {
            k: [instance(obj, (20 + 5 * k, 30, 40, 40), R=R_TOP if k == 1 else R_ID),
                instance(3, (100, 20, 40, 20), vis=0.05 if k == 0 else 0.9)] for k in range(3)}
            | {3: [instance(obj, (-20, 30, 40, 40)), instance(5, (100, 60, 30, 30), vis=0.5)]})
    for scene in (0, 1):
        write_scene(os.path.join(lm, "train_pbr"), scene, {
            k: [instance(1 + (k + scene) % 3, (30 + 3 * k, 20 + 2 * k, 50, 40))] for k in range(6)}, ext=".jpg")
    return str(root)


@pytest.fixture
def bop(tmp_path, monkeypatch):
    monkeypatch.setenv("DISENTANGLE_CACHE_DIR", str(tmp_path / "cache"))
    return make_tiny_bop(tmp_path / "data")


def colour_box(img, colour, tol=60):
    """Edges (top, bottom, left, right) in pixels of the region of `colour` in a (3, S, S) uint8 crop."""
    close = (img.int() - torch.tensor(colour).view(3, 1, 1)).abs().max(0).values < tol
    ys, xs = torch.nonzero(close, as_tuple=True)
    return ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1


def test_crops_labels_and_factors(bop):
    ds = load_dataset("linemod", bop, "test", eval_split="test")
    # 4 images x 2 scenes x 2 instances, minus the 5%-visible one of image 0 in each scene
    assert len(ds) == 14 and ds.images.shape == (14, 3, 64, 64) and ds.images.dtype == torch.uint8
    assert ds.num_classes == 15
    assert torch.equal(ds.labels, ds.factors["obj_id"] - 1)
    f = ds.factors
    # order: scene, image id, instance order of scene_gt.json
    assert f["scene_id"].tolist() == [1] * 7 + [2] * 7
    assert f["image_id"][:7].tolist() == [0, 1, 1, 2, 2, 3, 3]
    assert f["obj_id"][:7].tolist() == [1, 1, 3, 1, 3, 1, 5]
    assert f["rotation"].shape == (14, 9) and f["rotation"].dtype == torch.float32
    assert f["rotation"][1].tolist() == R_TOP and f["rotation"][0].tolist() == R_ID
    assert f["visib_fract"][6].item() == pytest.approx(0.5)
    # viewpoint: identity rotation puts the camera below the object (elevation -90: bin 0),
    # R_TOP above it (elevation +90: bin 8 * 3 + 0)
    assert f["viewpoint"][0].item() == 0 and f["viewpoint"][1].item() == 24
    for name in ("obj_id", "viewpoint", "scene_id", "image_id"):
        assert f[name].dtype == torch.int64 and f[name].shape == (14,)


def test_crop_geometry(bop):
    ds = load_dataset("linemod", bop, "test")
    # square 40 x 40 box, crop side 1.2 x 40 = 48: the object spans 64 / 1.2 = 53.3 px, centred
    y0, y1, x0, x1 = colour_box(ds.images[0], COLOURS[1])
    for lo, hi in ((y0, y1), (x0, x1)):
        assert abs(lo - 5.3) <= 1 and abs(hi - 58.7) <= 1
    assert tuple(ds.images[0][:, 1, 1].tolist()) == BACKGROUND  # context around the box
    # 40 x 20 box: side 48, the object spans 53.3 px across and 26.7 px down, centred
    y0, y1, x0, x1 = colour_box(ds.images[2], COLOURS[3])
    assert abs(x0 - 5.3) <= 1 and abs(x1 - 58.7) <= 1
    assert abs(y0 - 18.7) <= 1 and abs(y1 - 45.3) <= 1
    assert tuple(ds.images[2][:, 32, 32].tolist()) == COLOURS[3]


def test_border_is_zero_padded(bop):
    ds = load_dataset("linemod", bop, "test")
    img = ds.images[5]  # scene 1, image 3: box x = -20, w = 40; crop x from -24 to 24
    assert ds.factors["image_id"][5] == 3 and ds.factors["obj_id"][5] == 1
    assert (img[:, :, :31] == 0).all()            # the left half lies outside the image: zeros
    assert tuple(img[:, 32, 40].tolist()) == COLOURS[1]
    assert tuple(img[:, 2, 40].tolist()) == BACKGROUND


def test_visibility_filter(bop):
    assert len(load_dataset("linemod", bop, "test", min_visibility=0.0)) == 16
    assert len(load_dataset("linemod", bop, "test", min_visibility=0.6)) == 12  # drops the 0.5 ones too
    ds = load_dataset("linemod", bop, "test", min_visibility=0.1)
    assert (ds.factors["visib_fract"] >= 0.1).all()
    assert len(load_dataset("linemod", bop, "test", min_visibility=1.0)) == 8  # only the fully visible
    with pytest.raises(DataError, match=r"minimum visibility must lie in \[0, 1\], got 1.5"):
        load_dataset("linemod", bop, "test", min_visibility=1.5)


def test_splits_and_holdout(bop):
    train = load_dataset("linemod", bop, "train")  # default: train_pbr, JPEG images
    assert len(train) == 12 and set(train.factors["obj_id"].tolist()) == {1, 2, 3}
    assert load_dataset("linemod", bop, "train_pbr", cache=False).images.equal(train.images)
    # the same BOP split for both: image ids % 10 == 0 are evaluation, the rest training
    tr = load_dataset("linemod", bop, "train", train_split="test", eval_split="test")
    te = load_dataset("linemod", bop, "test", train_split="test", eval_split="test")
    assert (tr.factors["image_id"] % 10 != 0).all() and (te.factors["image_id"] % 10 == 0).all()
    assert len(tr) + len(te) == 14
    with pytest.raises(DataError, match=r"split 'train'.*splits present: test, train_pbr"):
        load_dataset("linemod", bop, "train", train_split="train")


def test_dataset_options_from_args():
    args = {"dataset": "linemod", "linemod_train_split": "train", "linemod_eval_split": "test",
            "min_visibility": 0.3, "seed": 0}
    assert dataset_options(args) == {"train_split": "train", "eval_split": "test", "min_visibility": 0.3}
    assert dataset_options({"dataset": "linemod"}) == {}  # an older checkpoint: the loader's defaults
    assert dataset_options({"dataset": "mnist", "min_visibility": 0.3}) == {}


def test_cache_is_used_then_rebuilt_when_stale_or_partial(bop, monkeypatch):
    calls = []
    real = data_loader.build_linemod
    monkeypatch.setattr(data_loader, "build_linemod", lambda *a: calls.append(1) or real(*a))
    first = load_dataset("linemod", bop, "test")
    path = linemod_cache_path(os.path.join(bop, "lm", "test"), "all", 0.1, 64, 1.2)
    assert os.path.isfile(path) and len(calls) == 1
    assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp" in f]  # written atomically
    again = load_dataset("linemod", bop, "test")
    assert len(calls) == 1 and torch.equal(first.images, again.images)
    assert torch.equal(first.factors["rotation"], again.factors["rotation"])
    # other settings, other cache file
    load_dataset("linemod", bop, "test", min_visibility=0.0)
    assert len(calls) == 2 and os.path.isfile(path)
    # partial (truncated) cache: rebuilt
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    assert torch.equal(load_dataset("linemod", bop, "test").images, first.images) and len(calls) == 3
    # stale: an annotation changed (drop instance 1 of image 3 in scene 2)
    d = os.path.join(bop, "lm", "test", "000002")
    for name in ("scene_gt.json", "scene_gt_info.json"):
        with open(os.path.join(d, name)) as f:
            obj = json.load(f)
        obj["3"] = obj["3"][:1]
        with open(os.path.join(d, name), "w") as f:
            json.dump(obj, f)
    assert len(load_dataset("linemod", bop, "test")) == 13 and len(calls) == 4
    assert len(load_dataset("linemod", bop, "test")) == 13 and len(calls) == 4
    # stale: an image removed (its instances are listed, so that is an error, not an old cache)
    os.remove(os.path.join(d, "rgb", "000002.png"))
    with pytest.raises(DataError, match="missing"):
        load_dataset("linemod", bop, "test")


def edit(bop, scene, name, fn):
    path = os.path.join(bop, "lm", "test", f"{scene:06d}", name)
    with open(path) as f:
        obj = json.load(f)
    fn(obj)
    with open(path, "w") as f:
        json.dump(obj, f)
    return path


def test_missing_scene_gt_names_the_file(bop):
    path = os.path.join(bop, "lm", "test", "000002", "scene_gt.json")
    os.remove(path)
    with pytest.raises(DataError, match=f"missing: {path}"):
        load_dataset("linemod", bop, "test")


def test_listed_but_absent_image_names_file_and_id(bop):
    os.remove(os.path.join(bop, "lm", "test", "000001", "rgb", "000002.png"))
    with pytest.raises(DataError, match=r"000001/scene_gt.json: image 2 is listed but its image "
                                        r".*000001/rgb/000002.png \(or .jpg\) is missing"):
        load_dataset("linemod", bop, "test")


@pytest.mark.parametrize("box", [[20, 30, -40, 40], [20, 30, 40], "20 30 40 40", [20, 30, 40, None]])
def test_malformed_box_names_file_and_image(bop, box):
    path = edit(bop, 2, "scene_gt_info.json", lambda o: o["1"][0].update(bbox_obj=box))
    with pytest.raises(DataError, match=f"{path}: image 1, instance 0: 'bbox_obj'"):
        load_dataset("linemod", bop, "test")


def test_other_bad_annotations(bop):
    popped = []
    path = edit(bop, 1, "scene_gt_info.json", lambda o: popped.append(o["2"].pop()))
    with pytest.raises(DataError, match=f"{path}: image 2 has 1 instances but .*scene_gt.json 2"):
        load_dataset("linemod", bop, "test")
    edit(bop, 1, "scene_gt_info.json", lambda o: o["2"].append(popped[0]))
    path = edit(bop, 2, "scene_gt.json", lambda o: o["0"][0].update(obj_id=99))
    with pytest.raises(DataError, match=f"{path}: image 0, instance 0: 'obj_id'"):
        load_dataset("linemod", bop, "test", eval_split="test", min_visibility=0.0)
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(DataError, match=f"could not read {path}"):
        load_dataset("linemod", bop, "test")
    with pytest.raises(DataError, match="no LINEMOD in BOP layout"):
        load_dataset("linemod", os.path.join(bop, "lm"), "test")


def test_viewpoint_bins_cover_azimuth_and_elevation():
    # camera on the object's +x axis at elevation 0: azimuth bin 0, elevation bin 2
    R = torch.tensor([[0., 1, 0], [0, 0, -1], [-1, 0, 0]])  # rows: camera axes in object coordinates
    c = torch.tensor([1000., 0, 0])
    t = -(R @ c)
    assert viewpoint_bin(R[None], t[None]).item() == 16
    c = torch.tensor([0., 1000, 1])                          # +y: azimuth 90 degrees, bin 2
    assert viewpoint_bin(torch.eye(3)[None], -c[None]).item() == 16 + 2


def test_linemod_configs_shapes():
    for z, s in ((64, 256), (256, 512)):  # the two code sizes of the table
        cfg = get_config("linemod", style_dim=z, class_dim=s)
        mu, _, code = Encoder(cfg)(torch.rand(2, 3, 64, 64))
        assert mu.shape == (2, z) and code.shape == (2, s)
        assert Decoder(cfg)(mu, code).shape == (2, 3, 64, 64)


def test_train_cli_on_linemod(bop, tmp_path):
    env = dict(os.environ, DISENTANGLE_NO_DOWNLOAD="1")
    R = tmp_path / "run"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "linemod", "--data-root", bop,
                        "--run-dir", str(R), "--max-steps", "1", "--batch-size", "8", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    ckpt = torch.load(R / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 1 and ckpt["model_config"]["image_size"] == 64
    assert ckpt["args"]["linemod_train_split"] == "train_pbr" and ckpt["args"]["min_visibility"] == 0.1
    assert (R / "samples" / "swap_0000001.png").exists()
    with open(R / "config.json") as f:
        assert json.load(f)["dataset_size"] == 12
    # bad input: one line on stderr, exit 2
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "linemod", "--data-root", bop,
                        "--run-dir", str(tmp_path / "r2"), "--linemod-train-split", "nope", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "split 'nope'" in p.stderr
    # the evaluation commands work on a LINEMOD checkpoint (with its BOP splits from the checkpoint)
    import classify_latents
    import tsne_plot
    out = tmp_path / "table.json"
    classify_latents.main(classify_latents.get_args_parser().parse_args(
        ["--checkpoint", str(R / "checkpoints" / "last.pt"), "--epochs", "1", "--swap-train-steps", "2",
         "--swap-pairs", "20", "--out", str(out)]))
    with open(out) as f:
        assert "viewpoint" in json.dumps(json.load(f))
    tsne_plot.main(tsne_plot.get_args_parser().parse_args(
        ["--checkpoint", str(R / "checkpoints" / "last.pt"), "--num-points", "10", "--perplexity", "2",
         "--out", str(tmp_path / "tsne.png")]))
    assert (tmp_path / "tsne.png").stat().st_size > 0
