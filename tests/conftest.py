"""Shared fixtures: tiny synthetic data in the real on-disk formats, and the path to shared MNIST."""
import os
import struct
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["DISENTANGLE_NO_DOWNLOAD"] = "1"  # tests never download
# Tests run on the CPU whatever the machine has, unless marked `gpu`: `--device auto` means the CPU in
# this process, in module-scoped fixtures and in every script a test starts (utils.auto_device_name).
# The `gpu` tests name their device explicitly.
os.environ["DISENTANGLE_AUTO_DEVICE"] = "cpu"

cuda_is_available = torch.cuda.is_available  # the real one, before the fixtures below hide CUDA
has_cuda = cuda_is_available()
needs_cuda = pytest.mark.skipif(not has_cuda, reason="no CUDA device on this machine (a `gpu` test)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on a CUDA device; skipped, saying so, where there is none")


@pytest.fixture(scope="session", autouse=True)
def no_cuda_in_process():
    """Tests and fixtures see no CUDA device in this process either, so nothing they call (optimisers,
    RNG states, device names) touches a GPU the machine may have; `gpu` tests get it back below.
    (MPS is left to $DISENTANGLE_AUTO_DEVICE: torch._dynamo, imported by the first test that needs it,
    reads attributes of the real torch.backends.mps.is_available.)"""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        yield


@pytest.fixture(autouse=True)
def cuda_for_gpu_tests(request, monkeypatch):
    if request.node.get_closest_marker("gpu") is not None:  # the real device, also for `auto`
        monkeypatch.setattr(torch.cuda, "is_available", cuda_is_available)
        monkeypatch.delenv("DISENTANGLE_AUTO_DEVICE")

@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and much faster on a busy machine, where idle
    OpenMP threads spin against other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SHARED_DATA = os.path.abspath(os.path.join(ROOT, "..", "shared", "data"))
needs_mnist = pytest.mark.skipif(
    not os.path.isfile(os.path.join(SHARED_DATA, "MNIST", "raw", "train-images-idx3-ubyte")),
    reason=f"real MNIST not found in {SHARED_DATA}/MNIST/raw (the shared data folder is absent)")


def write_idx(path, array):
    """Write a uint8 array in MNIST's IDX format (magic 0x08 = unsigned byte)."""
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, array.ndim))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def make_fake_mnist(root, n_train=256, n_test=64, seed=0):
    """A tiny MNIST look-alike: class c is a bright bar at a class-specific place, plus noise."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = rng.integers(0, 40, size=(n, 28, 28))
        for i, c in enumerate(labels):
            r = 2 + 2 * c
            images[i, r:r + 3, 4 + rng.integers(0, 8):20 + rng.integers(0, 4)] = 255
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), labels)
    return str(root)


@pytest.fixture
def fake_mnist(tmp_path):
    return make_fake_mnist(tmp_path / "data")
