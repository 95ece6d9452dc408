"""2D Sprites: Reed's file format (fixtures written the way MATLAB writes them), the renderer
from the LPC sheets (fake sheets, and the real ones where present), its cache, training, and the
attribute protocol of classify_latents.py."""
import os
import sys

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import classify_latents
import data_loader
import evaluation
import train
from conftest import ROOT, SHARED_DATA
from data_loader import (LPC_CROP_LEFT, LPC_CROP_TOP, SPRITES_LAYERS, DataError, PairSampler, load_dataset,
                         load_rendered_sprites, read_lpc_sheet, render_sprites)

LPC = os.path.join(SHARED_DATA, "lpc-sprites")
needs_lpc = pytest.mark.skipif(not os.path.isfile(os.path.join(LPC, "body", "0.png")),
                               reason=f"LPC sheets not found in {LPC}")


# ----------------------------------------------------------------------------- Reed's format

def reed_frames(a):
    return 1 + a % 3 if a < 20 else 5  # the 21st animation (dropped) gets its own count


def reed_image(char, a, f):
    """An asymmetric 60 x 60 RGB pattern (H, W, C) in [0, 1]: red grows down the rows, green
    across the columns, blue tells character, animation and frame apart."""
    rows, cols = np.meshgrid(np.arange(60), np.arange(60), indexing="ij")
    return np.stack([rows * 4, cols * 4, np.full((60, 60), 10 * a + f + 100 * (char % 2))], -1) / 255.0


def write_reed(root, n_chars=4, split=((3, 1), (2,), (4,))):
    """sprites_<i>.mat (v7.3, HDF5) and sprites_splits.mat (v5) as Reed's release has them."""
    folder = os.path.join(root, "sprites")
    os.makedirs(folder)
    for c in range(n_chars):
        with h5py.File(os.path.join(folder, f"sprites_{c + 1}.mat"), "w") as f:
            refs = []
            for a in range(21):
                # MATLAB: a frames x 10800 matrix, each row an image flattened column-major ...
                m = np.stack([reed_image(c, a, i).reshape(-1, order="F") for i in range(reed_frames(a))])
                # ... and HDF5 holds MATLAB arrays with their dimensions reversed
                refs.append(f.create_dataset(f"#refs#/{a}", data=m.T).ref)
            f.create_dataset("sprites", data=np.array(refs, dtype=h5py.ref_dtype).reshape(21, 1))
    scipy.io.savemat(os.path.join(folder, "sprites_splits.mat"),
                     {k: np.array([v]) for k, v in zip(("trainidx", "validx", "testidx"), split)})
    return str(root)


def test_reed_files_load_upright_with_their_splits(tmp_path):
    root = write_reed(tmp_path)
    per_char = sum(reed_frames(a) for a in range(20))  # 39: the 21st animation is dropped
    ds = load_dataset("sprites", root, "train")
    assert ds.images.shape == (2 * per_char, 3, 60, 60) and ds.images.dtype == torch.uint8
    assert ds.num_classes == 2 and set(ds.factors) == {"action", "direction", "frame", "identity"}
    # trainidx = [3, 1] (1-based): label 0 is the third character, label 1 the first
    assert ds.factors["identity"][ds.labels == 0].unique().tolist() == [2]
    assert ds.factors["identity"][ds.labels == 1].unique().tolist() == [0]
    rows = torch.arange(60).view(60, 1).expand(60, 60) * 4
    for i in range(len(ds)):
        x, a = ds.images[i].long(), int(ds.factors["action"][i] * 4 + ds.factors["direction"][i])
        assert torch.equal(x[0], rows) and torch.equal(x[1], rows.T)  # upright, not transposed
        assert (x[2] == 10 * a + ds.factors["frame"][i] + 100 * (ds.factors["identity"][i] % 2)).all()
    assert ds.factors["action"].max() == 4 and ds.factors["direction"].max() == 3
    assert len(load_dataset("sprites", root, "val")) == per_char
    test = load_dataset("sprites", root, "test")
    assert test.factors["identity"].unique().tolist() == [3] and test.labels.unique().tolist() == [0]


def test_reed_split_beyond_the_files_is_an_error(tmp_path):
    root = write_reed(tmp_path, split=((1, 9), (2,), (3,)))
    with pytest.raises(DataError, match="refers to character 9"):
        load_dataset("sprites", root, "train")


def test_missing_sprites_data_gives_one_clear_message(tmp_path):
    with pytest.raises(DataError, match="2D Sprites not found"):
        load_dataset("sprites", str(tmp_path), "train")
    with pytest.raises(DataError, match="no 'validation' split"):
        load_dataset("sprites", str(tmp_path), "validation")


# ----------------------------------------------------------------------------- rendering

FAKE_VARIANTS = {"body": 2, "shoes": 2, "bottomwear": 2, "topwear": 2, "hair": 3, "eyes": 1}


def write_fake_lpc(root, seed=0):
    """Sheets in the LPC layout: each layer variant a coloured, half-transparent-edged block
    at a layer-specific place in every used cell, the hurt row and unused cells empty."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "lpc-sprites")
    for j, (layer, n) in enumerate(FAKE_VARIANTS.items()):
        os.makedirs(os.path.join(folder, layer))
        for v in range(n):
            sheet = np.zeros((1344, 832, 4), np.uint8)
            for row, frames in zip((0, 4, 8, 12, 16), (7, 8, 9, 6, 13)):
                for d in range(4):
                    for f in range(frames):
                        y, x = (row + d) * 64 + 10 + 8 * j, f * 64 + 8 + 4 * d + v
                        sheet[y:y + 12, x:x + 40, :3] = rng.integers(0, 256, 3)
                        sheet[y:y + 12, x:x + 40, 3] = 255
                        sheet[y:y + 12, x, 3] = 128  # a soft edge
            Image.fromarray(sheet, "RGBA").save(os.path.join(folder, layer, f"{v}.png"))
    return str(root)


@pytest.fixture
def fake_lpc(tmp_path, monkeypatch):
    monkeypatch.setenv("DISENTANGLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data_loader, "SPRITES_IDENTITIES", (5, 2, 3))  # 10 of the 48 combinations
    return write_fake_lpc(tmp_path / "data")


def test_rendering_is_byte_identical_for_a_seed(fake_lpc):
    sheets = os.path.join(fake_lpc, "lpc-sprites")
    a, b = render_sprites(sheets, seed=3, identities=(4, 1, 1)), render_sprites(sheets, seed=3, identities=(4, 1, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["images"].shape == (6 * 172, 3, 60, 60)
    assert len({tuple(v) for v in a["variants"].tolist()}) == 6  # distinct identities
    other = render_sprites(sheets, seed=4, identities=(4, 1, 1))
    assert not torch.equal(a["variants"], other["variants"])


def test_rendered_splits_labels_and_factors(fake_lpc):
    sets = {s: load_dataset("sprites", fake_lpc, s) for s in ("train", "val", "test")}
    assert [len(d) for d in sets.values()] == [5 * 172, 2 * 172, 3 * 172]
    assert [d.num_classes for d in sets.values()] == [5, 2, 3]
    ids = [set(d.factors["identity"].tolist()) for d in sets.values()]
    assert ids == [set(range(5)), {5, 6}, {7, 8, 9}]  # disjoint identities per split
    train_set = sets["train"]
    assert set(train_set.factors) == {"identity", "action", "direction", "frame", *SPRITES_LAYERS}
    for name, n in FAKE_VARIANTS.items():
        assert 0 <= train_set.factors[name].min() and train_set.factors[name].max() < n
    # every identity shows each of the 5 actions x 4 directions with 7, 8, 9, 6, 13 frames
    one = train_set.labels == 0
    poses = torch.stack([train_set.factors[k][one] for k in ("action", "direction", "frame")], 1)
    assert len(poses.unique(dim=0)) == 172
    assert torch.bincount(train_set.factors["action"][one]).tolist() == [28, 32, 36, 24, 52]
    # a layer's colour appears where the sheet put it: the background stays white elsewhere
    assert (train_set.images[:, :, 0, 0] == 255).all()
    # Layers are alpha-blended, not pasted: write_fake_lpc draws layer j over sheet rows 10 + 8j to
    # 21 + 8j, so rows 14 + 8j to 17 + 8j (image rows 10 + 8j to 13 + 8j after the 4-row crop) hold
    # layer j alone over the white background. There its block's first column has alpha 128: the
    # colour c of the next column (alpha 255) over white, round((255 * 127 + c * 128) / 255).
    x = train_set.images.long()
    for j in range(len(FAKE_VARIANTS)):
        band = x[:, :, 10 + 8 * j:14 + 8 * j]                           # (N, 3, 4 rows, 60)
        edge = (band != 255).any(1).long().argmax(-1)                   # first non-white column per row
        soft = band.gather(3, edge[:, None, :, None].expand(-1, 3, -1, 1))
        solid = band.gather(3, edge[:, None, :, None].expand(-1, 3, -1, 1) + 1)
        assert torch.equal(soft, (255 * 127 + solid * 128 + 127) // 255), j


def test_pairs_share_identity_but_not_pose(fake_lpc):
    ds = load_dataset("sprites", fake_lpc, "train")
    a, b = PairSampler(ds.labels, seed=0).pairs(256)
    for name in ("identity",) + SPRITES_LAYERS:
        assert torch.equal(ds.factors[name][a], ds.factors[name][b])
    assert (ds.factors["action"][a] != ds.factors["action"][b]).any()


def test_cache_is_reused_and_a_corrupt_one_rebuilt(fake_lpc, monkeypatch, capfd):
    first = load_dataset("sprites", fake_lpc, "train")
    assert "rendering 2D Sprites" in capfd.readouterr().err
    cache = os.path.join(data_loader.cache_dir(), os.listdir(data_loader.cache_dir())[0])
    assert not cache.startswith(fake_lpc)  # never inside the data folder

    def no_render(*args, **kwargs):
        raise AssertionError("rendered although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(data_loader, "render_sprites", no_render)
        again = load_dataset("sprites", fake_lpc, "train")
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    with open(cache, "r+b") as f:
        f.truncate(os.path.getsize(cache) // 2)
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = load_dataset("sprites", fake_lpc, "train")
    assert torch.equal(first.images, rebuilt.images)
    # other parameters are another cache file, not a stale hit
    monkeypatch.setattr(data_loader, "SPRITES_SEED", 1)
    assert not torch.equal(load_dataset("sprites", fake_lpc, "train").factors["hair"], first.factors["hair"])
    assert len(os.listdir(data_loader.cache_dir())) == 2


def test_train_main_runs_on_sprites(fake_lpc, tmp_path):
    args = train.get_args_parser().parse_args(
        ["--dataset", "sprites", "--data-root", fake_lpc, "--run-dir", str(tmp_path / "R"), "--max-steps", "2",
         "--batch-size", "4", "--no-progress", "--device", "cpu"])
    assert train.main(args) == 0
    ckpt = torch.load(tmp_path / "R" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["model_config"]["image_size"] == 60 and ckpt["args"]["style_dim"] == 512
    assert (tmp_path / "R" / "samples" / "swap_0000002.png").exists()


def test_attributes_are_fitted_on_train_characters_and_tested_on_test_characters(fake_lpc, tmp_path, monkeypatch,
                                                                                  capsys):
    """The attribute protocol: each attribute's classifiers are fitted on the codes of the train split's
    characters and tested on the test split's unseen ones; each split is encoded once for both protocols."""
    monkeypatch.setattr(data_loader, "SPRITES_IDENTITIES", (8, 1, 4))
    run_dir = tmp_path / "R"
    train.main(train.get_args_parser().parse_args(
        ["--dataset", "sprites", "--data-root", fake_lpc, "--run-dir", str(run_dir), "--max-steps", "1",
         "--batch-size", "4", "--no-progress", "--device", "cpu", "--style-dim", "8", "--class-dim", "8"]))
    train_set, test_set = (load_dataset("sprites", fake_lpc, s) for s in ("train", "test"))
    attrs = [n for n in SPRITES_LAYERS if len(train_set.factors[n].unique()) > 1]
    assert len(attrs) >= 3  # eyes has one variant: no target

    encodes, fits, probes = [], [], []
    real_encode, real_fit, real_probe = classify_latents.encode_dataset, classify_latents.train_classifier, \
        classify_latents.linear_probe

    def encode_spy(encoder, images, **kwargs):
        encodes.append((images, real_encode(encoder, images, **kwargs)))
        return encodes[-1][1]

    def fit_spy(features, labels, *args):
        fits.append((features, labels, real_fit(features, labels, *args)))
        return fits[-1][2]

    def probe_spy(fit_x, fit_y, test_x, test_y, seed):
        probes.append((fit_x, test_x))
        return real_probe(fit_x, fit_y, test_x, test_y, seed)

    monkeypatch.setattr(classify_latents, "encode_dataset", encode_spy)
    monkeypatch.setattr(classify_latents, "train_classifier", fit_spy)
    monkeypatch.setattr(classify_latents, "linear_probe", probe_spy)
    res = classify_latents.main(classify_latents.get_args_parser().parse_args(
        ["--checkpoint", str(run_dir), "--epochs", "2", "--no-swap", "--swap-pairs", "16"]))
    # each split encoded once, its codes shared by both protocols; the identity protocol's split first
    assert len(encodes) == 2 and torch.equal(encodes[0][0], test_set.images) and torch.equal(encodes[1][0], train_set.images)
    codes = {"test": encodes[0][1], "train": encodes[1][1]}
    # the identity protocol as before: within the test split; the attributes have a section of their own
    assert res["split"]["rule"].startswith("within-class")
    assert list(res["targets"]) == ["class", "identity", "action", "direction", "frame"]
    at = res["attributes"]
    assert at["protocol"].startswith("attributes: classifiers fitted on the codes of the train split's characters")
    assert (at["fit_images"], at["test_images"], at["fit_identities"], at["test_identities"]) == (8 * 172, 4 * 172, 8, 4)
    assert list(at["targets"]) == attrs
    # the classifiers' calls come target by target, z then s: the attributes' are the last ones
    attr_fits, attr_probes = fits[-2 * len(attrs):], probes[-2 * len(attrs):]
    for i, name in enumerate(attrs):
        fit_y, test_y, k = evaluation.dense_labels(train_set.factors[name], test_set.factors[name])
        row = at["targets"][name]
        assert row["num_classes"] == k
        assert row["chance"] == classify_latents.pc(torch.bincount(test_y).max().item() / len(test_y))
        for j, space in enumerate(("z", "s")):
            features, labels, model = attr_fits[2 * i + j]
            assert torch.equal(features, codes["train"][j]) and torch.equal(labels, fit_y), (name, space)
            assert row["mlp"][f"{space}_train"] == classify_latents.pc(evaluation.accuracy(model, codes["train"][j], fit_y))
            assert row["mlp"][f"{space}_test"] == classify_latents.pc(evaluation.accuracy(model, codes["test"][j], test_y))
            fit_x, test_x = attr_probes[2 * i + j]
            assert torch.equal(fit_x, codes["train"][j]) and torch.equal(test_x, codes["test"][j]), (name, space)
    for key in ("z_train", "z_test", "s_train", "s_test"):
        assert at["mean"]["mlp"][key] == pytest.approx(sum(at["targets"][n]["mlp"][key] for n in attrs) / len(attrs), abs=1e-4)
    assert at["mean"]["chance"] == pytest.approx(sum(at["targets"][n]["chance"] for n in attrs) / len(attrs), abs=1e-4)
    out = capsys.readouterr().out
    assert "Attributes, the published table's protocol" in out and f"| mean | | {at['mean']['chance']:.2f} |" in out


def test_pixel_attributes_fit_on_train_pixels_and_test_on_test_pixels(fake_lpc, monkeypatch, tmp_path):
    """scripts/pixel_attributes.py: the attribute protocol's classifier on the pixels of the train split's
    characters, tested on the test split's; check_results regenerates its Markdown from the JSON."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import check_results
    import pixel_attributes
    monkeypatch.setattr(data_loader, "SPRITES_IDENTITIES", (8, 1, 4))
    train_set, test_set = (load_dataset("sprites", fake_lpc, s) for s in ("train", "test"))
    fits, real_fit = [], classify_latents.train_classifier

    def fit_spy(features, labels, *args):
        fits.append((features, labels, real_fit(features, labels, *args)))
        return fits[-1][2]

    probes, real_probe = [], classify_latents.linear_probe

    def probe_spy(fit_x, fit_y, test_x, test_y, seed):
        probes.append((fit_x, fit_y, test_x, test_y))
        return real_probe(fit_x, fit_y, test_x, test_y, seed)

    monkeypatch.setattr(classify_latents, "train_classifier", fit_spy)
    monkeypatch.setattr(classify_latents, "linear_probe", probe_spy)
    out = tmp_path / "results" / "pixels.json"
    res = pixel_attributes.main(pixel_attributes.get_args_parser().parse_args(
        ["--data-root", fake_lpc, "--epochs", "1", "--fit-every", "2", "--out", str(out)]))
    at = res["attributes"]
    attrs = [n for n in SPRITES_LAYERS if len(train_set.factors[n].unique()) > 1]
    assert res["run"] is None and res["data_root"] == fake_lpc and list(at["targets"]) == attrs
    assert at["protocol"].startswith("attributes: classifiers fitted on the pixels of the train split's characters")
    assert (at["fit_images"], at["test_images"], at["fit_identities"], at["test_identities"]) == (4 * 172, 4 * 172, 8, 4)
    assert res["fit_every"] == 2  # every other image of each train character, all of the test split
    train_px, test_px = (d.images.flatten(1).float() / 255 for d in (train_set, test_set))
    train_px = train_px[::2]
    assert len(fits) == len(probes) == len(attrs)
    for (features, labels, model), (fit_x, probe_y, test_x, probe_test_y), name in zip(fits, probes, attrs):
        fit_y, test_y, k = evaluation.dense_labels(train_set.factors[name][::2], test_set.factors[name])
        assert torch.equal(features, train_px) and torch.equal(labels, fit_y), name
        assert torch.equal(fit_x, train_px) and torch.equal(probe_y, fit_y), name
        assert torch.equal(test_x, test_px) and torch.equal(probe_test_y, test_y), name
        row = at["targets"][name]
        assert row["chance"] == classify_latents.pc(torch.bincount(test_y).max().item() / len(test_y))
        assert row["mlp"]["pixels_test"] == classify_latents.pc(evaluation.accuracy(model, test_px, test_y))
    (out.parent / "pixels.md").write_text(pixel_attributes.markdown(res) + "\n")
    monkeypatch.chdir(tmp_path)
    assert check_results.regenerate_json_tables() == {os.path.join("results", "pixels.md"):
                                                      pixel_attributes.markdown(res) + "\n"}


def test_sampled_z_of_the_class_rows_does_not_depend_on_the_attributes(fake_lpc, tmp_path, monkeypatch):
    """--z-source sample draws eps for the class protocol's split before the attributes' extra split,
    so --factors (the default) and --no-factors give the same identity row."""
    monkeypatch.setattr(data_loader, "SPRITES_IDENTITIES", (8, 1, 4))
    run_dir = tmp_path / "R"
    train.main(train.get_args_parser().parse_args(
        ["--dataset", "sprites", "--data-root", fake_lpc, "--run-dir", str(run_dir), "--max-steps", "1",
         "--batch-size", "4", "--no-progress", "--device", "cpu", "--style-dim", "8", "--class-dim", "8"]))
    rows = [classify_latents.main(classify_latents.get_args_parser().parse_args(
        ["--checkpoint", str(run_dir), "--epochs", "1", "--no-swap", "--no-linear-probe", "--z-source", "sample",
         flag]))["targets"]["class"] for flag in ("--factors", "--no-factors")]
    assert rows[0] == rows[1]


# ----------------------------------------------------------------------------- the real sheets

@needs_lpc
def test_real_sheets_lose_nothing_to_the_60_pixel_crop():
    for paths in data_loader.lpc_layer_files(LPC).values():
        for p in paths:
            sheet = np.asarray(Image.open(p).convert("RGBA"))[..., 3]
            cells = sheet.reshape(21, 64, 13, 64)[:20].transpose(0, 2, 1, 3)  # (row, col, y, x)
            inside = cells[:, :, LPC_CROP_TOP:LPC_CROP_TOP + 60, LPC_CROP_LEFT:LPC_CROP_LEFT + 60]
            assert int(cells.astype(np.int64).sum()) == int(inside.astype(np.int64).sum()), p
            assert read_lpc_sheet(p).shape == (172, 60, 60, 4)


@needs_lpc
def test_real_render_is_deterministic_and_shows_characters(tmp_path, monkeypatch):
    monkeypatch.setenv("DISENTANGLE_CACHE_DIR", str(tmp_path))
    a = load_rendered_sprites(LPC, "train", seed=0, identities=(2, 1, 1))
    b = render_sprites(LPC, seed=0, identities=(2, 1, 1))
    assert torch.equal(a.images, b["images"][:2 * 172])
    assert (a.images[:, :, :3, :3] == 255).all()  # white corners, a character in the middle
    assert (a.images[:, :, 25:35, 25:35] < 250).any(dim=(1, 2, 3)).all()
