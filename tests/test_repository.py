"""Promises about the repository itself rather than its code."""
import ast
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


# ---------------------------------------------------------------- imports run one way
# networks (torch only) <- utils (infrastructure) <- data_loader <- evaluation <- the entry points.
LAYERS = {"networks": 0, "utils": 1, "data_loader": 2, "distributed": 2, "evaluation": 3,
          "train": 4, "classify_latents": 5, "tsne_plot": 5, "hubconf": 5}
# Imported inside functions, and why: optional or heavy, needed by one command or one dataset only.
LAZY = {"matplotlib": "plots only (and it is slow to import)", "openTSNE": "t-SNE only",
        "sklearn": "the linear probe only (slow to import)", "h5py": "Reed's Sprites files only",
        "scipy": "Reed's Sprites files only", "torchvision": "the MNIST download, grids and version record "
        "(slow to import)"}


def python_files():
    files = [f for f in tracked_text_files() if f.endswith(".py")]
    return {f: ast.parse(open(os.path.join(ROOT, f)).read(), f) for f in files}


def imported_names(node):
    if isinstance(node, ast.Import):
        return [a.name.split(".")[0] for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0:
        return [node.module.split(".")[0]]
    return []


def test_imports_run_one_way():
    for path, tree in python_files().items():
        name = os.path.splitext(os.path.basename(path))[0]
        if name not in LAYERS or os.path.dirname(path):
            continue
        for node in tree.body:  # module level, where a cycle would bite
            for mod in imported_names(node):
                if mod in LAYERS:
                    assert LAYERS[mod] < LAYERS[name], f"{path} imports {mod}: imports must run {LAYERS}"


def test_imports_inside_functions_are_only_the_lazy_ones():
    found = []
    for path, tree in python_files().items():
        if path.startswith("tests/"):
            continue
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    found += [f"{path}:{node.lineno} imports {m}" for m in imported_names(node) if m not in LAZY]
    assert not found, "imports inside functions (move them to the top, or give the reason in LAZY): " + "; ".join(found)
