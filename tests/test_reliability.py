"""Bad input gets one clear line and overwrites nothing; interruptions lose nothing; divergence is caught."""
import csv
import hashlib
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

import train
import utils
from conftest import ROOT, make_fake_mnist


def cli(monkeypatch, capsys, argv):
    """Run train.py's command line in-process; returns (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["train.py", *argv, "--no-progress"])
    with pytest.raises(SystemExit) as e:
        sys.exit(utils.run_cli(train.main, train.get_args_parser()))
    return e.value.code, capsys.readouterr().err


def tree(path):
    """Every file under path with a hash of its bytes."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), path)] = hashlib.sha1(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 3-step run on tiny synthetic MNIST: (data root, run dir)."""
    base = tmp_path_factory.mktemp("finished")
    data = make_fake_mnist(base / "data")
    run_dir = base / "run"
    train.main(train.get_args_parser().parse_args(
        ["--data-root", data, "--run-dir", str(run_dir), "--max-steps", "3", "--batch-size", "16", "--no-progress"]))
    return data, run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    data, run_dir = finished_run
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return data, dst


def write_garbage_checkpoints(tmp_path, good):
    truncated = tmp_path / "truncated.pt"
    with open(good, "rb") as f:
        truncated.write_bytes(f.read()[:5000])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    other = torch.load(good, weights_only=True)
    other["model_config"]["style_dim"] = 8  # weights still say 16
    other_path = tmp_path / "other_sizes.pt"
    torch.save(other, other_path)
    return truncated, text, other_path


BAD_ARGS = [
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--style-dim", "-4"], "--style-dim must be positive"),
    (["--class-dim", "0"], "--class-dim must be positive"),
    (["--batch-size", "100000"], "larger than the dataset"),
    (["--disc-gate", "1.5"], "--disc-gate must lie in [0, 1]"),
    (["--disc-gate", "-0.1"], "--disc-gate must lie in [0, 1]"),
    (["--dataset", "cifar"], "invalid choice: 'cifar'"),
    (["--max-steps", "0"], "--max-steps must be positive"),
]


@pytest.mark.parametrize("extra,message", BAD_ARGS)
def test_impossible_arguments(monkeypatch, capsys, run_copy, extra, message):
    data, run_dir = run_copy
    before = tree(run_dir)
    code, err = cli(monkeypatch, capsys, ["--data-root", data, "--run-dir", str(run_dir), "--overwrite", *extra])
    assert code == 2 and message in err
    assert err.count("\n") == 1 and "Traceback" not in err  # one line
    assert tree(run_dir) == before  # even with --overwrite, nothing was touched


def test_missing_data_root(monkeypatch, capsys, run_copy, tmp_path):
    _, run_dir = run_copy
    before = tree(run_dir)
    code, err = cli(monkeypatch, capsys, ["--data-root", str(tmp_path / "nope"), "--run-dir", str(run_dir), "--overwrite"])
    assert code == 2 and "does not exist" in err and err.count("\n") == 1
    assert tree(run_dir) == before


def test_truncated_mnist_file(monkeypatch, capsys, run_copy, tmp_path):
    _, run_dir = run_copy
    data = make_fake_mnist(tmp_path / "broken")
    with open(os.path.join(data, "MNIST", "raw", "train-labels-idx1-ubyte"), "r+b") as f:
        f.truncate(30)
    before = tree(run_dir)
    code, err = cli(monkeypatch, capsys, ["--data-root", data, "--run-dir", str(run_dir), "--overwrite"])
    assert code == 2 and "truncated or corrupted" in err
    assert f"MNIST train files in {os.path.join(data, 'MNIST', 'raw')}/" in err  # which files, and where
    assert err.count("\n") == 1
    assert tree(run_dir) == before


@pytest.mark.parametrize("kind,message", [("truncated", "is not a readable checkpoint"),
                                          ("text", "is not a readable checkpoint"),
                                          ("other", "other sizes")])
def test_bad_checkpoint_for_resume(monkeypatch, capsys, run_copy, tmp_path, kind, message):
    data, run_dir = run_copy
    bad = dict(zip(("truncated", "text", "other"),
                   write_garbage_checkpoints(tmp_path, run_dir / "checkpoints" / "last.pt")))[kind]
    before = tree(run_dir)
    code, err = cli(monkeypatch, capsys, ["--resume", str(bad), "--run-dir", str(run_dir), "--max-steps", "5"])
    assert code == 2 and message in err and err.count("\n") == 1
    assert tree(run_dir) == before


def test_sprites_file_without_its_sprites_field(monkeypatch, capsys, run_copy, tmp_path):
    import h5py
    from test_sprites import write_reed
    _, run_dir = run_copy
    data = write_reed(tmp_path / "reed")
    with h5py.File(os.path.join(data, "sprites", "sprites_1.mat"), "w") as f:
        f.create_dataset("something_else", data=[1, 2, 3])
    before = tree(run_dir)
    code, err = cli(monkeypatch, capsys, ["--dataset", "sprites", "--data-root", data, "--run-dir", str(run_dir),
                                          "--overwrite", "--batch-size", "2"])
    assert code == 2 and "sprites_1.mat holds no 'sprites'" in err and err.count("\n") == 1
    assert tree(run_dir) == before


def test_malformed_bop_json(monkeypatch, capsys, run_copy, tmp_path):
    from test_linemod import make_tiny_bop
    _, run_dir = run_copy
    monkeypatch.setenv("DISENTANGLE_CACHE_DIR", str(tmp_path / "cache"))
    data = make_tiny_bop(tmp_path / "bop")
    gt = os.path.join(data, "lm", "train_pbr", "000001", "scene_gt.json")
    with open(gt, "w") as f:
        f.write("{not json")
    before = tree(run_dir)
    code, err = cli(monkeypatch, capsys, ["--dataset", "linemod", "--data-root", data, "--run-dir", str(run_dir),
                                          "--overwrite", "--batch-size", "2"])
    assert code == 2 and f"could not read {gt}" in err and err.count("\n") == 1
    assert tree(run_dir) == before


def test_resume_with_other_code_sizes_is_refused(monkeypatch, capsys, run_copy):
    data, run_dir = run_copy
    before = tree(run_dir)
    code, err = cli(monkeypatch, capsys, ["--resume", str(run_dir / "checkpoints" / "last.pt"), "--style-dim", "8"])
    assert code == 2 and "--style-dim 8 differs from the checkpoint's 16" in err
    assert tree(run_dir) == before


def test_run_dir_holding_a_run_is_refused(monkeypatch, capsys, run_copy):
    data, run_dir = run_copy
    before = tree(run_dir)
    code, err = cli(monkeypatch, capsys, ["--data-root", data, "--run-dir", str(run_dir)])
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    assert tree(run_dir) == before


def with_versions(run_dir, tmp_path, **changes):
    """A copy of the run's last checkpoint whose recorded versions are changed."""
    ck = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert set(ck["versions"]) >= {"code", "torch", "torchvision", "numpy", "python"}
    ck["versions"].update(changes)
    path = tmp_path / "other.pt"
    torch.save(ck, path)
    return path


def test_evaluating_a_file_written_by_other_code_prints_nothing(run_copy, tmp_path, capsys, recwarn):
    _, run_dir = run_copy
    now = utils.library_versions()
    path = with_versions(run_dir, tmp_path, code="0123456789ab-dirty", numpy="1.0.0", python="3.0.0",
                         torch=utils.major_minor(now["torch"]) + ".99")  # a patch release: same results
    assert utils.load_checkpoint(str(path))["versions"]["code"] == "0123456789ab-dirty"  # the record is kept
    assert capsys.readouterr().err == "" and len(recwarn) == 0


def test_resuming_with_other_code_warns_once_in_one_line(run_copy, tmp_path, monkeypatch, capsys):
    _, run_dir = run_copy
    path = with_versions(run_dir, tmp_path, code="0123456789ab")
    code, err = cli(monkeypatch, capsys, ["--resume", str(path), "--run-dir", str(run_dir), "--max-steps", "4"])
    now = utils.library_versions()["code"]
    assert code == 0
    assert err.splitlines() == [f"warning: {path} was written with other versions: code 0123456789ab -> {now}"]


def test_a_torch_minor_version_difference_warns(run_copy, tmp_path, capsys):
    _, run_dir = run_copy
    path = with_versions(run_dir, tmp_path, torch="2.1.0", torchvision="0.16.0")
    utils.load_checkpoint(str(path))
    now = utils.library_versions()
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {path} was written with other versions: torch 2.1.0 -> {now['torch']}, "
        f"torchvision 0.16.0 -> {now['torchvision']}"]


# ---------------------------------------------------------------- interruption

def test_a_crash_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    utils.atomic_save({"step": 1, "w": torch.ones(1000)}, path)
    real_save = torch.save

    def dying_save(obj, f):  # writes half a file, then the process "dies"
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(utils.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        utils.atomic_save({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1


def read_tb_scalars(tb_dir):
    """tag -> steps as TensorBoard shows them: events in write order, a SessionLog START at step p
    purging the earlier events of step >= p (how purge_step hides a killed run's extra steps)."""
    from tensorboardX.proto import event_pb2
    events = []
    for name in os.listdir(tb_dir):
        with open(os.path.join(tb_dir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            if pos + 12 + n + 4 > len(data):
                break  # a record cut by a kill
            ev = event_pb2.Event()
            ev.ParseFromString(data[pos + 12:pos + 12 + n])
            events.append(ev)
            pos += 12 + n + 4
    events.sort(key=lambda e: e.wall_time)
    steps = {}
    for ev in events:
        if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
            steps = {tag: [s for s in ss if s < ev.step] for tag, ss in steps.items()}
        for v in ev.summary.value:
            steps.setdefault(v.tag, []).append(ev.step)
    return steps


def test_sigkill_at_random_moments_then_resume(tmp_path):
    """Kill -9 a training run at random moments (checkpoints are written every step, so some kills
    land mid-write), resume each time; the end state equals an uninterrupted run's."""
    data = make_fake_mnist(tmp_path / "data")
    env = dict(os.environ, DISENTANGLE_NO_DOWNLOAD="1")
    steps = 40
    base = [sys.executable, os.path.join(ROOT, "train.py"), "--no-progress", "--max-steps", str(steps)]
    args = ["--data-root", data, "--batch-size", "16", "--checkpoint-every", "1", "--sample-every", "1000"]
    run_dir = tmp_path / "killed"
    last = run_dir / "checkpoints" / "last.pt"
    rng = random.Random(0)
    kills, target = 0, 0
    metrics = run_dir / "metrics.csv"

    def rows():
        return max(0, len(metrics.read_text().splitlines()) - 1) if metrics.exists() else 0

    for _ in range(4):
        cmd = base + (["--resume", str(last)] if last.exists() else args + ["--run-dir", str(run_dir), "--overwrite"])
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target += rng.randint(3, 8)  # kill once training has passed this step (well before the end) ...
        while p.poll() is None and rows() < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))  # ... at a random moment of a step: some kills land mid-write
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        if last.exists():
            torch.load(last, weights_only=True)  # whatever the moment, last.pt loads
    cmd = base + (["--resume", str(last)] if last.exists() else args + ["--run-dir", str(run_dir), "--overwrite"])
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    assert kills == 4
    subprocess.run(base + args + ["--run-dir", str(tmp_path / "straight")], env=env, check=True, capture_output=True)

    a = torch.load(last, weights_only=True)
    b = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == steps
    for name in ("encoder", "decoder", "discriminator"):
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    with open(run_dir / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, steps + 1))
    scalars = read_tb_scalars(run_dir / "tb")
    assert set(scalars) == {train.TB_TAGS[k] for k in train.METRICS}  # every curve is there to check
    for tag, ss in scalars.items():
        assert sorted(ss) == list(range(1, steps + 1)), tag


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    data = make_fake_mnist(tmp_path / "data")
    env = dict(os.environ, DISENTANGLE_NO_DOWNLOAD="1")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--no-progress", "--data-root", data,
                          "--run-dir", str(tmp_path / "r"), "--batch-size", "16", "--max-steps", "100000",
                          "--sample-every", "100000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "r" / "metrics.csv").exists() or os.path.getsize(tmp_path / "r" / "metrics.csv") < 200:
        time.sleep(0.2)
        assert p.poll() is None
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert "SIGTERM received: checkpoint of step" in out
    ck = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    with open(tmp_path / "r" / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, ck["step"] + 1))


# ---------------------------------------------------------------- divergence

def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(monkeypatch, capsys, tmp_path):
    data = make_fake_mnist(tmp_path / "data")
    real, calls = train.reconstruction_step, []

    def poisoned(t, x1, x2):
        calls.append(1)
        if len(calls) == 5:  # iteration 5: the weights go bad
            with torch.no_grad():
                next(t.encoder.parameters()).fill_(float("nan"))
        return real(t, x1, x2)

    monkeypatch.setattr(train, "reconstruction_step", poisoned)
    code, err = cli(monkeypatch, capsys, ["--data-root", data, "--run-dir", str(tmp_path / "r"), "--batch-size", "16",
                                          "--max-steps", "10", "--checkpoint-every", "2"])
    assert code == 3 and "recon_loss is nan at step 5" in err and err.count("\n") == 1
    ck = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["step"] == 4 and all(torch.isfinite(v).all() for v in ck["encoder"].values())


def test_on_nan_skip_skips_the_update(monkeypatch, tmp_path):
    data = make_fake_mnist(tmp_path / "data")
    real, calls = train.kl_divergence, []

    def sometimes_nan(*a):
        calls.append(1)
        kl = real(*a)
        return kl * float("nan") if len(calls) == 4 else kl

    monkeypatch.setattr(train, "kl_divergence", sometimes_nan)
    status = train.main(train.get_args_parser().parse_args(
        ["--data-root", data, "--run-dir", str(tmp_path / "r"), "--batch-size", "16", "--max-steps", "4",
         "--on-nan", "skip", "--no-progress"]))
    assert status == 0
    ck = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["step"] == 4 and all(torch.isfinite(v).all() for v in ck["encoder"].values())
    assert "1 non-finite updates skipped" in (tmp_path / "r" / "log.txt").read_text()
