"""The model API (utils.load_model: encode, decode, swap, sample) on tiny checkpoints of both recipes,
the torch.hub entry points of hubconf.py, and the README's example."""
import ast
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

import data_loader
import train
import utils
from conftest import ROOT, make_fake_mnist
from networks import AuthorsDecoder, AuthorsEncoder, get_config
from test_repository import python_files

# Tiny runs; the authors' one long enough for its batch norms' running statistics (eval mode) to leave
# their initial values, with which every image gets about the same codes.
RECIPES = {"reference": ["--batch-size", "16", "--max-steps", "2"],
           "authors": ["--recipe", "authors", "--batch-size", "4", "--nf", "4", "--style-dim", "6", "--class-dim", "5",
                       "--max-steps", "30"]}
PRETRAINED = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "pretrained", "*.pt")))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def runs(one_thread, tmp_path_factory):
    """A tiny run of each recipe on fake MNIST, and eight of its test images (uint8)."""
    base = tmp_path_factory.mktemp("model_api")
    root = make_fake_mnist(base / "data")
    out = {"root": root, "images": data_loader.load_dataset("mnist", root, "test").images[:8]}
    for recipe, flags in RECIPES.items():
        train.main(train.get_args_parser().parse_args(
            ["--data-root", root, "--run-dir", str(base / recipe), "--sample-every", "100",
             "--no-progress", *flags]))
        out[recipe] = str(base / recipe)
    return out


@pytest.fixture(scope="module", params=list(RECIPES))
def model(request, runs):
    return utils.load_model(runs[request.param])


def in_unit_range(x):
    return x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1 and not x.requires_grad


def test_load_model_takes_a_run_folder_a_checkpoint_and_a_pretrained_file_in_eval_mode(runs, tmp_path):
    ckpt = os.path.join(runs["reference"], "checkpoints", "last.pt")
    small = str(tmp_path / "small.pt")
    utils.export_pretrained(ckpt, small, allow_dirty=True)
    x = runs["images"]
    codes = [utils.load_model(p).encode(x) for p in (runs["reference"], ckpt, small)]
    for z, s in codes[1:]:
        assert torch.equal(z, codes[0][0]) and torch.equal(s, codes[0][1])
    # eval mode: the authors' batch norms use their running statistics, so an image's codes do not
    # depend on its batch (in training mode they would)
    m = utils.load_model(runs["authors"])
    assert not m.training and not any(mod.training for mod in m.modules())
    z, s = m.encode(x)
    z1, s1 = m.encode(x[:1])
    torch.testing.assert_close(z[:1], z1)
    torch.testing.assert_close(s[:1], s1)
    assert m.checkpoint["step"] == 30 and "encoder" not in m.checkpoint  # the record, not the weights


def test_the_four_verbs_give_shapes_and_ranges_of_the_issue(model, runs):
    x = runs["images"]  # uint8 (8, 1, 28, 28)
    cfg = model.cfg
    z, s = model.encode(x)
    assert z.shape == (8, cfg.style_dim) and s.shape == (8, cfg.class_dim)
    # uint8, float in [0, 1] and (N, H, W) are the same images, whatever range the recipe trains in
    for same in (utils.to_float(x), x[:, 0], utils.to_float(x)[:, 0]):
        z2, s2 = model.encode(same)
        torch.testing.assert_close(z2, z)
        torch.testing.assert_close(s2, s)
    for out in (model.decode(z, s), model.swap(x, x.flip(0)), model.sample(x)):
        assert out.shape == (8, 1, 28, 28) and in_unit_range(out)
    # the decoder's own range, mapped to [0, 1]: tanh's [-1, 1] for the authors' recipe
    raw = model.decoder(z, s).detach()
    torch.testing.assert_close(model.decode(z, s), (raw + 1) / 2 if cfg.recipe == "authors" else raw)


def test_swap_is_decode_of_the_style_of_the_first_and_the_class_of_the_second(model, runs):
    a, b = runs["images"][:4], runs["images"][4:]
    (za, sa), (zb, sb) = model.encode(a), model.encode(b)
    torch.testing.assert_close(model.swap(a, b), model.decode(za, sb))
    assert not torch.allclose(model.swap(a, b), model.decode(zb, sa))


def test_sample_and_encode_with_a_seeded_generator_repeat(model, runs):
    x = runs["images"]
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    assert torch.equal(model.sample(x, generator=g(0)), model.sample(x, generator=g(0)))
    assert not torch.allclose(model.sample(x, generator=g(0)), model.sample(x, generator=g(1)))
    # z ~ N(0, I) comes from the generator, s from the images
    z = torch.randn(len(x), model.cfg.style_dim, generator=g(0))
    torch.testing.assert_close(model.sample(x, generator=g(0)), model.decode(z, model.encode(x)[1]))
    mean, s = model.encode(x)
    z_a, s_a = model.encode(x, sample=True, generator=g(0))
    assert torch.equal(z_a, model.encode(x, sample=True, generator=g(0))[0]) and torch.equal(s_a, s)
    assert not torch.allclose(z_a, mean)


@pytest.mark.parametrize("bad", [torch.rand(2, 3, 28, 28), torch.rand(2, 1, 32, 32), torch.rand(2, 1, 28, 20),
                                 torch.rand(2, 28, 28, 1), torch.rand(28, 28)])
def test_a_wrong_shape_is_one_clear_error_naming_the_expected_shape(runs, bad):
    m = utils.load_model(runs["reference"])
    for call in (lambda: m.encode(bad), lambda: m.swap(bad, bad), lambda: m.sample(bad)):
        with pytest.raises(ValueError, match=re.escape("expected images of shape (N, 1, 28, 28) or (N, 28, 28), got "
                                                       f"{tuple(bad.shape)}")) as e:
            call()
        assert isinstance(e.value, utils.UserError) and "\n" not in str(e.value)


def test_other_bad_input_is_one_clear_error(runs):
    m = utils.load_model(runs["reference"])
    x = runs["images"]
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\].*got values in \[-1, 1\]"):
        m.encode(utils.to_float(x) * 2 - 1)  # the authors' scale
    with pytest.raises(ValueError, match="float images in .0, 1. or uint8 ones, got torch.int64"):
        m.encode(x.long())
    with pytest.raises(ValueError, match=r"z: expected a code of shape \(N, 16\), got \(8, 15\)"):
        m.decode(torch.zeros(8, 15), torch.zeros(8, 16))
    with pytest.raises(ValueError, match="one class image per style image, got 8 style and 3 class images"):
        m.swap(x, x[:3])


def test_the_authors_sprites_networks_take_sprites_images_at_60_or_32():
    cfg = get_config("sprites", "authors", nf=4, style_dim=6, class_dim=5)
    m = utils.TrainedModel(cfg, AuthorsEncoder(cfg), AuthorsDecoder(cfg), {"args": {"dataset": "sprites"}})
    x = torch.randint(0, 256, (2, 3, 60, 60), dtype=torch.uint8)
    z, s = m.encode(x)
    torch.testing.assert_close(m.encode(utils.area_resize(utils.to_float(x), 32))[1], s)  # resized as in training
    assert m.swap(x, x).shape == (2, 3, 32, 32) and in_unit_range(m.sample(x))
    with pytest.raises(ValueError, match=re.escape("(N, 3, 32, 32) or (N, 3, 60, 60), got (2, 60, 60)")):
        m.encode(x[:, 0])


# ----------------------------------------------------------------------------- torch.hub

@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """torch.hub with its cache in tmp_path, any download an error, and this checkout in the cache as
    if downloaded from GitHub as OWNER/REPO:main (how torch.hub.list reads a published repository)."""
    def no_network(*a, **k):
        raise AssertionError("torch.hub tried to reach the network")
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    os.makedirs(tmp_path / "hub")
    os.symlink(ROOT, tmp_path / "hub" / "OWNER_REPO_main")
    return "OWNER/REPO:main"


def test_hub_lists_and_loads_every_pretrained_file_offline(offline_hub):
    assert PRETRAINED and torch.hub.list(offline_hub, trust_repo=True, verbose=False) == PRETRAINED
    for name in PRETRAINED:
        path = os.path.join(ROOT, "pretrained", f"{name}.pt")
        m = torch.hub.load(ROOT, name, source="local")
        assert isinstance(m, utils.TrainedModel) and not m.training and m.checkpoint["path"] == path
        assert m.cfg.to_dict() == torch.load(path, weights_only=True)["model_config"]
        x = torch.randint(0, 256, (4, m.cfg.channels, m.cfg.image_size, m.cfg.image_size), dtype=torch.uint8)
        assert m.swap(x, x).shape == x.shape and in_unit_range(m.sample(x))
    m = torch.hub.load(offline_hub, PRETRAINED[0], trust_repo=True, verbose=False, device="cpu")
    assert isinstance(m, utils.TrainedModel) and m.device == torch.device("cpu")


def test_hub_docs_quote_the_results_of_each_pretrained_file(offline_hub):
    """Each entry point's help names results files of its weights, and their numbers."""
    for name in PRETRAINED:
        doc = torch.hub.help(offline_hub, name, trust_repo=True)
        files = re.findall(r"results/\S+?\.json", doc)
        assert len(files) == 2, name
        res = {json.load(open(os.path.join(ROOT, f)))["z_source"]: json.load(open(os.path.join(ROOT, f))) for f in files}
        small = torch.load(os.path.join(ROOT, "pretrained", f"{name}.pt"), weights_only=True)
        for r in res.values():
            assert (r["step"], r["style_dim"], r["class_dim"]) == (small["step"], small["model_config"]["style_dim"],
                                                                   small["model_config"]["class_dim"]), name
        mlp = {k: r["targets"]["class"]["mlp"] for k, r in res.items()}
        for quoted in (f"s {mlp['sample']['s_test']:.2f}", f"z sampled {mlp['sample']['z_test']:.2f}",
                       f"mean of q(z|x) {mlp['mean']['z_test']:.2f}", f"swap {res['sample']['swap']['swap']:.2f}",
                       f"prior {res['sample']['swap']['prior']:.2f}"):
            assert quoted in doc, (name, quoted)


def test_every_script_loads_networks_through_load_model():
    """One loader: outside utils.py (and train.py's --resume, which restores training state), no code
    calls load_checkpoint or build_models."""
    found = []
    for path, tree in python_files().items():
        if path.startswith("tests/") or path in ("utils.py", "train.py"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                found += [f"{path}:{node.lineno} calls {name}"] if name in ("load_checkpoint", "build_models") else []
    assert not found, "call utils.load_model instead: " + ", ".join(found)


# ----------------------------------------------------------------------------- the README

def readme_example():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Use a trained model in Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section holds one Python example"
    return blocks[0]


def test_readme_example_runs(tmp_path):
    """The example as written, on fake MNIST under $DISENTANGLE_DATA_ROOT, from the repository's root;
    only the grid it saves goes to tmp_path instead."""
    code = readme_example()
    out = tmp_path / "swap.png"
    assert code.count('"swap.png"') == 1
    env = dict(os.environ, DISENTANGLE_DATA_ROOT=make_fake_mnist(tmp_path / "data"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code.replace('"swap.png"', repr(str(out)))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (8 * 30 + 2, 9 * 30 + 2)  # 9 x 8 cells of 28 pixels, padding 2
