"""scripts/import_reference.py: the reference's released weights, renamed into our networks, compute
what the reference's networks computed in training mode."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, SHARED_DATA
from utils import CheckpointError, build_models, load_checkpoint

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import import_reference  # noqa: E402

REFERENCE_DIR = os.path.join(os.path.dirname(SHARED_DATA), "reference-checkpoint", "mnist_z16_s16")
needs_reference = pytest.mark.skipif(
    not os.path.isfile(os.path.join(REFERENCE_DIR, "encoder")),
    reason=f"the reference's released weights are not in {REFERENCE_DIR} (the shared folder is absent)")


# ---------------------------------------------------------------- the reference's forward pass, written out
# Layer by layer as the reference's networks.py defines them (MNIST: 5x5 stride-2 convolutions, padding 1;
# 4x4 stride-2 transposed convolutions, paddings 0, 0, 1), in training mode: its InstanceNorm2d
# (affine=False, track_running_stats=True) then normalises each image with its own statistics.

def norm(sd, name, h):
    running = [sd[f"{name}_in.running_{s}"].clone() for s in ("mean", "var")]  # updated in place in training mode
    return F.instance_norm(h, *running, use_input_stats=True)


def ref_convs(sd, h, act):
    for i in (1, 2, 3):
        name = f"conv_model.convolution_{i}"
        h = act(norm(sd, name, F.conv2d(h, sd[name + ".weight"], sd[name + ".bias"], stride=2, padding=1)))
    return h.view(h.size(0), -1)


def ref_encoder(sd, x):
    h = ref_convs(sd, x, F.relu)
    return tuple(F.linear(h, sd[k + ".weight"], sd[k + ".bias"]) for k in ("style_mu", "style_logvar", "class_output"))


def ref_decoder(sd, z, s):
    h = torch.cat([F.leaky_relu(F.linear(z, sd["style_input.weight"], sd["style_input.bias"]), 0.2),
                   F.leaky_relu(F.linear(s, sd["class_input.weight"], sd["class_input.bias"]), 0.2)], 1)
    h = h.view(h.size(0), 128, 2, 2)
    for i, pad in ((1, 0), (2, 0), (3, 1)):
        name = f"deconv_model.deconvolution_{i}"
        h = F.conv_transpose2d(h, sd[name + ".weight"], sd[name + ".bias"], stride=2, padding=pad)
        if i < 3:
            h = F.leaky_relu(norm(sd, name, h), 0.2)
    return torch.sigmoid(h)


def ref_discriminator(sd, a, b):
    h = ref_convs(sd, torch.cat([a, b], 1), lambda t: F.leaky_relu(t, 0.2))
    return F.linear(h, sd["fully_connected_model.output.weight"], sd["fully_connected_model.output.bias"])


def synthetic_reference(folder, style_dim=5, class_dim=7, seed=0):
    """State dicts with the reference's key names and MNIST shapes, random values (z, s of other sizes)."""
    g = torch.Generator().manual_seed(seed)

    def conv(name, cout, cin, k, transposed=False):
        shape = (cin, cout, k, k) if transposed else (cout, cin, k, k)
        return {f"{name}.weight": torch.randn(shape, generator=g) * 0.1, f"{name}.bias": torch.randn(cout, generator=g) * 0.1,
                f"{name}_in.running_mean": torch.randn(cout, generator=g), f"{name}_in.running_var": torch.rand(cout, generator=g) + 0.5}

    def linear(name, cout, cin):
        return {f"{name}.weight": torch.randn(cout, cin, generator=g) * 0.1, f"{name}.bias": torch.randn(cout, generator=g) * 0.1}

    enc = {**conv("conv_model.convolution_1", 16, 1, 5), **conv("conv_model.convolution_2", 32, 16, 5),
           **conv("conv_model.convolution_3", 64, 32, 5), **linear("style_mu", style_dim, 256),
           **linear("style_logvar", style_dim, 256), **linear("class_output", class_dim, 256)}
    dec = {**linear("style_input", 256, style_dim), **linear("class_input", 256, class_dim),
           **conv("deconv_model.deconvolution_1", 32, 128, 4, True), **conv("deconv_model.deconvolution_2", 16, 32, 4, True),
           **conv("deconv_model.deconvolution_3", 1, 16, 4, True)}
    del dec["deconv_model.deconvolution_3_in.running_mean"], dec["deconv_model.deconvolution_3_in.running_var"]
    disc = {**conv("conv_model.convolution_1", 32, 2, 5), **conv("conv_model.convolution_2", 64, 32, 5),
            **conv("conv_model.convolution_3", 128, 64, 5), **linear("fully_connected_model.output", 2, 512)}
    os.makedirs(folder, exist_ok=True)
    for name, sd in (("encoder", enc), ("decoder", dec), ("discriminator", disc)):
        torch.save(sd, os.path.join(folder, name))
    return str(folder)


def run_import(ref_dir, out):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "import_reference.py"),
                           "--reference-dir", str(ref_dir), "--out", str(out)], capture_output=True, text=True, cwd=ROOT)


def check_same_function(ref_dir, out_path):
    """Imported networks (rebuilt from the file alone, eval mode) == the reference's training-mode forward."""
    ckpt = load_checkpoint(str(out_path))
    cfg, enc, dec, disc = build_models(ckpt, with_discriminator=True)
    sds = {n: torch.load(os.path.join(ref_dir, n), map_location="cpu", weights_only=True) for n in ("encoder", "decoder", "discriminator")}
    torch.manual_seed(0)
    x, y = torch.rand(6, 1, 28, 28), torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        for ours, ref in zip(enc(x), ref_encoder(sds["encoder"], x)):
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
        z, s = torch.randn(6, cfg.style_dim), torch.randn(6, cfg.class_dim)
        torch.testing.assert_close(dec(z, s), ref_decoder(sds["decoder"], z, s), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(disc(x, y), ref_discriminator(sds["discriminator"], x, y), rtol=1e-4, atol=1e-5)
    return cfg


def test_imported_synthetic_weights_compute_the_reference_forward(tmp_path):
    ref_dir = synthetic_reference(tmp_path / "ref")
    r = run_import(ref_dir, tmp_path / "R.pt")  # the command itself, once
    assert r.returncode == 0, r.stderr
    cfg = check_same_function(ref_dir, tmp_path / "R.pt")
    assert (cfg.style_dim, cfg.class_dim) == (5, 7)  # code sizes read from the weights


@needs_reference
def test_imported_released_weights_compute_the_reference_forward(tmp_path):
    import_reference.main(import_reference.get_args_parser().parse_args(
        ["--reference-dir", REFERENCE_DIR, "--out", str(tmp_path / "R.pt")]))
    cfg = check_same_function(REFERENCE_DIR, tmp_path / "R.pt")
    assert (cfg.style_dim, cfg.class_dim) == (16, 16)
    src = torch.load(tmp_path / "R.pt", weights_only=True)["source"]["sha256"]
    assert src["encoder"] == "1a5e9b54c377fc8eae637e07d907f3b8cef72ef7157771a05ae7bf86744d0a78"  # the shared README's


@pytest.mark.parametrize("damage", ["missing key", "other shape", "unexpected key", "not a state dict", "absent"])
def test_a_wrong_state_dict_gives_one_clear_line(tmp_path, damage):
    ref_dir = synthetic_reference(tmp_path / "ref")
    path = os.path.join(ref_dir, "decoder")
    sd = torch.load(path, weights_only=True)
    if damage == "missing key":
        del sd["class_input.bias"]
    elif damage == "other shape":
        sd["deconv_model.deconvolution_2.weight"] = torch.zeros(32, 8, 4, 4)
    elif damage == "unexpected key":
        sd["extra_layer.weight"] = torch.zeros(3)
    elif damage == "not a state dict":
        sd = [1, 2, 3]
    if damage == "absent":
        os.remove(path)
    else:
        torch.save(sd, path)
    out = tmp_path / "R.pt"
    with pytest.raises(CheckpointError) as e:  # run_cli prints it as one `error:` line, exit 2 (test_cli.py)
        import_reference.main(import_reference.get_args_parser().parse_args(
            ["--reference-dir", ref_dir, "--out", str(out)]))
    assert "\n" not in str(e.value) and "decoder" in str(e.value), str(e.value)
    assert not os.path.exists(out)


def test_cli_error_is_one_line(tmp_path):
    r = run_import(tmp_path / "nowhere", tmp_path / "R.pt")
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_key_map_covers_every_parameter_of_our_networks():
    from networks import CONFIGS, Decoder, Discriminator, Encoder
    cfg = CONFIGS["mnist"]
    for name, net in (("encoder", Encoder(cfg)), ("decoder", Decoder(cfg)), ("discriminator", Discriminator(cfg))):
        assert sorted(import_reference.KEYS[name].values()) == sorted(net.state_dict())
