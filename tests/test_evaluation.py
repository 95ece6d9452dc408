"""Evaluation commands on a tiny run of fake MNIST: latent classification, swap accuracy,
t-SNE, swap grid, loss curves, the pretrained export, and their errors on bad input."""
import json
import math
import os
import re
import sys
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn

import classify_latents
import data_loader
import train
import tsne_plot
import evaluation
import utils
from conftest import ROOT, make_fake_mnist
from data_loader import ImageSet

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import export_pretrained  # noqa: E402
import loss_curves  # noqa: E402
import swap_grid  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def run(one_thread, tmp_path_factory):
    """A 4-iteration run on fake MNIST, its data root and an exported pretrained file."""
    base = tmp_path_factory.mktemp("eval")
    root = make_fake_mnist(base / "data")
    run_dir = base / "run"
    train.main(train.get_args_parser().parse_args(
        ["--data-root", root, "--run-dir", str(run_dir), "--max-steps", "4", "--batch-size", "16",
         "--sample-every", "100", "--no-progress"]))
    ckpt = str(run_dir / "checkpoints" / "last.pt")
    pretrained = str(base / "pretrained.pt")
    export_pretrained.main(export_pretrained.get_args_parser().parse_args(  # the tests also run on a dirty tree
        ["--checkpoint", ckpt, "--out", pretrained, "--allow-dirty"]))
    return {"root": root, "run_dir": str(run_dir), "ckpt": ckpt, "pretrained": pretrained, "base": base}


def classify(ckpt, *extra):
    return classify_latents.main(classify_latents.get_args_parser().parse_args(
        ["--checkpoint", ckpt, "--epochs", "2", "--swap-train-steps", "5", "--swap-pairs", "64", *extra]))


# ----------------------------------------------------------------------------- latent classification

def test_classify_latents_table_json_and_determinism(run, tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    res = classify(run["ckpt"], "--out", str(a))
    table = capsys.readouterr().out
    assert "| class | 10 | 10.94 |" in table  # 7 of the 64 fake test images share the commonest class
    assert "dec(z_i, s_j) labelled class(j)" in table
    classify(run["ckpt"], "--out", str(b))
    assert a.read_text() == b.read_text()  # same seed, same numbers
    saved = json.loads(a.read_text())
    assert saved["split"]["fit_images"] == 256 and saved["split"]["test_images"] == 64
    assert saved["split"]["rule"].startswith("splits")  # MNIST: train split vs test split
    assert list(saved["targets"]) == ["class"] and "attributes" not in saved  # MNIST has no factors
    row = saved["targets"]["class"]
    assert row["chance"] == pytest.approx(100 * 7 / 64)
    for kind in ("mlp", "linear"):
        assert set(row[kind]) == {"z_train", "z_test", "s_train", "s_test"}
        assert all(0 <= v <= 100 for v in row[kind].values())
    sw = saved["swap"]
    assert sw["pairs"] == 64 and all(0 <= sw[k] <= 100 for k in ("judge_test", "swap", "prior"))
    assert res["targets"] == saved["targets"]
    # one row per digit; the rows' shares, weighted by their pairs, give the overall shares
    assert [r["class"] for r in sw["by_class"]] == list(range(10)) and sum(r["pairs"] for r in sw["by_class"]) == 64
    for k in ("prior", "swap"):
        assert sum(r[k] * r["pairs"] for r in sw["by_class"] if r["pairs"]) / 64 == pytest.approx(sw[k], abs=1e-3)
    assert "| class (of s_j) | pairs |" in table and "| same-class swap: dec(z_i, s_j)" in table
    assert saved["errors"]["pairs"] == 64 and 0 < saved["errors"]["reconstruction"] < 1
    po = saved["posterior"]
    assert len(po["kl_each_dim"]) == 16 and po["kl_per_dim"] == pytest.approx(sum(po["kl_each_dim"]) / 16, abs=1e-5)
    assert po["sigma_mean"] > 0 and po["abs_mu_mean"] > 0


class BarEncoder(nn.Module):
    """Codes of fake MNIST images with the roles known: s is the one-hot class (read from the row of
    the class's bright bar, conftest.make_fake_mnist), z is noise."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.g = torch.Generator().manual_seed(0)

    def forward(self, x):
        first_bright_row = (x[:, 0].amax(2) > 0.5).float().argmax(1)  # 2 + 2 * class
        s = nn.functional.one_hot((first_bright_row - 2) // 2, 16).float()  # s is 16-dim: the decoder takes it
        return torch.randn(len(x), 16, generator=self.g), torch.zeros(len(x), 16), s


def test_classify_latents_reads_the_class_from_s_and_not_from_z(run, monkeypatch):
    """With s = the class and z = noise, the table must say so (z and s swapped anywhere fails)."""
    def load(path, device="cpu"):
        model = utils.load_model(path, device)
        model.encoder = BarEncoder()
        return model

    monkeypatch.setattr(classify_latents, "load_model", load)
    res = classify(run["ckpt"], "--epochs", "3", "--batch-size", "32", "--no-swap")
    row = res["targets"]["class"]
    for kind in ("mlp", "linear"):
        assert row[kind]["s_train"] == row[kind]["s_test"] == 100.0, kind
        assert row[kind]["z_test"] < 35, kind  # chance is 10.94


def test_z_sample_differs_from_mean_and_other_seed_changes_numbers(run):
    ckpt = utils.load_checkpoint(run["ckpt"])
    _, enc, _ = utils.build_models(ckpt)
    x = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    z_mean, s1 = evaluation.encode_dataset(enc, x, batch_size=3)
    z_a, s2 = evaluation.encode_dataset(enc, x, z_source="sample", generator=torch.Generator().manual_seed(0))
    z_b, _ = evaluation.encode_dataset(enc, x, z_source="sample", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s1, s2)  # batch 3 against batch 1000: equal up to float rounding
    z_c, _ = evaluation.encode_dataset(enc, x, z_source="sample", generator=torch.Generator().manual_seed(1))
    assert torch.equal(z_a, z_b) and not torch.allclose(z_a, z_mean)
    assert not torch.allclose(z_c, z_a) and not torch.allclose(z_c, z_mean)  # another seed, other draws
    mu, _, _ = enc(utils.to_float(x))
    torch.testing.assert_close(z_mean, mu)  # batching does not change the codes


def test_reference_classifier_learns_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 5
    x = nn.functional.one_hot(y, 5).float() * 3 + torch.randn(400, 5, generator=g)
    m1 = evaluation.train_classifier(x[:300], y[:300], 5, seed=1, epochs=5, batch_size=32)
    m2 = evaluation.train_classifier(x[:300], y[:300], 5, seed=1, epochs=5, batch_size=32)
    assert evaluation.accuracy(m1, x[300:], y[300:]) > 0.9
    assert all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m2.state_dict().values()))
    tr, te = evaluation.linear_probe(x[:300], y[:300], x[300:], y[300:], seed=0)
    assert te > 0.9
    noise = torch.randn(400, 5, generator=g)  # codes without class information: chance level
    assert evaluation.accuracy(evaluation.train_classifier(noise[:300], y[:300], 5, 0, epochs=5), noise[300:], y[300:]) < 0.45


# ----------------------------------------------------------------------------- swap accuracy

class ToyEncoder(nn.Module):
    """Images whose mean brightness is (class + 1) / 10: z and s are both that brightness."""

    def forward(self, x):
        b = x.mean((1, 2, 3))[:, None]
        return b, torch.zeros_like(b), b


class ToyDecoder(nn.Module):
    """A flat image of the brightness of s (or of z with use_z)."""

    def __init__(self, use_z=False):
        super().__init__()
        self.style_in = nn.Linear(1, 1)
        self.use_z = use_z

    def forward(self, z, s):
        code = z if self.use_z else s
        return code[:, :, None, None].expand(-1, 1, 4, 4)


class ToyJudge(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        c = (x.mean((1, 2, 3)) * 10 - 1).round().long().clamp(0, 4)
        return nn.functional.one_hot(c, 5).float()


def toy_images():
    labels = torch.arange(50) % 5
    return ((labels + 1) * 255 // 10).to(torch.uint8)[:, None, None, None].expand(-1, 1, 4, 4).contiguous(), labels


def test_swap_accuracy_counts_the_class_of_the_s_source():
    images, labels = toy_images()
    follows_s = evaluation.swap_accuracy(ToyEncoder(), ToyDecoder(), ToyJudge(), images, labels, 500, seed=0)
    assert follows_s["swap"] == 1.0 and follows_s["style_leak"] == 0.0
    follows_z = evaluation.swap_accuracy(ToyEncoder(), ToyDecoder(use_z=True), ToyJudge(), images, labels, 500, seed=0)
    assert follows_z["style_leak"] == 1.0
    assert 0.1 < follows_z["swap"] < 0.3  # only the pairs whose two images share a class (1 in 5)


class PriorToyDecoder(ToyDecoder):
    """The brightness of s where z > 0, else class 0's: a prior decode is right for class 0
    always and for the other classes half the time."""

    def forward(self, z, s):
        return super().forward(z, torch.where(z > 0, s, torch.full_like(s, 0.1)))


def test_prior_decodes_by_class_match_a_hand_count():
    images, labels = toy_images()
    res = evaluation.swap_accuracy(ToyEncoder(), PriorToyDecoder(), ToyJudge(), images, labels, 500, seed=3)
    g = torch.Generator().manual_seed(3)  # the same draws, counted by hand
    _, j = evaluation.random_pairs(50, 500, g)
    hit = (torch.randn(500, 1, generator=g)[:, 0] > 0) | (labels[j] == 0)
    assert [r["class"] for r in res["by_class"]] == [0, 1, 2, 3, 4]
    for r in res["by_class"]:
        drawn = labels[j] == r["class"]
        assert r["pairs"] == int(drawn.sum()) and r["prior"] == hit[drawn].float().mean().item()
        assert r["swap"] == 1.0  # z_i > 0 always: the posterior decodes follow s
    assert res["by_class"][0]["prior"] == 1.0 and all(0.3 < r["prior"] < 0.7 for r in res["by_class"][1:])


class Renderer(nn.Module):
    """Draws a 4x4 image: background brightness s[:, 0], one white pixel at position style,
    style = round(z[:, 0]) or, with style_in_s, s[:, 1] (then z is ignored)."""

    def __init__(self, style_in_s):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.style_in_s = style_in_s

    def forward(self, z, s):
        style = (s[:, 1] if self.style_in_s else z[:, 0]).round().long()
        x = s[:, :1, None, None].expand(-1, 1, 4, 4).clone()
        x.view(len(x), 16)[torch.arange(len(x)), style] = 1.0
        return x


def test_same_class_swap_error_is_high_for_a_decoder_that_ignores_z():
    g = torch.Generator().manual_seed(0)
    labels, style = torch.arange(60) % 5, torch.randint(0, 16, (60,), generator=g)
    labels[59] = 7  # a class of one image: never in a pair
    bg = (labels + 1) * 20
    images = bg[:, None].repeat(1, 16).to(torch.uint8)
    images[torch.arange(60), style] = 255
    images = images.view(60, 1, 4, 4)
    brightness = bg.float()[:, None] / 255
    z = style.float()[:, None]  # z carries the style, s the class: both errors are zero
    good = evaluation.swap_errors(Renderer(False), images, labels, z, brightness, 400, seed=1)
    assert good["reconstruction"] < 1e-12 and good["same_class_swap"] < 1e-12 and good["pairs"] == 400
    # s carries everything and the decoder ignores z: a perfect reconstruction, a bad swap
    empty = evaluation.swap_errors(Renderer(True), images, labels, torch.zeros(60, 1),
                              torch.cat([brightness, z], 1), 400, seed=1)
    i, j = evaluation.same_class_pairs(labels, 400, torch.Generator().manual_seed(1))
    assert (i != j).all() and (labels[i] == labels[j]).all() and set(labels[i].tolist()) == {0, 1, 2, 3, 4}
    by_hand = (utils.to_float(images[j]) - utils.to_float(images[i])).pow(2).mean((1, 2, 3)).mean().item()
    assert empty["reconstruction"] < 1e-12
    assert empty["same_class_swap"] == pytest.approx(by_hand) and empty["same_class_swap"] > 0.05
    # no class with two images (a tiny test set): no pairs, reported as such
    alone = evaluation.swap_errors(Renderer(True), images[:5], labels[:5], z[:5], torch.cat([brightness, z], 1)[:5], 9, 1)
    assert alone == {"reconstruction": None, "same_class_swap": None, "pairs": 0}


def test_posterior_stats_by_hand():
    mu = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    logvar = torch.tensor([[0.0, 0.0], [math.log(4), 0.0]])
    st = evaluation.posterior_stats(mu, logvar)
    kl_10 = 0.5 * (4 + 4 - 1 - math.log(4))  # dimension 0 of image 1: mu 2, sigma 2
    assert st["sigma_mean"] == pytest.approx(1.25) and st["abs_mu_mean"] == pytest.approx(0.75)
    assert st["kl_each_dim"] == pytest.approx([kl_10 / 2, 0.25])
    assert st["kl_per_dim"] == pytest.approx((kl_10 + 0.5) / 4)
    # the training loss's KL is the same sum, divided by batch x pixels instead of images x dimensions
    from networks import kl_divergence
    assert kl_divergence(mu, logvar, 784).item() * 784 * 2 == pytest.approx(st["kl_per_dim"] * 2 * 2)


def test_random_pairs_never_pair_an_image_with_itself():
    i, j = evaluation.random_pairs(7, 5000, torch.Generator().manual_seed(0))
    assert (i != j).all() and set(j.tolist()) == set(range(7))


# ----------------------------------------------------------------------------- identity-disjoint datasets

def fake_sprites(root, split):
    """Identities 0-3 in train, 4-7 in test (unseen), 12 images each; integer and float factors."""
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    ids = torch.arange(48) // 12 + (0 if split == "train" else 4)
    action = torch.arange(48) % 3
    images = torch.randint(0, 60, (48, 1, 28, 28), generator=g, dtype=torch.uint8)
    images[torch.arange(48), 0, action * 8, :] = 255
    return ImageSet(images, ids, 8, {"action": action, "frame": torch.arange(48) % 4,
                                     "rotation": torch.randn(48, 9, generator=g), "constant": torch.zeros(48).long()})


def test_split_rule_keeps_every_identity_on_both_sides(monkeypatch):
    train_set, test_set = fake_sprites(None, "train"), fake_sprites(None, "test")
    fit, held, rule = evaluation.classifier_sets(train_set, test_set, seed=0, test_fraction=0.25)
    assert rule.startswith("within-class")
    assert set(fit.labels.tolist()) == set(held.labels.tolist()) == {4, 5, 6, 7}
    assert torch.bincount(held.labels)[4:].tolist() == [3, 3, 3, 3]
    assert len(fit) + len(held) == 48
    # the two sides are disjoint images of the test split
    rows = {tuple(x.flatten().tolist()[:200]) for x in fit.images}
    assert not any(tuple(x.flatten().tolist()[:200]) in rows for x in held.images)
    assert evaluation.integer_factors(fit) == ["action", "frame"]  # float and constant factors skipped
    again = evaluation.classifier_sets(train_set, test_set, seed=0, test_fraction=0.25)[1]
    assert torch.equal(again.images, held.images)
    # MNIST-like: every test class is a train class, so the splits are used as they are
    mnist_fit, mnist_test, rule = evaluation.classifier_sets(train_set, train_set, seed=0)
    assert rule.startswith("splits") and mnist_fit is train_set


@pytest.fixture
def sprites_ckpt(run, tmp_path, monkeypatch):
    monkeypatch.setitem(data_loader.DATASETS, "fakesprites", fake_sprites)
    ckpt = torch.load(run["pretrained"], weights_only=True)
    ckpt["args"]["dataset"] = "fakesprites"
    path = str(tmp_path / "sprites.pt")
    torch.save(ckpt, path)
    return path


def test_classify_latents_reports_each_factor_with_its_chance(sprites_ckpt, capsys):
    res = classify(sprites_ckpt, "--data-root", str(os.path.dirname(sprites_ckpt)), "--no-linear-probe")
    assert list(res["targets"]) == ["class", "action", "frame"]
    assert res["targets"]["class"]["num_classes"] == 4 and res["targets"]["class"]["chance"] == 25.0
    assert res["targets"]["action"]["num_classes"] == 3
    assert res["split"]["rule"].startswith("within-class")
    # each factor's chance is its own commonest value among the 8 held-out test images (2 per
    # identity): actions 3/2/3 -> 37.5%, frames 4/0/2/2 -> 50%; not the class's 25%, nor the fit set's
    assert (res["targets"]["action"]["chance"], res["targets"]["frame"]["chance"]) == (37.5, 50.0)
    assert res["targets"]["frame"]["num_classes"] == 4
    out = capsys.readouterr().out
    assert "| action | 3 | 37.50 |" in out and "| frame | 4 | 50.00 |" in out


def test_tsne_colours_by_a_factor(sprites_ckpt, tmp_path, monkeypatch):
    out, plotted, real_plot = tmp_path / "t.png", [], tsne_plot.plot

    def spy(xy, labels, title, legend_title, path, dpi):
        plotted.append((labels, legend_title))
        return real_plot(xy, labels, title, legend_title, path, dpi)

    monkeypatch.setattr(tsne_plot, "plot", spy)
    xy = tsne_plot.main(tsne_plot.get_args_parser().parse_args(
        ["--checkpoint", sprites_ckpt, "--data-root", str(tmp_path), "--num-points", "40", "--perplexity", "5",
         "--color-by", "action", "--out", str(out)]))
    assert xy.shape == (40, 2) and out.stat().st_size > 5000
    # the points of the seeded subset, coloured by their action (0-2), not by identity (4-7)
    test_set = fake_sprites(None, "test")
    idx = torch.randperm(48, generator=torch.Generator().manual_seed(0))[:40]
    (labels, legend), = plotted
    assert legend == "action" and labels.tolist() == test_set.factors["action"][idx].tolist()


# ----------------------------------------------------------------------------- figures

def test_tsne_plot_writes_a_png(run, tmp_path):
    out = tmp_path / "sub" / "z.png"
    xy = tsne_plot.main(tsne_plot.get_args_parser().parse_args(
        ["--checkpoint", run["ckpt"], "--space", "z", "--num-points", "60", "--perplexity", "5",
         "--threads", "1", "--out", str(out)]))
    assert xy.shape == (60, 2) and torch.isfinite(torch.as_tensor(xy)).all()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_swap_grid_png_and_pdf(run, tmp_path):
    paths = swap_grid.main(swap_grid.get_args_parser().parse_args(
        ["--checkpoint", run["ckpt"], "--rows", "0,5,9", "--num-cols", "4", "--prior-rows", "1",
         "--dpi", "100", "--out", str(tmp_path / "grid")]))
    assert [os.path.basename(p) for p in paths] == ["grid.png", "grid.pdf"]
    assert open(paths[1], "rb").read(5) == b"%PDF-"
    from PIL import Image
    w, h = Image.open(paths[0]).size
    assert (w, h) == (round(5 * 0.45 * 100), round(5 * 0.45 * 100))  # 5 x 5 cells of 0.45 inch at 100 dpi


def test_swap_grid_layout(run):
    ckpt = utils.load_checkpoint(run["ckpt"])
    _, enc, dec = utils.build_models(ckpt)
    data = evaluation.load_eval_data(ckpt, run["root"], "test")
    x = utils.to_float(data.images[:5])
    grid = swap_grid.build_grid(enc, dec, x[:2], x[2:], prior_rows=2, generator=torch.Generator().manual_seed(0))
    assert grid.shape == (1 + 2 + 2, 1 + 3, 1, 28, 28)
    assert (grid[0, 0] == utils.image_background(x)).all() and (grid[3:, 0] == 1).all()  # corner, prior headers
    assert torch.equal(grid[0, 1:], x[2:]) and torch.equal(grid[1:3, 0], x[:2])
    mu, _, _ = enc(x[:1])
    _, _, s = enc(x[3:4])
    torch.testing.assert_close(grid[1, 2], dec(mu, s)[0])  # cell (row 1, column 2) = dec(z_row1, s_col2)
    img = swap_grid.canvas(grid)
    assert img.shape == (5 * 28 + 4, 4 * 28 + 3, 3)


def pdf_first_pixel(path):
    """RGB (0-255) of the top-left pixel of the one image matplotlib embedded in a PDF."""
    data = open(path, "rb").read()
    head, stream = re.search(rb"/Subtype /Image(.*?)>>\s*stream\r?\n(.*?)\r?\nendstream", data, re.S).groups()
    raw = zlib.decompress(stream)
    if b"/Predictor" in head:  # each row opens with a PNG filter byte; every filter predicts 0 for the first byte
        raw = raw[1:]
    if b"/Indexed" in head:  # a palette: /Indexed /DeviceRGB n (bytes), then indices of BitsPerComponent bits
        bits = int(re.search(rb"/BitsPerComponent (\d+)", head).group(1))
        palette = re.search(rb"/Indexed /DeviceRGB \d+\s*\(((?:\\.|[^\\)])*)\)", head, re.S).group(1)
        palette = re.sub(rb"\\(.)", lambda m: {b"n": b"\n", b"r": b"\r"}.get(m.group(1), m.group(1)), palette)
        i = raw[0] >> (8 - bits)
        return tuple(palette[3 * i:3 * i + 3])
    return tuple(raw[:3])


@pytest.mark.parametrize("bg", [0.0, 0.2])
def test_swap_grid_corner_matches_the_background_in_png_and_pdf(run, tmp_path, bg):
    _, enc, dec = utils.build_models(utils.load_checkpoint(run["ckpt"]))
    x = torch.full((4, 1, 28, 28), bg)
    x[:, :, :, 10:14] = torch.rand(4, 1, 28, 4)  # a stroke on a plain background, crossing the border
    grid = swap_grid.build_grid(enc, dec, x[:2], x[2:], prior_rows=1, generator=torch.Generator().manual_seed(0))
    png, pdf = swap_grid.render(grid, 2, 1, str(tmp_path / "g"), dpi=40, cell_inches=0.5)
    from PIL import Image
    rgb = torch.from_numpy(np.array(Image.open(png).convert("RGB"))).int()
    want = round(bg * 255)
    corner = rgb[:18, :18]  # a cell is 0.5 inch = 20 pixels at 40 dpi
    assert (corner - want).abs().max() <= 1, corner[0, 0]
    assert (rgb[:, 25:] - want).abs().max() > 100  # the rest is not all background: the test can see a difference
    assert all(abs(v - want) <= 1 for v in pdf_first_pixel(pdf)), pdf_first_pixel(pdf)


def test_swap_grid_rejects_bad_indices(run, tmp_path):
    args = swap_grid.get_args_parser().parse_args(
        ["--checkpoint", run["ckpt"], "--rows", "0,999", "--out", str(tmp_path / "g")])
    with pytest.raises(utils.UserError, match="999 is out of range"):
        swap_grid.main(args)


def test_loss_curves(run, tmp_path):
    out = tmp_path / "curves.png"
    loss_curves.main(loss_curves.get_args_parser().parse_args([run["run_dir"], "--out", str(out)]))
    assert out.stat().st_size > 10000
    y = torch.rand(50).double().numpy()
    ma = loss_curves.moving_average(y, 7)
    assert ma[0] == pytest.approx(y[0]) and ma[20] == pytest.approx(y[14:21].mean())


@pytest.mark.parametrize("args,gate", [({"recipe": "reference", "disc_gate": 0.9}, 0.9), ({"recipe": "authors", "disc_gate": 0.8}, None),
                                       ({"disc_gate": 0.7}, 0.7)])
def test_loss_curves_mark_the_gate_only_where_the_run_has_one(tmp_path, args, gate):
    (tmp_path / "config.json").write_text(json.dumps({"args": args}))
    assert loss_curves.run_gate(str(tmp_path)) == gate


def fake_run(path, stepped, gate, with_stepped=True):
    """A run directory whose metrics.csv has one row per entry of `stepped`."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"args": {"recipe": "reference", "disc_gate": gate}}))
    cols = "step,epoch,recon_loss,kl,gen_loss,disc_loss,disc_acc" + ",disc_stepped" * with_stepped
    rows = [f"{i + 1},0,{0.5 / (i + 1)},0.02,1.5,1.0,0.7" + f",{d}" * with_stepped for i, d in enumerate(stepped)]
    (path / "metrics.csv").write_text("\n".join([cols] + rows) + "\n")
    return str(path)


def test_loss_curves_overlay_several_runs_with_their_gates_and_discriminator_steps(tmp_path, capsys):
    a = fake_run(tmp_path / "a", [1, 0, 1, 1, 0, 0, 1, 1], gate=0.8)
    b = fake_run(tmp_path / "b", [1, 1, 1, 0, 1], gate=1.0)
    out = tmp_path / "both.png"
    loss_curves.main(loss_curves.get_args_parser().parse_args([a, b, "--labels", "A", "B", "--out", str(out)]))
    assert out.stat().st_size > 10000
    fig = loss_curves.plot([("A", loss_curves.read_metrics(a)), ("B", loss_curves.read_metrics(b))], 2, [0.8, 1.0])
    recon, acc, stepped = fig.axes[0], fig.axes[4], fig.axes[5]
    assert len(fig.axes) == 6 and [line.get_label() for line in recon.lines] == ["A", "B"]
    assert list(recon.lines[1].get_ydata()) == pytest.approx([0.5, 0.375, 0.5 * (1 / 2 + 1 / 3) / 2, 0.5 * (1 / 3 + 1 / 4) / 2, 0.5 * (1 / 4 + 1 / 5) / 2])
    assert list(stepped.lines[0].get_ydata()) == pytest.approx([1, 1 / 2, 2 / 3, 3 / 4, 3 / 5, 3 / 6, 4 / 7, 5 / 8])
    assert list(stepped.lines[1].get_ydata()) == pytest.approx([1, 1, 1, 3 / 4, 4 / 5])
    assert [line.get_label() for line in acc.lines] == ["A", "B", "gate 0.8", "gate 1"]
    loss_curves.main(loss_curves.get_args_parser().parse_args([a, b, "--max-step", "3", "--out", str(out)]))
    assert "(3, 3 iterations" in capsys.readouterr().out
    old = fake_run(tmp_path / "old", [1, 0], gate=0.8, with_stepped=False)  # written before the column existed
    assert len(loss_curves.plot([("old", loss_curves.read_metrics(old))], 1, [0.8]).axes) == 5


@pytest.mark.parametrize("argv,message", [(["--labels", "A", "--out", "x.png"], "1 label"), ([], "need --out")])
def test_loss_curves_of_several_runs_refuse_what_is_ambiguous(tmp_path, argv, message):
    runs = [fake_run(tmp_path / "a", [1], gate=0.8), fake_run(tmp_path / "b", [1], gate=0.8)]
    with pytest.raises(utils.UserError, match=message):
        loss_curves.main(loss_curves.get_args_parser().parse_args(runs + argv))


def test_loss_curves_kl_panel_turns_logarithmic_over_two_decades():
    assert loss_curves.y_scale(np.array([9e4, 60.0, 45.0])) == "log"
    assert loss_curves.y_scale(np.array([0.03, 0.02, 0.025])) == "linear"
    assert loss_curves.y_scale(np.array([5.0, 0.0, 1e4])) == "linear"  # not positive: no log axis


# ----------------------------------------------------------------------------- the pretrained file

def test_pretrained_file_is_small_and_enough_for_every_command(run, tmp_path, monkeypatch):
    monkeypatch.setenv("DISENTANGLE_DATA_ROOT", run["root"])  # the file names no data folder
    small = torch.load(run["pretrained"], weights_only=True)
    assert set(small) == {"format", "model_config", "args", "encoder", "decoder", "step", "epoch", "versions"}
    assert set(small["args"]) >= {"dataset", "style_dim", "class_dim", "seed", "recipe", "gen_steps"}
    assert not set(small["args"]) & set(utils.NOT_TRAINING_ARGS)  # no data or run folder of this machine
    assert os.path.getsize(run["pretrained"]) < os.path.getsize(run["ckpt"]) / 2
    res = classify(run["pretrained"], "--no-linear-probe")
    assert res["step"] == 4
    tsne_plot.main(tsne_plot.get_args_parser().parse_args(
        ["--checkpoint", run["pretrained"], "--num-points", "30", "--perplexity", "3", "--out", str(tmp_path / "t.png")]))
    swap_grid.main(swap_grid.get_args_parser().parse_args(
        ["--checkpoint", run["pretrained"], "--num-rows", "2", "--num-cols", "2", "--out", str(tmp_path / "g")]))
    assert (tmp_path / "t.png").exists() and (tmp_path / "g.pdf").exists()


def test_export_refuses_a_checkpoint_of_uncommitted_code_unless_allowed(run, tmp_path, capsys):
    ck = torch.load(run["ckpt"], weights_only=True)
    for code in ("0123456789ab", "0123456789ab-dirty"):
        ck["versions"]["code"] = code
        torch.save(ck, tmp_path / f"{code}.pt")
    export = export_pretrained.get_args_parser().parse_args
    export_pretrained.main(export(["--checkpoint", str(tmp_path / "0123456789ab.pt"), "--out", str(tmp_path / "a.pt")]))
    assert "uncommitted" not in capsys.readouterr().out
    dirty = ["--checkpoint", str(tmp_path / "0123456789ab-dirty.pt"), "--out", str(tmp_path / "b.pt")]
    with pytest.raises(utils.UserError, match=r"uncommitted changes \(code 0123456789ab-dirty\).*--allow-dirty"):
        export_pretrained.main(export(dirty))
    assert not (tmp_path / "b.pt").exists()
    export_pretrained.main(export(dirty + ["--allow-dirty"]))
    assert "trained from uncommitted changes, recorded as code 0123456789ab-dirty" in capsys.readouterr().out
    assert torch.load(tmp_path / "b.pt", weights_only=True)["versions"]["code"] == "0123456789ab-dirty"


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kind, message", [("garbage", "not a readable checkpoint"),
                                           ("truncated", "not a readable checkpoint"),
                                           ("other_sizes", "other sizes")])
@pytest.mark.parametrize("module, extra", [
    (classify_latents, []), (tsne_plot, ["--out", "x.png"]), (swap_grid, ["--out", "x"]),
    (export_pretrained, ["--out", "x.pt"])])
def test_bad_checkpoint_is_one_error_line_and_exit_2(module, extra, kind, message, run, tmp_path, monkeypatch,
                                                     capsys):
    bad = tmp_path / f"{kind}.pt"
    if kind == "garbage":
        bad.write_bytes(b"not a checkpoint at all" * 10)
    elif kind == "truncated":
        with open(run["pretrained"], "rb") as f:
            bad.write_bytes(f.read()[:3000])
    else:  # a config that does not match the weights it holds
        ck = torch.load(run["pretrained"], weights_only=True)
        ck["model_config"]["class_dim"] = 5
        torch.save(ck, bad)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [module.__name__, "--checkpoint", str(bad), *extra])
    with pytest.raises(SystemExit) as e:
        utils.run_cli(module.main, module.get_args_parser())
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not os.path.exists(tmp_path / "x.png") and not os.path.exists(tmp_path / "x.pt")


def test_loss_curves_on_a_folder_that_is_no_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "metrics.csv").write_text("garbage\n1,2\n")
    monkeypatch.setattr(sys, "argv", ["loss_curves", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        utils.run_cli(loss_curves.main, loss_curves.get_args_parser())
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "lacks the column" in err[0]


def test_missing_data_root_names_the_flag(run, tmp_path):
    args = classify_latents.get_args_parser().parse_args(
        ["--checkpoint", run["pretrained"], "--data-root", str(tmp_path / "nowhere")])
    with pytest.raises(utils.UserError, match="does not exist") as given:
        classify_latents.main(args)
    assert "--data-root" not in str(given.value)  # the user's own flag: nothing to add
    # the checkpoint's data root is gone (a run moved to another machine): the message names the flag
    ck = torch.load(run["pretrained"], weights_only=True)
    ck["args"]["data_root"] = str(tmp_path / "moved")
    torch.save(ck, tmp_path / "moved.pt")
    args = classify_latents.get_args_parser().parse_args(["--checkpoint", str(tmp_path / "moved.pt")])
    with pytest.raises(utils.UserError, match=r"does not exist.*comes from the checkpoint; pass --data-root"):
        classify_latents.main(args)


def test_a_run_directory_is_a_checkpoint(run):
    """--checkpoint accepts the run directory and reads its checkpoints/last.pt."""
    flags = ("--no-swap", "--no-linear-probe")
    by_dir, by_file = classify(run["run_dir"], *flags), classify(run["ckpt"], *flags)
    assert by_dir == by_file and by_dir["checkpoint"] == os.path.abspath(run["ckpt"])


def test_split_rule_uses_global_identities_where_labels_restart_per_split():
    """Sprites labels are 0..K-1 within each split; the global identity factor decides the rule."""
    from data_loader import ImageSet
    images = torch.zeros(40, 1, 4, 4, dtype=torch.uint8)
    train_set = ImageSet(images, torch.arange(40) % 4, 4, {"identity": torch.arange(40) % 4})
    test_set = ImageSet(images, torch.arange(40) % 4, 4, {"identity": 10 + torch.arange(40) % 4})
    fit, test, rule = evaluation.classifier_sets(train_set, test_set, seed=0)
    assert rule.startswith("within-class") and len(fit) + len(test) == 40
