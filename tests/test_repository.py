"""Promises about the repository itself rather than its code."""
import os
import subprocess

import pytest

from conftest import ROOT

BINARY = (".png", ".pdf", ".pt", ".jpg", ".npz")


def tracked_text_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    return [f for f in out.split("\0") if f and not f.endswith(BINARY)]


def test_no_tracked_file_names_a_folder_of_this_machine():
    """Commands and outputs in the repository use relative paths (runs/NAME, pretrained/...): a path of
    the machine they were made on (its checkout, the folder holding it, its home) means nothing elsewhere."""
    here = os.path.realpath(ROOT)
    machine = {os.path.dirname(here) + "/", here + "/", os.path.expanduser("~") + "/"} - {"/"}
    found = []
    for f in tracked_text_files():
        try:
            text = open(os.path.join(ROOT, f), encoding="utf-8").read()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        found += [f"{f}: {p}" for p in machine if p in text]
    assert not found, "absolute paths of this machine in tracked files: " + "; ".join(found)
