"""The authors' recipe (--recipe authors): their networks' shapes, every loss term against a
hand-written computation, the label lookups, the triplets, the 1:1 schedule, exact resume, and
the evaluation commands on an authors checkpoint."""
import csv
import json
import os
import sys

import pytest
import torch

import classify_latents
import data_loader
import train
import tsne_plot
import evaluation
import utils
from conftest import ROOT, make_fake_mnist
from data_loader import ImageSet, TripletSampler, conditioning_labels
from distributed import World
from networks import (AuthorsDecoder, AuthorsDiscriminator, AuthorsEncoder, LabelMaps, authors_kl, get_config,
                      reparameterize)
from test_sprites import FAKE_VARIANTS, write_fake_lpc

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import swap_grid  # noqa: E402

SMALL = ["--nf", "4", "--style-dim", "6", "--class-dim", "5"]  # the authors' networks, narrow: fast tests


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def fake_lpc(tmp_path, monkeypatch):
    monkeypatch.setenv("DISENTANGLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data_loader, "SPRITES_IDENTITIES", (5, 2, 3))
    return write_fake_lpc(tmp_path / "data")


def tiny_set(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8), torch.arange(n) % 4, 4)


def make_trainer(*argv, data=None):
    args = train.get_args_parser().parse_args(["--recipe", "authors", "--batch-size", "4", *SMALL, *argv])
    data = data or tiny_set()
    cfg = get_config("mnist", "authors", nf=4, style_dim=6, class_dim=5, label_sizes=conditioning_labels(data)[1])
    torch.manual_seed(0)
    return train.make_trainer(cfg, args, data, torch.device("cpu"))


# ----------------------------------------------------------------------------- networks and data

@pytest.mark.parametrize("dataset,size,channels", [("mnist", 28, 1), ("sprites", 32, 3)])
def test_shapes_of_the_authors_networks(dataset, size, channels):
    cfg = get_config(dataset, "authors", label_sizes=(10,) if dataset == "mnist" else (2, 3, 4, 5, 6, 7))
    assert (cfg.nf, cfg.style_dim, cfg.class_dim) == (16, 512, 64)  # their defaults
    enc, dec, disc = AuthorsEncoder(cfg), AuthorsDecoder(cfg), AuthorsDiscriminator(cfg)
    x = torch.rand(3, channels, size, size) * 2 - 1
    mu, v, s = enc(x)
    assert mu.shape == v.shape == (3, 512) and s.shape == (3, 64)
    assert enc.convs(torch.zeros(3, channels, 32, 32)).shape == (3, 128, 4, 4)  # 8 nf x 4 x 4
    y = dec(mu, s)
    assert y.shape == x.shape and y.abs().max() <= 1  # tanh, cropped back to the input size
    labels = torch.zeros(3, len(cfg.label_sizes), dtype=torch.long)
    assert disc(x, labels).shape == (3,)


def test_images_are_scaled_to_minus_one_one_and_sprites_area_resized():
    u8 = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 1, 1, 3).expand(2, 3, 60, 3).repeat(1, 1, 1, 20)
    cfg = get_config("sprites", "authors")
    x = utils.model_images(u8, cfg)
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    # output pixel i covers input pixels [1.875 i, 1.875 (i + 1)): pixel 1 is 0.125 of input 1, all of 2, 0.75 of 3
    img = torch.randint(0, 256, (1, 3, 60, 60), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    scaled = img.float() / 127.5 - 1
    w0, w1 = torch.tensor([1.0, 0.875]), torch.tensor([0.125, 1.0, 0.75])
    out = utils.model_images(img, cfg)
    torch.testing.assert_close(out[0, :, 0, 0], torch.einsum("a,b,cab->c", w0, w0, scaled[0, :, :2, :2]) / 1.875 ** 2)
    torch.testing.assert_close(out[0, :, 1, 1], torch.einsum("a,b,cab->c", w1, w1, scaled[0, :, 1:4, 1:4]) / 1.875 ** 2)
    # an area resize keeps a constant image constant and averages by covered share: 3 -> 2 pixels
    torch.testing.assert_close(utils.area_resize(torch.full((1, 1, 60, 60), 0.3), 32), torch.full((1, 1, 32, 32), 0.3))
    a = torch.tensor([[1.0, 4.0, 7.0], [0.0, 0.0, 0.0], [3.0, 3.0, 3.0]]).view(1, 1, 3, 3)
    cols = torch.tensor([(1 + 0.5 * 4) / 1.5, (0.5 * 4 + 7) / 1.5])
    torch.testing.assert_close(utils.area_resize(a, 2)[0, 0, 0], (cols + 0.5 * 0) / 1.5)
    mnist = get_config("mnist", "authors")
    x = utils.model_images(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).repeat(1, 1, 28, 14), mnist)
    assert x.shape == (1, 1, 28, 28) and x.min() == -1 and x.max() == 1  # MNIST: scaled, not resized
    torch.testing.assert_close(utils.display_images(x, mnist), utils.to_float(
        torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).repeat(1, 1, 28, 14)))


def test_mnist_is_zero_padded_to_32_inside_the_networks():
    cfg = get_config("mnist", "authors")
    enc = AuthorsEncoder(cfg)
    seen = []
    enc.convs[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    enc(torch.full((1, 1, 28, 28), -1.0))
    assert seen[0].shape == (1, 1, 32, 32)
    assert (seen[0][..., 2:30, 2:30] == -1).all() and seen[0][..., :2, :].eq(0).all()  # a 2-pixel zero frame


def test_label_maps_pick_the_rows_of_each_label():
    maps = LabelMaps((3, 5), planes=2, side=2, scale=2)  # 8 entries: 4 from each label's table
    with torch.no_grad():
        for j, table in enumerate(maps.tables):
            table.weight.copy_(100 * j + torch.arange(table.weight.numel()).view_as(table.weight).float())
    out = maps(torch.tensor([[2, 0], [1, 4]]))
    assert out.shape == (2, 2, 4, 4)
    for b, (r0, r1) in enumerate([(2, 0), (1, 4)]):
        want = torch.cat([maps.tables[0].weight[r0], maps.tables[1].weight[r1]]).view(2, 2, 2)
        assert torch.equal(out[b], want.repeat_interleave(2, 1).repeat_interleave(2, 2))  # nearest upsampling
    uneven = LabelMaps((2,) * 6, planes=16, side=4, scale=1)  # 256 entries over 6 labels: 43 x 4 + 42 x 2
    assert [t.embedding_dim for t in uneven.tables] == [43, 43, 43, 43, 42, 42]


def test_sprites_condition_on_each_layer_in_order(fake_lpc):
    ds = data_loader.load_dataset("sprites", fake_lpc, "train")
    labels, sizes = conditioning_labels(ds)
    assert labels.shape == (len(ds), 6)
    for j, name in enumerate(data_loader.SPRITES_LAYERS):
        assert torch.equal(labels[:, j], ds.factors[name])
        assert sizes[j] <= FAKE_VARIANTS[name]
    mnist_like = tiny_set()
    labels, sizes = conditioning_labels(mnist_like)
    assert torch.equal(labels[:, 0], mnist_like.labels) and sizes == (4,)


def test_triplets_share_a_class_and_draw_classes_uniformly():
    labels = torch.cat([torch.zeros(900), torch.ones(50), torch.full((50,), 2)]).long()  # class 0: 90%
    s = TripletSampler(labels, seed=0)
    i1, i2, i3 = s.triplets(6000)
    assert torch.equal(labels[i1], labels[i2])
    for c in (labels[i1], labels[i3]):
        share = torch.bincount(c, minlength=3).float() / 6000
        assert (share - 1 / 3).abs().max() < 0.03  # uniform over classes, not over images
    assert (labels[i1] != labels[i3]).any() and (i1 != i2).float().mean() > 0.5
    state = s.state_dict()
    a = s.triplets(5)
    s.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(a, s.triplets(5)))


# ----------------------------------------------------------------------------- the losses

def bce(p, target):
    return -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()


def test_every_loss_term_equals_a_hand_written_computation():
    t = make_trainer("--rec-weight", "0.3", "--swap-weight", "2", "--adv-weight", "0.07", "--kl-weight", "0.4",
                     "--real-target", "0.9")
    B, data = 4, tiny_set()
    enc, dec, disc = (type(n)(t.cfg) for n in t.nets())
    for copy, net in zip((enc, dec, disc), t.nets()):
        copy.load_state_dict(net.state_dict())
    sampler_state, noise_state = t.sampler.state_dict(), t.noise.get_state()
    losses = []
    real_update = t.update
    t.update = lambda opt, loss, inputs=None: (losses.append(loss.detach()), real_update(opt, loss, inputs))
    torch.manual_seed(7)  # dropout masks
    m = train.authors_iteration(t)

    # by hand, with the weights from before the iteration
    sampler = TripletSampler(data.labels, 0)
    sampler.load_state_dict(sampler_state)
    i1, i2, i3 = sampler.triplets(B)
    x1, x2, x3 = (data.images[i].float() / 127.5 - 1 for i in (i1, i2, i3))
    c2, c3 = data.labels[i2], data.labels[i3]  # MNIST: the digit is the label
    eps = torch.randn(7 * B, 6, generator=torch.Generator().set_state(noise_state))
    torch.manual_seed(7)
    mu, v, s = enc(torch.cat([x1, x2, x3]))
    (m1, m2, m3), (v1, v2, v3), (s1, s2, s3) = mu.split(B), v.split(B), s.split(B)
    zs = [reparameterize(m_, v_, e) for (m_, v_), e in
          zip([(m1, v1), (m2, v2), (m3, v3), (m1, v1), (m2, v2), (m3, v3), (m2, v2)], eps.split(B))]
    y = dec(torch.cat(zs), torch.cat([s1, s2, s3, s2, s1, s2, s3])).split(B)
    rec = sum(((y[i] - x) ** 2).sum() for i, x in enumerate((x1, x2, x3))) / (3 * B * 28 * 28)
    swap = (((y[3] - x1) ** 2).sum() + ((y[4] - x2) ** 2).sum()) / (2 * B * 28 * 28)
    fake = torch.cat([y[5], y[6]])  # dec(z3, s2), dec(z2, s3)
    adv = bce(torch.sigmoid(disc(fake, torch.cat([c2, c3]))), 0.9)
    kl = sum(0.5 * (m_ ** 2 + torch.exp(2 * v_) - 2 * v_ - 1).sum() for m_, v_ in zip(mu, v)) / (3 * B)
    gen_total = 0.3 * rec + 2 * swap + 0.07 * adv + 0.4 * 6 / (28 * 28) * kl
    d_real = torch.sigmoid(disc(torch.cat([x2, x3]), torch.cat([c2, c3])))
    d_fake = torch.sigmoid(disc(fake.detach(), torch.cat([c2, c3])))
    d_total = bce(d_real, 0.9) + bce(d_fake, 0.0)

    for name, want in (("recon_loss", rec), ("swap_loss", swap), ("gen_loss", adv), ("kl", kl),
                       ("disc_loss", d_total)):
        assert m[name] == pytest.approx(want.item(), rel=1e-4), name
    torch.testing.assert_close(losses[0], gen_total.detach(), rtol=1e-5, atol=1e-7)  # the weighted objective
    torch.testing.assert_close(losses[1], d_total.detach(), rtol=1e-5, atol=1e-7)
    acc = (torch.cat([d_real > 0.5, d_fake < 0.5]).float().mean()).item()
    assert m["disc_acc"] == pytest.approx(acc)


def test_kl_gradient_is_their_criterions_gradient():
    """Their KL criterion returns d/dmu = mu / N and d/dv = (exp(2v) - 1) / N (N = batch)."""
    mu, v = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    authors_kl(mu, v).backward()
    torch.testing.assert_close(mu.grad, mu.detach() / 5)
    torch.testing.assert_close(v.grad, (torch.exp(2 * v.detach()) - 1) / 5)


# ----------------------------------------------------------------------------- schedule and runs

def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_one_generator_and_one_discriminator_update_per_iteration():
    t = make_trainer()
    order = []
    real_update = t.update
    t.update = lambda opt, loss, inputs=None: (order.append(opt), real_update(opt, loss, inputs))
    for k in range(3):
        before = snapshot(t.discriminator)
        m = train.authors_iteration(t)
        assert m["disc_stepped"] == 1
        assert not all(torch.equal(before[n], v) for n, v in snapshot(t.discriminator).items())
    assert order == [t.opt_gen, t.opt_disc] * 3  # 1:1, generator first, no gate
    assert isinstance(t.opt_disc, torch.optim.SGD) and t.opt_disc.defaults["lr"] == 0.01
    assert int(t.opt_gen.state[t.ae_params[0]]["step"]) == 3 and t.opt_gen.defaults["lr"] == 0.01


def test_an_iteration_makes_no_tensor_from_python_data_and_freezes_the_discriminator(monkeypatch):
    """After the first iteration, the decoder's row indices, the BCE targets and the resize weights are
    reused: no tensor is made from Python data (on a GPU each is a pageable copy that waits for the
    stream), one host read in all; the generator's pass through the discriminator computes no
    gradient of its weights."""
    from benchmarks import train_throughput as bench
    t = make_trainer()
    frozen_during, real_disc = [], t.disc_local
    monkeypatch.setattr(t, "disc_local", lambda *a: frozen_during.append(
        not any(p.requires_grad for p in t.discriminator.parameters())) or real_disc(*a))
    train.authors_iteration(t)
    host = bench.optimizer_host_tensors([t.opt_gen])
    _, _, syncs = bench.count_ops(lambda: train.authors_iteration(t), 1, host)
    assert syncs == {"tolist": 1.0} and frozen_during == [True, True]
    x = torch.rand(2, 3, 60, 60)
    utils.area_resize(x, 31)
    w = utils.area_weights(60, 31, x.device, x.dtype)
    resize, products = bench.OpCounter(), bench.OpCounter()
    with resize:
        out = utils.area_resize(x, 31)
    with products:
        w @ x @ w.T
    assert resize.ops == products.ops  # the products alone: the weights are made once per shape and device
    assert torch.equal(out, w @ x @ w.T)


def run(argv):
    return train.main(train.get_args_parser().parse_args(argv + ["--no-progress"]))


def common(data, run_dir):
    return ["--recipe", "authors", "--data-root", data, "--run-dir", str(run_dir), "--batch-size", "4", "--seed", "3",
            "--sample-every", "3", "--log-every", "2", *SMALL]


def test_resume_is_exact_and_keeps_the_recipe(fake_mnist, tmp_path):
    run(common(fake_mnist, tmp_path / "a") + ["--max-steps", "6"])
    run(common(fake_mnist, tmp_path / "b") + ["--max-steps", "3"])
    run(["--resume", str(tmp_path / "b" / "checkpoints" / "last.pt"), "--max-steps", "6"])  # no --recipe given
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.pt", weights_only=True) for r in "ab")
    assert a["step"] == b["step"] == 6 and b["args"]["recipe"] == "authors"
    assert b["model_config"]["recipe"] == "authors" and tuple(b["model_config"]["label_sizes"]) == (10,)
    for name in ("encoder", "decoder", "discriminator"):  # weights and batch-norm statistics
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    assert "opt_ae" not in b
    for name in ("opt_gen", "opt_disc"):
        sa, sb = a[name]["state"], b[name]["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k][j], sb[k][j]) for k in sa for j in sa[k])
    rows = [list(csv.reader(open(tmp_path / r / "metrics.csv"))) for r in "ab"]
    assert rows[0] == rows[1] and rows[0][0][2:4] == ["recon_loss", "swap_loss"]
    config = json.load(open(tmp_path / "a" / "config.json"))
    assert config["args"]["recipe"] == "authors" and config["args"]["lr_gen"] == 0.01
    assert config["model_config"]["nf"] == 4
    with pytest.raises(train.CheckpointError, match="--lr-gen 0.001 differs from the checkpoint's 0.01"):
        run(["--resume", str(tmp_path / "b" / "checkpoints" / "last.pt"), "--max-steps", "7", "--lr-gen", "0.001"])


def test_a_checkpoint_from_before_the_recipes_resumes_as_reference(fake_mnist, tmp_path):
    argv = ["--data-root", fake_mnist, "--run-dir", str(tmp_path), "--batch-size", "8"]
    run(argv + ["--max-steps", "1"])
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["args"]["recipe"] == "reference" and ckpt["args"]["batch_size"] == 8
    for k in ["recipe", *train.AUTHORS_ONLY]:  # what a checkpoint written before --recipe lacks
        del ckpt["args"][k]
    torch.save(ckpt, path)
    assert run(["--resume", str(path), "--max-steps", "2"]) == 0
    again = torch.load(path, weights_only=True)
    assert again["step"] == 2 and again["args"]["recipe"] == "reference" and "opt_ae" in again


def test_flags_of_the_other_recipe_are_refused(fake_mnist, tmp_path):
    with pytest.raises(train.UserError, match="--disc-gate belongs to the other recipe"):
        run(common(fake_mnist, tmp_path) + ["--disc-gate", "0.5", "--max-steps", "1"])
    with pytest.raises(train.UserError, match="--lr-gen belongs to the other recipe"):
        run(["--data-root", fake_mnist, "--run-dir", str(tmp_path), "--lr-gen", "0.1", "--max-steps", "1"])
    with pytest.raises(train.UserError, match="ported for mnist and sprites"):
        run(common(fake_mnist, tmp_path) + ["--dataset", "linemod", "--max-steps", "1"])
    assert not os.path.exists(tmp_path / "config.json")
    args = train.get_args_parser().parse_args(common(fake_mnist, tmp_path / "ddp") + ["--batch-size", "4"])
    with pytest.raises(train.UserError, match="runs in one process"):  # as one of two torchrun processes
        train.run_training(args, None, get_config("mnist", "authors"), World(rank=0, size=2), torch.device("cpu"))
    assert not os.path.exists(tmp_path / "ddp")


def test_train_main_runs_the_authors_recipe_on_sprites(fake_lpc, tmp_path):
    assert run(["--recipe", "authors", "--dataset", "sprites", "--data-root", fake_lpc, "--run-dir",
                str(tmp_path / "R"), "--max-steps", "2", "--batch-size", "4", "--nf", "6"]) == 0
    ckpt = torch.load(tmp_path / "R" / "checkpoints" / "last.pt", weights_only=True)
    cfg = ckpt["model_config"]
    assert (cfg["image_size"], cfg["channels"], cfg["style_dim"], cfg["class_dim"]) == (32, 3, 512, 64)
    assert len(cfg["label_sizes"]) == 6  # one lookup per layer
    from PIL import Image
    assert Image.open(tmp_path / "R" / "samples" / "swap_0000002.png").size == (9 * 34 + 2, 9 * 34 + 2)


# ----------------------------------------------------------------------------- evaluation

@pytest.fixture(scope="module")
def authors_run(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("authors_eval")
    root = make_fake_mnist(base / "data")
    run(common(root, base / "run") + ["--max-steps", "3"])
    return {"root": root, "ckpt": str(base / "run" / "checkpoints" / "last.pt")}


def record_encoder_inputs(monkeypatch):
    seen = []
    real = AuthorsEncoder.forward
    monkeypatch.setattr(AuthorsEncoder, "forward", lambda self, x: (seen.append(x), real(self, x))[1])
    return seen


def test_classify_latents_on_an_authors_checkpoint(authors_run, monkeypatch):
    seen = record_encoder_inputs(monkeypatch)
    res = classify_latents.main(classify_latents.get_args_parser().parse_args(
        ["--checkpoint", authors_run["ckpt"], "--epochs", "1", "--swap-train-steps", "3", "--swap-pairs", "32",
         "--no-linear-probe"]))
    assert res["style_dim"] == 6 and 0 <= res["swap"]["swap"] <= 100
    # every encoder call (codes, posterior statistics, errors) got [-1, 1] images: MNIST's black is -1
    assert all(x.min() == -1 for x in seen) and max(x.max() for x in seen) <= 1


def test_tsne_on_an_authors_checkpoint(authors_run, tmp_path, monkeypatch):
    seen = record_encoder_inputs(monkeypatch)
    xy = tsne_plot.main(tsne_plot.get_args_parser().parse_args(
        ["--checkpoint", authors_run["ckpt"], "--num-points", "30", "--perplexity", "5", "--out",
         str(tmp_path / "t.png")]))
    assert xy.shape == (30, 2) and min(x.min() for x in seen) == -1


def test_swap_grid_on_an_authors_checkpoint_shows_images_in_zero_one(authors_run, tmp_path, monkeypatch):
    grids = []
    real_render = swap_grid.render
    monkeypatch.setattr(swap_grid, "render", lambda grid, *a: (grids.append(grid), real_render(grid, *a))[1])
    swap_grid.main(swap_grid.get_args_parser().parse_args(
        ["--checkpoint", authors_run["ckpt"], "--rows", "0,1", "--cols", "2,3,4", "--prior-rows", "1",
         "--dpi", "50", "--out", str(tmp_path / "g")]))
    data = evaluation.load_eval_data(utils.load_checkpoint(authors_run["ckpt"]), authors_run["root"], "test")
    grid = grids[0]
    assert grid.shape == (1 + 2 + 1, 1 + 3, 1, 28, 28) and grid.min() >= 0 and grid.max() <= 1
    torch.testing.assert_close(grid[0, 1:], utils.to_float(data.images[2:5]))  # the column images as they are
    assert (tmp_path / "g.png").exists()
