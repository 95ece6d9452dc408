"""train.py end to end through subprocess, as a user runs it."""
import csv
import os
import subprocess
import sys

import torch

from conftest import ROOT


def train_cli(*argv, check=True, cwd=None):
    env = dict(os.environ, DISENTANGLE_NO_DOWNLOAD="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv, "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=cwd)
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


def test_a_relative_resume_path_keeps_the_run_directory_relative(fake_mnist, tmp_path):
    """The log, the console and the next resume command name the run as the user did, not by this
    machine's absolute path."""
    train_cli("--data-root", fake_mnist, "--run-dir", "runs/R", "--max-steps", "2", "--batch-size", "16", cwd=tmp_path)
    p = train_cli("--resume", "runs/R/checkpoints/last.pt", "--max-steps", "3", cwd=tmp_path)
    assert "step 2 -> 3, " in p.stdout and "run dir runs/R" in p.stdout, p.stdout
    assert "checkpoint runs/R/checkpoints/last.pt" in p.stdout and str(tmp_path) not in p.stdout, p.stdout
    p = train_cli("--resume", "last.pt", "--max-steps", "4", cwd=tmp_path / "runs" / "R" / "checkpoints")
    assert f"run dir {os.pardir}" in p.stdout and str(tmp_path) not in p.stdout, p.stdout
    assert torch.load(tmp_path / "runs" / "R" / "checkpoints" / "last.pt", weights_only=True)["step"] == 4


def test_help_lists_every_flag_under_its_group():
    import re
    import train
    parser = train.get_args_parser()
    sections = {}  # section title of --help -> the flags listed under it
    for block in parser.format_help().split("\n\n"):
        title, _, body = block.partition(":\n")
        sections[title] = re.findall(r"^  (--[\w-]+)", body, re.M)
    groups = ["data", "model", "schedule and optimisation", "run and checkpoints", "device and speed"]
    assert [t for t in sections if t in groups] == groups and any(t.startswith("LINEMOD") for t in sections)
    assert sections["options"] == []  # only -h is left outside a group
    assert sections["data"] == ["--dataset", "--data-root"] and "--resume" in sections["run and checkpoints"]
    assert "--lr" in sections["schedule and optimisation"] and "--compile" in sections["device and speed"]
    listed = [f for flags in sections.values() for f in flags]
    every = [a.option_strings[0] for a in parser._actions if a.option_strings[0] != "-h"]
    assert sorted(listed) == sorted(every)  # each flag once
