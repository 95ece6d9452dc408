"""A full disk (or any failed write) ends a run with one line naming what, why, the last good
checkpoint and the command that resumes it; exit status 74; no temporary file left; last.pt intact."""
import json
import os
import re
import subprocess
import sys

import pytest
import tensorboardX.record_writer
import torch

import classify_latents
import train
import tsne_plot
import utils
from conftest import ROOT, make_fake_mnist
from ddp_disk_worker import fail_torch_save, refuse_writes
from test_reliability import cli, finished_run  # noqa: F401  (a fixture)

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import export_pretrained  # noqa: E402
import loss_curves  # noqa: E402
import swap_grid  # noqa: E402

ENOSPC = "No space left on device (ENOSPC)"
RUN = ["--batch-size", "16", "--max-steps", "6", "--checkpoint-every", "2", "--sample-every", "3"]


def temporaries(path):
    return [os.path.join(d, f) for d, _, files in os.walk(path) for f in files if ".tmp" in f]


def check_failure(code, err, run_dir, what, step):
    """The one line and the state of the run directory; returns the checkpoint the line names."""
    assert code == 74 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"could not write {what}" in err and ENOSPC in err, err
    last = str(run_dir / "checkpoints" / "last.pt")
    assert f"last good checkpoint: {last} (step {step}); " in err, err
    assert err.strip().endswith(f"continue with: python train.py --resume {last}"), err
    assert temporaries(run_dir) == []
    assert torch.load(last, weights_only=True)["step"] == step  # intact and loadable
    return last


def resume_and_finish(monkeypatch, err, run_dir):
    """Run the resume command the line names (the disk has space again); the run completes."""
    monkeypatch.undo()
    path = re.search(r"--resume (\S+)$", err.strip()).group(1)
    assert train.main(train.get_args_parser().parse_args(["--resume", path, "--no-progress"])) == 0
    assert torch.load(path, weights_only=True)["step"] == 6
    with open(run_dir / "metrics.csv") as f:
        assert [int(r.split(",")[0]) for r in f.read().splitlines()[1:]] == list(range(1, 7))
    assert temporaries(run_dir) == []


@pytest.fixture
def data(tmp_path):
    return make_fake_mnist(tmp_path / "data")


def test_periodic_checkpoint_fails(monkeypatch, capsys, tmp_path, data):
    run_dir = tmp_path / "r"
    fail_torch_save(monkeypatch, "step_0000004.pt")
    code, err = cli(monkeypatch, capsys, ["--data-root", data, "--run-dir", str(run_dir), *RUN])
    # last.pt of step 4 was written before its periodic copy failed
    check_failure(code, err, run_dir, f"the checkpoint {run_dir / 'checkpoints' / 'step_0000004.pt'}", 4)
    assert not (run_dir / "checkpoints" / "step_0000004.pt").exists()
    resume_and_finish(monkeypatch, err, run_dir)


def test_last_pt_fails_and_keeps_the_previous_one(monkeypatch, capsys, tmp_path, data):
    run_dir = tmp_path / "r"
    fail_torch_save(monkeypatch, "last.pt", nth=2)  # step 4's
    code, err = cli(monkeypatch, capsys, ["--data-root", data, "--run-dir", str(run_dir), *RUN])
    check_failure(code, err, run_dir, f"the checkpoint {run_dir / 'checkpoints' / 'last.pt'}", 2)
    resume_and_finish(monkeypatch, err, run_dir)


# budgets: the file fills at step 3 (a CSV row is about 50 characters, an event about 170 bytes)
@pytest.mark.parametrize("module, match, budget, what", [
    (train, "metrics.csv", 200, "the metrics"), (tensorboardX.record_writer, "tfevents", 400, "the TensorBoard events")])
def test_metrics_or_events_fail(monkeypatch, capsys, tmp_path, data, module, match, budget, what):
    run_dir = tmp_path / "r"
    refuse_writes(monkeypatch, module, match, budget)
    code, err = cli(monkeypatch, capsys, ["--data-root", data, "--run-dir", str(run_dir), *RUN])
    check_failure(code, err, run_dir, what, 2)
    resume_and_finish(monkeypatch, err, run_dir)


def test_sample_grid_fails(monkeypatch, capsys, tmp_path, data):
    run_dir = tmp_path / "r"
    refuse_writes(monkeypatch, utils, "swap_0000003.png")
    code, err = cli(monkeypatch, capsys, ["--data-root", data, "--run-dir", str(run_dir), *RUN])
    check_failure(code, err, run_dir, f"the swap grid {run_dir / 'samples' / 'swap_0000003.png'}", 2)
    assert sorted(os.listdir(run_dir / "samples")) == ["swap_0000000.png"]  # nothing under the final name
    resume_and_finish(monkeypatch, err, run_dir)


def test_a_failure_before_any_checkpoint_says_so(monkeypatch, capsys, tmp_path, data):
    run_dir = tmp_path / "r"
    refuse_writes(monkeypatch, utils, "config.json", budget=10)
    code, err = cli(monkeypatch, capsys, ["--data-root", data, "--run-dir", str(run_dir), *RUN])
    assert code == 74 and err.count("\n") == 1 and ENOSPC in err
    assert "no checkpoint was written yet" in err and temporaries(run_dir) == []
    assert not (run_dir / "config.json").exists()


def test_a_failed_save_removes_its_temporary_file(tmp_path, monkeypatch):
    path = str(tmp_path / "x.pt")
    utils.atomic_save({"step": 1}, path)
    fail_torch_save(monkeypatch, "x.pt")
    with pytest.raises(utils.WriteError, match=f"could not write the checkpoint {path}: {re.escape(ENOSPC)}"):
        utils.atomic_save({"step": 2, "w": torch.ones(100_000)}, path)
    assert os.listdir(tmp_path) == ["x.pt"] and torch.load(path, weights_only=True)["step"] == 1


# ----------------------------------------------------------------------------- evaluation outputs

EVAL = [
    (classify_latents, ["--out", "{out}/r.json", "--epochs", "1", "--no-swap", "--no-linear-probe", "--no-factors"],
     "the results", "r.json"),
    (tsne_plot, ["--out", "{out}/t.png", "--num-points", "20", "--perplexity", "3"], "the t-SNE plot", "t.png"),
    (swap_grid, ["--out", "{out}/g", "--num-rows", "2", "--num-cols", "2"], "the swap grid", "g.png"),
    (export_pretrained, ["--out", "{out}/p.pt"], "the pretrained file", "p.pt"),
    (loss_curves, ["--out", "{out}/c.png"], "the loss curves", "c.png"),
]


@pytest.mark.parametrize("module, extra, what, name", EVAL, ids=[m.__name__ for m, *_ in EVAL])
def test_evaluation_output_fails(finished_run, tmp_path, monkeypatch, capsys, module, extra, what, name):  # noqa: F811
    _, run_dir = finished_run
    out = tmp_path / "out"
    source = [str(run_dir)] if module is loss_curves else ["--checkpoint", str(run_dir / "checkpoints" / "last.pt")]
    if module is export_pretrained:
        fail_torch_save(monkeypatch, name)
    else:
        refuse_writes(monkeypatch, utils, name, budget=50)
    monkeypatch.setattr(sys, "argv", [module.__name__, *source, *[a.format(out=out) for a in extra]])
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as e:
            utils.run_cli(module.main, module.get_args_parser())
    finally:
        torch.set_num_threads(threads)  # the evaluation scripts set their own
    err = capsys.readouterr().err
    assert e.value.code == 74 and err.count("\n") == 1 and "Traceback" not in err, err
    line = err.rsplit("\r", 1)[-1]  # after the progress bars, which tqdm erases with carriage returns
    assert line.startswith(f"error: could not write {what} {out / name}: {ENOSPC}")
    assert os.listdir(out) == []  # no partial file under the final name, no temporary file


def test_a_cache_that_cannot_be_written_is_skipped(tmp_path, monkeypatch):
    from data_loader import load_dataset
    from test_linemod import make_tiny_bop
    bop = make_tiny_bop(tmp_path / "bop")
    monkeypatch.setenv("DISENTANGLE_CACHE_DIR", str(tmp_path / "cache"))
    refuse_writes(monkeypatch, utils, "linemod_", budget=1000)
    with pytest.warns(UserWarning, match=f"could not write the LINEMOD cache .*{re.escape(ENOSPC)}"):
        data = load_dataset("linemod", bop, "test")
    assert len(data) > 0 and os.listdir(tmp_path / "cache") == []


# ----------------------------------------------------------------------------- torchrun

def test_every_rank_ends_the_same_way_under_torchrun(tmp_path):
    """Two gloo ranks; rank 0's periodic checkpoint fails mid-run (the others learn at the next
    all-reduce), another run's last checkpoint fails (at the end-of-run barrier), and a third run's
    directory cannot be made (while the others wait for rank 0 to make it)."""
    data, out = make_fake_mnist(tmp_path / "data"), tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, DISENTANGLE_NO_DOWNLOAD="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "tests", "ddp_disk_worker.py"), str(out), data],
                       capture_output=True, text=True, env=env, timeout=240)  # a rank left waiting would hang
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for case in ("mid_run", "at_end", "run_dir"):
        codes, errs = [r[case]["code"] for r in ranks], [r[case]["err"] for r in ranks]
        assert codes == [74, 74] and errs[0] == errs[1] and errs[0].count("\n") == 1, errs
        assert "Traceback" not in errs[0] and (ENOSPC if case != "run_dir" else "(ENOTDIR)") in errs[0]
    assert f"could not write the run directory {out / 'file' / 'run'}" in ranks[0]["run_dir"]["err"]
    last = out / "a" / "checkpoints" / "last.pt"
    assert f"last good checkpoint: {last} (step 4)" in ranks[0]["mid_run"]["err"]
    assert f"torchrun --nproc_per_node=2 train.py --resume {last}" in ranks[0]["mid_run"]["err"]
    # promptly: every rank stops at the all-reduce of the iteration after the failure, not at the end (8)
    assert [r["mid_run"]["iterations"] for r in ranks] == [5, 5]
    assert "no checkpoint was written yet" in ranks[0]["at_end"]["err"]
    assert temporaries(out) == []
    assert torch.load(last, weights_only=True)["step"] == 8  # resumed from the named checkpoint by both ranks
