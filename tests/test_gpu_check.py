"""benchmarks/gpu_check.py on the CPU: its table and exit status with the GPU runs stubbed, the pytest
report it reads, and the benchmark command lines it builds (read by the benchmark's own parser)."""
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_check
from benchmarks import train_throughput as bench

TESTS = [("test_thirty_steps_on_cuda[fp32]", "passed", 12.5),
         ("test_two_rank_nccl_training", "skipped (needs two CUDA devices)", 0.0)]
ROW = {"dataset": "mnist", "it_per_s": 412.3, "images_per_s": 26387.2, "epoch_minutes": 0.04, "peak_gpu_mib": 310.0}


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(gpu_check, "run_tests", lambda timeout: TESTS)


def test_one_table_of_the_tests_and_every_benchmark_mode(fake_gpu, monkeypatch, capsys, tmp_path):
    called = []

    def run_benchmark(mode, dataset, data_root, timeout):
        called.append(mode)
        return {**ROW, "it_per_s": ROW["it_per_s"] + len(called)}

    monkeypatch.setattr(gpu_check, "run_benchmark", run_benchmark)
    out = tmp_path / "check.md"
    assert gpu_check.main(gpu_check.get_args_parser().parse_args(["--out", str(out)])) == 0
    printed = capsys.readouterr().out
    assert called == ["eager", "amp", "compile"]
    assert "GPU check on Fake GPU" in printed and printed.count("| check | result | detail |") == 1
    assert "| test test_thirty_steps_on_cuda[fp32] | passed | 12.5 s |" in printed
    assert "| benchmark mnist amp | 414.3 it/s | 26387 img/s, 0.04 min/epoch, GPU 310 MiB |" in printed
    assert out.read_text().strip() == printed.strip()


def test_a_failure_makes_the_exit_status_non_zero(fake_gpu, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "run_benchmark", lambda mode, *a: {"error": "boom"} if mode == "compile" else ROW)
    assert gpu_check.main(gpu_check.get_args_parser().parse_args([])) == 1
    assert "| benchmark compile | FAILED | boom |" in capsys.readouterr().out
    monkeypatch.setattr(gpu_check, "run_benchmark", lambda *a: ROW)
    monkeypatch.setattr(gpu_check, "run_tests", lambda timeout: TESTS + [("test_x", "FAILED", 1.0)])
    assert gpu_check.main(gpu_check.get_args_parser().parse_args([])) == 1


def test_without_a_gpu_it_says_so_and_runs_nothing(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "run_tests", lambda timeout: pytest.fail("ran the tests"))
    assert gpu_check.main(gpu_check.get_args_parser().parse_args([])) == 0
    assert "no CUDA device on this machine: nothing checked" in capsys.readouterr().out


def test_rows_from_a_real_pytest_report(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert False\n"
        "@pytest.mark.skip(reason='no GPU here')\n"
        "def test_skipped(): pass\n")
    xml = tmp_path / "r.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                    str(tmp_path / "test_x.py")], capture_output=True, cwd=tmp_path, timeout=120)
    rows = {name: outcome for name, outcome, _ in gpu_check.test_rows(str(xml))}
    assert rows == {"test_ok": "passed", "test_bad": "FAILED", "test_skipped": "skipped (no GPU here)"}


@pytest.mark.parametrize("mode", ["eager", "amp", "compile"])
def test_benchmark_command_is_the_benchmarks_own_command_line(mode):
    cmd = gpu_check.benchmark_command(mode, "mnist", "DATA", "out.json")
    assert cmd[1].endswith("train_throughput.py")
    args = bench.get_args_parser().parse_args(cmd[2:])
    assert args.device == "cuda" and args.datasets == ["mnist"] and args.json == "out.json"
    assert args.data_root == "DATA" and args.amp == (mode == "amp") and args.compile == (mode == "compile")


def test_every_part_is_limited_by_what_is_left_of_the_budget(fake_gpu, monkeypatch):
    clock, limits = iter([0.0, 0.0, 50.0, 90.0, 99.5]), []  # start, then before each part
    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: next(clock, 100.0))
    monkeypatch.setattr(gpu_check, "run_tests", lambda timeout: limits.append(timeout) or TESTS)
    monkeypatch.setattr(gpu_check, "run_benchmark", lambda mode, d, r, timeout: limits.append(timeout) or ROW)
    gpu_check.main(gpu_check.get_args_parser().parse_args(["--budget", "100", "--tests-timeout", "300"]))
    assert limits == [100.0, 50.0, 10.0, 1.0]


@pytest.mark.parametrize("status, said", [(4, "ERROR: file or directory not found"), (5, "no tests ran")])
def test_a_pytest_that_reports_no_test_is_a_failure(monkeypatch, status, said):
    """A usage error, or no `gpu` test collected: the table says so and the check fails."""
    monkeypatch.setattr(gpu_check.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, status, stdout=said + "\n", stderr=""))
    rows = gpu_check.run_tests(timeout=10)
    assert rows == [("gpu tests", f"pytest exit status {status}, 0 tests reported: {said}", None)]
    assert gpu_check.failed(rows, {})
