"""The throughput benchmark runs (its numbers are recorded by running it, not by tests)."""
import pytest

from benchmarks import train_throughput as bench


def test_benchmark_measures_both_forms_on_synthetic_data():
    args = bench.get_args_parser().parse_args(["--warmup", "1", "--windows", "2", "--window-seconds", "0.01",
                                               "--batch-size", "8", "--device", "cpu"])
    for impl in ("ours", "reference"):
        r = bench.measure("mnist", impl, args)
        assert r["data"] == "synthetic" and r["impl"] == impl
        assert r["it_per_s"] > 0 and len(r["window_it_per_s"]) == 2
        assert r["images_per_s"] == pytest.approx(r["it_per_s"] * 8, abs=0.1) and r["peak_rss_mib"] > 0
