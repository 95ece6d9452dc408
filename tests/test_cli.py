"""train.py end to end through subprocess, as a user runs it."""
import csv
import os
import subprocess
import sys

import torch

from conftest import ROOT


def train_cli(*argv, check=True):
    env = dict(os.environ, DISENTANGLE_NO_DOWNLOAD="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv, "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_train_then_resume_through_the_command_line(fake_mnist, tmp_path):
    R = tmp_path / "R"
    train_cli("--dataset", "mnist", "--data-root", fake_mnist, "--run-dir", str(R), "--max-steps", "5",
              "--batch-size", "16", "--sample-every", "5")
    for path in ("config.json", "metrics.csv", "log.txt", "checkpoints/last.pt", "checkpoints/step_0000005.pt",
                 "samples/swap_0000000.png", "samples/swap_0000005.png"):
        assert (R / path).exists(), path
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(R / "tb"))
    p = train_cli("--resume", str(R / "checkpoints" / "last.pt"), "--max-steps", "8")
    assert "resuming" in p.stdout + p.stderr
    assert torch.load(R / "checkpoints" / "last.pt", weights_only=True)["step"] == 8
    with open(R / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 9))
