"""scripts/run_summary.py: a run folder's logs as a small committed JSON, and the tables' "D stepped" from it."""
import csv
import json
import os
import sys

import pytest

from conftest import ROOT
from test_cli import train_cli
from utils import UserError

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import aggregate_results  # noqa: E402
import run_summary  # noqa: E402


def test_a_trained_and_resumed_run_is_summarised(fake_mnist, tmp_path, monkeypatch):
    """Two starts (a resume at step 3), the threads each logged, and the stepped share at the epoch ends
    and checkpoints, counted from metrics.csv."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    R = tmp_path / "R"
    train_cli("--dataset", "mnist", "--data-root", fake_mnist, "--run-dir", str(R), "--max-steps", "3",
              "--batch-size", "16", "--log-every", "1", "--checkpoint-every", "3")
    train_cli("--resume", str(R / "checkpoints" / "last.pt"), "--max-steps", "5")
    s = run_summary.main(run_summary.get_args_parser().parse_args([str(R), "--out", str(tmp_path / "R_run.json")]))
    assert json.loads((tmp_path / "R_run.json").read_text()) == s
    with open(R / "metrics.csv") as f:
        flags = [int(r["disc_stepped"]) for r in csv.DictReader(f)]
    per_epoch = s["steps_per_epoch"]
    assert s["last_step"] == 5 and s["metrics_rows"] == 5 and s["resumes"] == 1 and s["seed"] == 0
    assert [st["step"] for st in s["starts"]] == [0, 3]
    assert all(st["threads"] == 1 for st in s["starts"])
    steps = sorted({*range(per_epoch, 6, per_epoch), 3, 5})
    assert s["disc_stepped"] == [{"step": n, "iterations": n, "disc_stepped": sum(flags[:n])} for n in steps]
    assert s["logged_seconds"] > 0 and s["logged_it_per_s"] > 0


def test_the_d_stepped_column_comes_from_the_summary_beside_the_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = {"run_dir": "runs/a", "disc_stepped": [{"step": 8, "iterations": 8, "disc_stepped": 2}]}
    (tmp_path / "a_run.json").write_text(json.dumps(summary))
    d = {"checkpoint": "runs/a/checkpoints/step_0000008.pt", "step": 8, "dataset": "mnist", "style_dim": 16,
         "class_dim": 16, "z_source": "sample", "targets": {"class": {"mlp": {"z_test": 70.0, "s_test": 98.0}}}}
    (tmp_path / "r8.json").write_text(json.dumps(d))
    (tmp_path / "r9.json").write_text(json.dumps({**d, "step": 9}))  # no entry at step 9: no number
    (tmp_path / "x.json").write_text(json.dumps({**d, "checkpoint": "pretrained/x.pt"}))  # an exported file
    argv = ["--row", "at 8", str(tmp_path / "r8.json"), "--row", "at 9", str(tmp_path / "r9.json"),
            "--row", "exported", str(tmp_path / "x.json"), "--columns", "z test", "D stepped"]
    md = aggregate_results.main(aggregate_results.get_args_parser().parse_args(argv))
    assert "| at 8 | 1 | sample | 70.00 | 25.00 |" in md  # 2 of the first 8
    assert "| at 9 | 1 | sample | 70.00 | – |" in md and "| exported | 1 | sample | 70.00 | – |" in md
    os.makedirs("runs/a/checkpoints")  # the run folder itself is never read
    (tmp_path / "runs" / "a" / "metrics.csv").write_text("step,disc_stepped\n" + "".join(f"{i},1\n" for i in range(1, 9)))
    (tmp_path / "a_run.json").unlink()
    md = aggregate_results.main(aggregate_results.get_args_parser().parse_args(argv))
    assert "| at 8 | 1 | sample | 70.00 | – |" in md


def test_a_folder_that_is_not_a_run_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="config"):
        run_summary.summarize(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "metrics.csv").write_text("garbage\n1\n")
    with pytest.raises(UserError, match="disc_stepped"):
        run_summary.summarize(str(tmp_path))
