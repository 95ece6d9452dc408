"""scripts/aggregate_results.py (mean ± sd over seeds) and scripts/plot_results.py (measures over iterations),
from classify_latents.py JSON files."""
import json
import os
import statistics
import sys

import pytest

from conftest import ROOT
from utils import UserError

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import aggregate_results  # noqa: E402
import plot_results  # noqa: E402


def result(tmp_path, name, z_test, s_test, swap=None, z_source="sample", step=100):
    d = {"dataset": "mnist", "style_dim": 16, "class_dim": 16, "z_source": z_source, "step": step, "seed": 0,
         "targets": {"class": {"mlp": {"z_train": z_test + 1, "z_test": z_test, "s_train": s_test + 1, "s_test": s_test}}}}
    if swap is not None:
        d["swap"] = {"swap": swap, "prior": 20.0, "style_leak": 1.0}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(d))
    return str(path)


def run(rows, out=None, extra=()):
    argv = [a for label, files in rows for a in ["--row", label, *files]] + (["--out", out] if out else []) + list(extra)
    return aggregate_results.main(aggregate_results.get_args_parser().parse_args(argv))


def cells(md, label):
    line = next(l for l in md.splitlines() if l.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def header(md):
    return [c.strip() for c in md.splitlines()[0].strip("|").split("|")]


def test_mean_and_sample_sd_over_seeds(tmp_path):
    files = [result(tmp_path, f"s{i}", z, s, swap=w) for i, (z, s, w) in
             enumerate([(70.0, 98.0, 94.0), (66.0, 98.5, 95.0), (71.0, 97.9, 93.5)])]
    out = str(tmp_path / "t.md")
    md = run([("16/16", files)], out)
    row = dict(zip(header(md), cells(md, "16/16")))
    assert row["seeds"] == "3" and row["z"] == "sample"
    assert row["z test"] == f"{statistics.mean([70, 66, 71]):.2f} ± {statistics.stdev([70, 66, 71]):.2f}" == "69.00 ± 2.65"
    assert row["s test"] == "98.13 ± 0.32"
    assert row["swap"] == "94.17 ± 0.76"
    assert open(out).read() == md


def test_one_file_shows_its_value_and_missing_numbers_a_dash(tmp_path):
    md = run([("with swap", [result(tmp_path, "a", 70.0, 98.0, swap=94.0)]),
              ("without", [result(tmp_path, "b", 60.0, 97.0)])])
    assert dict(zip(header(md), cells(md, "with swap")))["z test"] == "70.00"
    assert dict(zip(header(md), cells(md, "without")))["swap"] == "–"
    assert "linear z test" not in header(md)  # no file has it: no column


def test_a_number_some_of_a_rows_files_lack_is_a_dash_not_the_mean_of_the_others(tmp_path):
    md = run([("two seeds", [result(tmp_path, "a", 70.0, 98.0, swap=94.0), result(tmp_path, "b", 60.0, 97.0)])])
    row = dict(zip(header(md), cells(md, "two seeds")))
    assert row["swap"] == "–" and row["z test"] == "65.00 ± 7.07"


@pytest.mark.parametrize("differ", ["z_source", "step"])
def test_a_row_refuses_to_mix_settings(tmp_path, differ):
    a = result(tmp_path, "a", 70.0, 98.0)
    b = result(tmp_path, "b", 70.0, 98.0, **({"z_source": "mean"} if differ == "z_source" else {"step": 200}))
    with pytest.raises(UserError, match=differ):
        run([("mixed", [a, b])])


def test_error_and_kl_columns_keep_their_decimals(tmp_path):
    files = []
    for i, (rec, swap_err, kl) in enumerate([(0.01187, 0.01346, 0.0824), (0.01213, 0.01402, 0.0901)]):
        d = json.loads(open(result(tmp_path, f"e{i}", 70.0, 98.0)).read())
        d["errors"] = {"reconstruction": rec, "same_class_swap": swap_err, "pairs": 10}
        d["posterior"] = {"kl_per_dim": kl}
        (tmp_path / f"e{i}.json").write_text(json.dumps(d))
        files.append(str(tmp_path / f"e{i}.json"))
    row = dict(zip(header(md := run([("two", files)])), cells(md, "two")))
    assert row["rec MSE"] == f"{statistics.mean([0.01187, 0.01213]):.4f} ± {statistics.stdev([0.01187, 0.01213]):.4f}" == "0.0120 ± 0.0002"
    assert row["same-class swap MSE"] == "0.0137 ± 0.0004"
    assert row["KL/dim"] == "0.086 ± 0.005"


def test_another_target_fills_the_z_and_s_columns(tmp_path):
    d = json.loads(open(result(tmp_path, "f", 70.0, 98.0)).read())
    d["targets"]["direction"] = {"mlp": {"z_train": 99.0, "z_test": 97.5, "s_train": 40.0, "s_test": 30.25}}
    (tmp_path / "f.json").write_text(json.dumps(d))
    md = run([("sprites", [str(tmp_path / "f.json")])], extra=["--target", "direction"])
    assert header(md)[0] == "setting (target: direction)"
    row = dict(zip(header(md), cells(md, "sprites")))
    assert (row["z test"], row["s test"]) == ("97.50", "30.25")
    with pytest.raises(UserError, match="no file has the target 'hair'"):
        run([("x", [str(tmp_path / "f.json")])], extra=["--target", "hair"])


def test_the_attribute_protocol_fills_the_z_and_s_columns(tmp_path):
    """Sprites' attributes sit in a section of their own: their mean, or one of them, by --target."""
    d = json.loads(open(result(tmp_path, "f", 70.0, 98.0)).read())
    d["dataset"] = "sprites"
    d["targets"]["hair"] = {"mlp": {"z_train": 1.0, "z_test": 2.0, "s_train": 3.0, "s_test": 4.0}}  # not read
    d["attributes"] = {"targets": {"hair": {"mlp": {"z_train": 15.0, "z_test": 14.5, "s_train": 99.0, "s_test": 97.25}}},
                       "mean": {"chance": 22.33, "mlp": {"z_train": 23.0, "z_test": 22.5, "s_train": 98.0, "s_test": 96.0}}}
    (tmp_path / "f.json").write_text(json.dumps(d))
    for target, z_test, s_test in (("attributes.mean", "22.50", "96.00"), ("attributes.hair", "14.50", "97.25")):
        md = run([("sprites", [str(tmp_path / "f.json")])], extra=["--target", target])
        assert header(md)[0] == f"setting (target: {target})"
        row = dict(zip(header(md), cells(md, "sprites")))
        assert (row["z test"], row["s test"]) == (z_test, s_test), target
    with pytest.raises(UserError, match="no file has the target 'attributes.eyes'"):
        run([("x", [str(tmp_path / "f.json")])], extra=["--target", "attributes.eyes"])


def test_columns_pick_and_order_and_posterior_stats_show(tmp_path):
    d = json.loads(open(result(tmp_path, "p", 70.0, 98.0, swap=94.0)).read())
    d["posterior"] = {"kl_per_dim": 1.2, "sigma_mean": 0.3812, "abs_mu_mean": 0.8049}
    (tmp_path / "p.json").write_text(json.dumps(d))
    f = str(tmp_path / "p.json")
    md = run([("all", [f])])
    row = dict(zip(header(md), cells(md, "all")))
    assert (row["mean σ"], row["mean abs μ"]) == ("0.381", "0.805")
    md = run([("some", [f])], extra=["--columns", "prior swap", "s test", "mean σ"])
    assert header(md) == ["setting", "seeds", "z", "prior swap", "s test", "mean σ"]
    assert cells(md, "some")[3:] == ["20.00", "98.00", "0.381"]
    with pytest.raises(UserError, match="unknown column"):
        run([("x", [f])], extra=["--columns", "z tset"])


def plot(series, out, columns=None):
    argv = [a for label, files in series for a in ["--series", label, *files]] + ["--out", out]
    return plot_results.main(plot_results.get_args_parser().parse_args(argv + (["--columns", *columns] if columns else [])))


def test_plot_results_puts_each_series_at_its_steps_in_order(tmp_path):
    a = [result(tmp_path, f"a{s}", z_test=50 - s / 10, s_test=90 + s / 100, swap=80.0 + s / 10, step=s) for s in (300, 100, 200)]
    b = [result(tmp_path, "b100", z_test=40.0, s_test=95.0, step=100), result(tmp_path, "b200", z_test=30.0, s_test=96.0, swap=85.0, step=200)]
    out = tmp_path / "p.png"
    lines = plot([("seed 0", a), ("seed 1", b)], str(out))
    assert out.stat().st_size > 5000
    assert lines["z test"] == [("seed 0", [100, 200, 300], [40.0, 30.0, 20.0]), ("seed 1", [100, 200], [40.0, 30.0])]
    assert lines["swap"][1] == ("seed 1", [200], [85.0])  # b100 has no swap numbers: left out, not zero
    assert lines["s test"][0][2] == pytest.approx([91.0, 92.0, 93.0])


@pytest.mark.parametrize("case,message", [("mix", "mix z_source"), ("column", "unknown column"), ("empty", "names no JSON")])
def test_plot_results_refuses_what_is_not_one_run_or_not_a_measure(tmp_path, case, message):
    files = [result(tmp_path, "a", 50.0, 90.0, step=100), result(tmp_path, "b", 40.0, 91.0, z_source="mean" if case == "mix" else "sample", step=200)]
    series = [("s", [] if case == "empty" else files)]
    with pytest.raises(UserError, match=message):
        plot(series, str(tmp_path / "p.png"), columns=["z test", "nope"] if case == "column" else None)
