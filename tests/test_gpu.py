"""The `gpu` group: the real scripts on a CUDA device, each in its own process as a user runs them
(so every run initialises CUDA afresh, after train.py has set its switches). Skipped, saying so,
on a machine without CUDA; `python benchmarks/gpu_check.py` runs this group and the benchmark.

    python -m pytest -q -m gpu
"""
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, has_cuda, make_fake_mnist, needs_cuda

pytestmark = [pytest.mark.gpu, needs_cuda]

STEPS = 30


def script(path, *argv, timeout=600):
    """Run one of the project's scripts; fails the test with its output where it fails."""
    env = dict(os.environ, DISENTANGLE_NO_DOWNLOAD="1")
    env.pop("DISENTANGLE_AUTO_DEVICE", None)  # conftest's CPU default is for the other tests
    p = subprocess.run([sys.executable, os.path.join(ROOT, path), *argv], capture_output=True, text=True,
                       env=env, timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, f"{path} {' '.join(argv)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def train(data, run_dir, *argv):
    return script("train.py", "--data-root", data, "--run-dir", str(run_dir), "--batch-size", "16",
                  "--sample-every", "10", "--no-progress", *argv)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def weights(ckpt):
    return {f"{n}.{k}": v for n in ("encoder", "decoder", "discriminator") for k, v in ckpt[n].items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_fake_mnist(tmp_path_factory.mktemp("gpu") / "data")


@pytest.mark.parametrize("flags", [[], ["--amp"], ["--compile"]], ids=["fp32", "amp", "compile"])
def test_thirty_steps_on_cuda(data, tmp_path, flags):
    train(data, tmp_path / "r", "--device", "cuda", "--max-steps", str(STEPS), *flags)
    ck = load(tmp_path / "r" / "checkpoints" / "last.pt")
    assert ck["step"] == STEPS and ck["stream_device"] == "cuda"
    assert all(torch.isfinite(v).all() for v in weights(ck).values())
    with open(tmp_path / "r" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("recon_loss", "kl", "gen_loss", "disc_loss"))
    with open(tmp_path / "r" / "config.json") as f:
        config = json.load(f)
    assert config["device"]["type"] == "cuda" and config["device"]["compute_capability"]
    assert config["precision"] == {"amp": "--amp" in flags, "tf32": False} and config["deterministic"] is False


@pytest.mark.parametrize("first, then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_resume_on_the_other_device(data, tmp_path, first, then):
    train(data, tmp_path / "r", "--device", first, "--max-steps", "4")
    script("train.py", "--resume", str(tmp_path / "r" / "checkpoints" / "last.pt"), "--device", then,
           "--max-steps", "8", "--no-progress")
    ck = load(tmp_path / "r" / "checkpoints" / "last.pt")
    assert ck["step"] == 8 and ck["stream_device"] == then
    assert all(torch.isfinite(v).all() for v in weights(ck).values())
    with open(tmp_path / "r" / "log.txt") as f:
        assert f.read().count(f"were drawn on {first}") == 1  # the streams re-seeded, and said so


def test_every_evaluation_script_on_cuda(data, tmp_path):
    run_dir = tmp_path / "r"
    train(data, run_dir, "--device", "cuda", "--max-steps", "6")
    ckpt, out = str(run_dir / "checkpoints" / "last.pt"), tmp_path / "out"
    script("classify_latents.py", "--checkpoint", ckpt, "--device", "cuda", "--out", str(out / "c.json"),
           "--epochs", "2", "--swap-train-steps", "20", "--swap-pairs", "200", "--no-factors")
    with open(out / "c.json") as f:
        assert "swap" in json.load(f)
    script("tsne_plot.py", "--checkpoint", ckpt, "--device", "cuda", "--out", str(out / "t.png"),
           "--num-points", "40", "--perplexity", "5")
    script("scripts/swap_grid.py", "--checkpoint", ckpt, "--device", "cuda", "--out", str(out / "g"),
           "--num-rows", "3", "--num-cols", "3", "--prior-rows", "1")
    script("scripts/loss_curves.py", str(run_dir), "--out", str(out / "l.png"))
    script("scripts/export_pretrained.py", "--checkpoint", ckpt, "--out", str(out / "p.pt"), "--allow-dirty")
    for name in ("t.png", "g.png", "g.pdf", "l.png", "p.pt"):
        assert (out / name).stat().st_size > 0, name


def test_two_deterministic_runs_give_equal_weights(data, tmp_path):
    for name in ("a", "b"):
        train(data, tmp_path / name, "--device", "cuda", "--max-steps", "20", "--deterministic")
    a, b = (load(tmp_path / name / "checkpoints" / "last.pt") for name in ("a", "b"))
    assert a["args"]["deterministic"] and a["step"] == 20
    wa, wb = weights(a), weights(b)
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


def test_deterministic_resume_on_cuda_is_exact(data, tmp_path):
    train(data, tmp_path / "a", "--device", "cuda", "--max-steps", "20", "--deterministic")
    train(data, tmp_path / "b", "--device", "cuda", "--max-steps", "10", "--deterministic")
    script("train.py", "--resume", str(tmp_path / "b" / "checkpoints" / "last.pt"), "--max-steps", "20", "--no-progress")
    a, b = (load(tmp_path / name / "checkpoints" / "last.pt") for name in ("a", "b"))
    assert b["step"] == 20 and b["args"]["deterministic"]  # kept from the checkpoint
    wa, wb = weights(a), weights(b)
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


@pytest.mark.skipif(not has_cuda or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_rank_nccl_training(data, tmp_path):
    env = dict(os.environ, DISENTANGLE_NO_DOWNLOAD="1")
    env.pop("DISENTANGLE_AUTO_DEVICE", None)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "train.py"), "--data-root", data, "--run-dir", str(tmp_path / "r"),
                        "--device", "cuda", "--batch-size", "8", "--max-steps", "10", "--sample-every", "5",
                        "--no-progress"], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ck = load(tmp_path / "r" / "checkpoints" / "last.pt")
    assert ck["step"] == 10 and ck["world_size"] == 2
    assert [s["device"] for s in ck["rank_streams"]] == ["cuda", "cuda"]
    with open(tmp_path / "r" / "log.txt") as f:
        assert "2 processes x batch 8" in f.read()
