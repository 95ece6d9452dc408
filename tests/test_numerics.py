"""The arithmetic a run asks for: --deterministic and --tf32 set torch's switches, config.json records
them with the device, a resume keeps them; torchrun's process-group timeout (--dist-timeout)."""
import datetime
import json
import os

import pytest
import torch

import distributed
import train
from conftest import make_fake_mnist


def switches():
    return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32}


@pytest.fixture(autouse=True)
def torch_switches_restored(monkeypatch):
    """main() sets process-wide switches: the other tests get torch's as they were."""
    before = switches()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    torch.use_deterministic_algorithms(before["deterministic_algorithms"])
    torch.backends.cudnn.deterministic = before["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = before["cudnn_benchmark"]
    torch.backends.cuda.matmul.allow_tf32 = before["matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = before["cudnn_tf32"]


def run(argv):
    return train.main(train.get_args_parser().parse_args(argv + ["--no-progress"]))


def common(data, run_dir):
    return ["--data-root", data, "--run-dir", str(run_dir), "--batch-size", "16", "--sample-every", "100"]


def load(path):
    return torch.load(path, weights_only=True)


ON = {"deterministic_algorithms": True, "cudnn_deterministic": True, "cudnn_benchmark": False,
      "matmul_tf32": True, "cudnn_tf32": True}
OFF = {"deterministic_algorithms": False, "cudnn_deterministic": False, "cudnn_benchmark": False,
       "matmul_tf32": False, "cudnn_tf32": False}


def test_flags_set_torchs_switches_either_way_and_config_json_records_them(tmp_path):
    data = make_fake_mnist(tmp_path / "data")
    torch.backends.cudnn.benchmark = True  # whatever the process had before: set explicitly
    run(common(data, tmp_path / "a") + ["--max-steps", "2", "--deterministic", "--tf32"])
    assert switches() == ON and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    with open(tmp_path / "a" / "config.json") as f:
        config = json.load(f)
    assert config["device"]["type"] == "cpu" and config["device"]["compute_capability"] is None
    assert config["device"]["name"]
    assert config["precision"] == {"amp": False, "tf32": True} and config["deterministic"] is True
    with open(tmp_path / "a" / "log.txt") as f:
        assert "tf32 True, deterministic True" in f.read()

    torch.backends.cudnn.allow_tf32 = True  # torch's own default for convolutions
    run(common(data, tmp_path / "b") + ["--max-steps", "2"])
    assert switches() == OFF  # the default: full fp32, no deterministic algorithms
    with open(tmp_path / "b" / "config.json") as f:
        config = json.load(f)
    assert config["precision"] == {"amp": False, "tf32": False} and config["deterministic"] is False


def test_resume_keeps_the_flags_and_older_checkpoints_resume_without_them(tmp_path):
    data = make_fake_mnist(tmp_path / "data")
    run(common(data, tmp_path / "a") + ["--max-steps", "2", "--deterministic", "--tf32"])
    run(common(data, tmp_path / "b") + ["--max-steps", "2"])  # another run in between: switches off
    assert switches() == OFF
    run(["--resume", str(tmp_path / "a" / "checkpoints" / "last.pt"), "--max-steps", "3"])
    assert switches() == ON
    ck = load(tmp_path / "a" / "checkpoints" / "last.pt")
    assert ck["step"] == 3 and ck["args"]["deterministic"] is True and ck["args"]["tf32"] is True

    # A checkpoint written before these flags existed resumes with their defaults.
    old = {**ck, "args": {k: v for k, v in ck["args"].items() if k not in ("deterministic", "tf32", "dist_timeout")}}
    torch.save(old, tmp_path / "old.pt")
    assert run(["--resume", str(tmp_path / "old.pt"), "--run-dir", str(tmp_path / "c"), "--max-steps", "4"]) == 0
    assert switches() == OFF
    assert load(tmp_path / "c" / "checkpoints" / "last.pt")["args"]["deterministic"] is False


def test_deterministic_trains_on_the_cpu_bit_for_bit_as_without(tmp_path):
    """The CPU kernels are deterministic already: the flag changes nothing in the weights there."""
    data = make_fake_mnist(tmp_path / "data")
    run(common(data, tmp_path / "a") + ["--max-steps", "3"])
    run(common(data, tmp_path / "b") + ["--max-steps", "3", "--deterministic"])
    a, b = load(tmp_path / "a" / "checkpoints" / "last.pt"), load(tmp_path / "b" / "checkpoints" / "last.pt")
    for name in ("encoder", "decoder", "discriminator"):
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name


# ---------------------------------------------------------------- torchrun's timeout

def test_dist_timeout_reaches_init_process_group(monkeypatch, tmp_path):
    seen = []

    def init_process_group(backend, timeout=None):
        seen.append((backend, timeout))
        raise RuntimeError("stop here")  # the group itself is not this test's

    monkeypatch.setattr(distributed.dist, "init_process_group", init_process_group)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    data = make_fake_mnist(tmp_path / "data")
    for extra, minutes in (([], 60), (["--dist-timeout", "90"], 90)):
        with pytest.raises(RuntimeError, match="stop here"):
            run(common(data, tmp_path / "r") + extra)
        assert seen[-1] == ("gloo", datetime.timedelta(minutes=minutes))
    with pytest.raises(train.UserError, match="--dist-timeout must be positive"):
        run(common(data, tmp_path / "r") + ["--dist-timeout", "0"])


@pytest.mark.parametrize("ending", ["done", "error"])
def test_the_trainer_is_freed_before_the_process_group_is_destroyed(monkeypatch, tmp_path, ending):
    """Its DDP wrappers hold the group; one left to interpreter exit (an error's traceback keeps it)
    can abort a gloo rank there ("terminate called without an active exception")."""
    import weakref
    made, alive_at_close = [], []
    real_make, real_iteration = train.make_trainer, train.train_iteration

    def make_trainer(*a, **kw):
        t = real_make(*a, **kw)
        made.append(weakref.ref(t))
        return t

    def iteration(t):
        if ending == "error":
            raise train.DivergenceError("made up")
        return real_iteration(t)

    monkeypatch.setattr(train, "make_trainer", make_trainer)
    monkeypatch.setattr(train, "train_iteration", iteration)
    monkeypatch.setattr(distributed.World, "close", lambda self: alive_at_close.append(made[0]() is not None))
    data = make_fake_mnist(tmp_path / "data")
    try:
        run(common(data, tmp_path / "r") + ["--max-steps", "1"])
    except train.DivergenceError as e:
        assert ending == "error" and "made up" in str(e)
    assert alive_at_close == [False]
