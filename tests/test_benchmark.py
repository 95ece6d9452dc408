"""The throughput benchmark runs (its numbers are recorded by running it, not by tests)."""
import json

import pytest
import torch

import train
from benchmarks import reference_style as ref
from benchmarks import train_throughput as bench
from networks import get_config


def test_benchmark_measures_both_forms_on_synthetic_data():
    args = bench.get_args_parser().parse_args(["--warmup", "1", "--windows", "2", "--window-seconds", "0.01",
                                               "--batch-size", "8", "--device", "cpu"])
    for impl in ("ours", "reference"):
        r = bench.measure("mnist", impl, args)
        assert r["data"] == "synthetic" and r["impl"] == impl
        assert r["it_per_s"] > 0 and len(r["window_it_per_s"]) == 2
        assert r["images_per_s"] == pytest.approx(r["it_per_s"] * 8, abs=0.1) and r["peak_rss_mib"] > 0



def test_flops_are_counted_and_reported_as_a_rate():
    args = bench.get_args_parser().parse_args(["--warmup", "1", "--windows", "1", "--window-seconds", "0.01",
                                               "--batch-size", "8", "--device", "cpu", "--flops"])
    r = bench.measure("mnist", "ours", args)
    assert r["gflop_per_it"] > 0 and r["matmul_gflops"] > 0
    assert r["achieved_gflops"] == pytest.approx(r["gflop_per_it"] * r["it_per_s"], rel=0.05, abs=0.1)


def test_our_iteration_does_no_more_arithmetic_than_the_reference_form():
    """Regrouping saves work, it never adds any: with the discriminator stepping in both, our
    iteration counts at most the reference form's FLOPs (it skips D's weight gradients in the
    generator updates, which the reference computes and throws away)."""
    data, _ = bench.training_set("mnist", None, n=256)
    targs = train.get_args_parser().parse_args(["--batch-size", "8", "--device", "cpu"])
    targs.disc_gate = 2.0  # accuracy is always below: D steps every iteration
    cfg = get_config("mnist")
    t = train.Trainer(cfg, targs, data, torch.device("cpu"))
    nets = [ref.with_running_stat_norms(n) for n in t.nets()]
    ae = list(nets[0].parameters()) + list(nets[1].parameters())
    opts = (torch.optim.Adam(ae), torch.optim.Adam(ae), torch.optim.Adam(nets[2].parameters()))
    stream = ref.batches(ref.PairedImages(data.images, data.labels), 8)
    ours = bench.count_flops(lambda: train.train_iteration(t), 1)
    theirs = bench.count_flops(lambda: ref.reference_iteration(*nets, opts, stream, cfg, gate=2.0), 1)
    assert 0 < ours <= theirs


def test_repeats_report_the_median_process(tmp_path, capsys):
    out = tmp_path / "b.json"
    args = bench.get_args_parser().parse_args(["--datasets", "mnist", "--warmup", "1", "--windows", "1",
                                               "--window-seconds", "0.01", "--batch-size", "8", "--device", "cpu",
                                               "--repeats", "3", "--json", str(out)])
    assert bench.main(args) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert len(r["process_it_per_s"]) == 3 and r["it_per_s"] == sorted(r["process_it_per_s"])[1]
    assert "processes:" in capsys.readouterr().out
