"""Every evaluation names the run it measured (issue 30): the training run record of
classify_latents.py's JSON, the seed count and duplicate refusal of aggregate_results.py, the
backfill of older JSONs, and the data root order of the evaluation scripts."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import classify_latents
import evaluation
import train
import utils
from conftest import ROOT, make_fake_mnist

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import aggregate_results  # noqa: E402
import backfill_run_records  # noqa: E402
import export_pretrained  # noqa: E402
import plot_results  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def train_run(root, run_dir, seed, *extra):
    train.main(train.get_args_parser().parse_args(
        ["--data-root", root, "--run-dir", str(run_dir), "--seed", str(seed), "--max-steps", "2", "--batch-size", "16",
         "--sample-every", "100", "--no-progress", *extra]))
    return str(run_dir / "checkpoints" / "last.pt")


def classify(ckpt, out, *extra):
    return classify_latents.main(classify_latents.get_args_parser().parse_args(
        ["--checkpoint", ckpt, "--epochs", "1", "--swap-train-steps", "2", "--swap-pairs", "32", "--no-linear-probe",
         "--out", str(out), *extra]))


@pytest.fixture(scope="module")
def runs(one_thread, tmp_path_factory):
    """Three tiny runs on fake MNIST: seeds 0 and 1, and seed 1 again with one generator update,
    each evaluated into a JSON."""
    base = tmp_path_factory.mktemp("records")
    root = make_fake_mnist(base / "data")
    out = {"root": root, "base": base}
    for name, seed, extra in (("s0", 0, ()), ("s1", 1, ()), ("s1_gen1", 1, ("--gen-steps", "1"))):
        out[name] = train_run(root, base / name, seed, *extra)
        classify(out[name], base / f"{name}.json")
        out[f"{name}_json"] = str(base / f"{name}.json")
    return out


def aggregate(rows, *extra):
    argv = [a for label, files in rows for a in ["--row", label, *files]] + list(extra)
    return aggregate_results.main(aggregate_results.get_args_parser().parse_args(argv))


def seeds_cell(md, label):
    head = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    row = next(l for l in md.splitlines() if l.startswith(f"| {label} |"))
    return dict(zip(head, [c.strip() for c in row.strip("|").split("|")]))["seeds"]


# ----------------------------------------------------------------------------- the record

def test_json_records_the_training_run_apart_from_the_evaluation(runs):
    for name, seed in (("s0", 0), ("s1", 1)):
        d = json.load(open(runs[f"{name}_json"]))
        assert "seed" not in d  # the evaluation's seed is no longer a top-level "seed" a reader takes for the run's
        run, ev = d["run"], d["evaluation"]
        assert run["seed"] == seed and run["dataset"] == "mnist" and run["recipe"] == "reference"
        assert (run["style_dim"], run["class_dim"], run["step"]) == (16, 16, 2)
        assert run["flags"]["batch_size"] == 16 and run["flags"]["gen_steps"] == 2 and run["flags"]["max_steps"] == 2
        assert run["flags"]["pairs"] == "fresh" and run["flags"]["disc_fakes"] == "posterior"
        assert "data_root" not in run["flags"] and "run_dir" not in run["flags"] and run["unrecorded"] == []
        ckpt = torch.load(runs[name], weights_only=True)
        assert run["code_version"] == ckpt["versions"]["code"] and run["checkpoint"] == runs[name]
        assert ev == {"seed": 0, "threads": 1, "device": "cpu", "code_version": utils.code_version()}
        md = classify_latents.markdown(d)
        assert f"Training run: seed {seed}, mnist, recipe reference" in md and "Evaluation: seed 0, threads 1" in md
    gen1 = json.load(open(runs["s1_gen1_json"]))["run"]
    assert gen1["seed"] == 1 and gen1["flags"]["gen_steps"] == 1


def test_aggregate_counts_recorded_training_seeds(runs, tmp_path, capsys):
    again = json.load(open(runs["s1_json"]))  # seed 1 trained again by other code: another run, the same seed
    again["checkpoint"] = again["run"]["checkpoint"] = "elsewhere/last.pt"
    again["run"].update(code_version="0" * 12, weights_sha256="0" * 64)
    (tmp_path / "again.json").write_text(json.dumps(again))
    md = aggregate([("two seeds", [runs["s0_json"], runs["s1_json"]]),
                    ("three runs, two seeds", [runs["s0_json"], runs["s1_json"], str(tmp_path / "again.json")])])
    assert seeds_cell(md, "two seeds") == "2"
    assert seeds_cell(md, "three runs, two seeds") == "2"  # seeds, not files
    assert "note:" not in capsys.readouterr().err


def older_form(d):
    """A JSON dict as classify_latents.py wrote it before the records: top-level "seed", no run."""
    out = {}
    for k, v in d.items():
        if k == "run":
            out["seed"] = d["evaluation"]["seed"]
        elif k != "evaluation":
            out[k] = v
    return out


def test_duplicated_run_is_refused_naming_the_files(runs, tmp_path):
    s0 = runs["s0_json"]
    with pytest.raises(utils.UserError, match=r"holds one training run twice \(the same checkpoint .*\): "
                                              rf"{s0} and {s0}"):
        aggregate([("twice", [s0, s0])])
    copy = str(tmp_path / "copy.json")
    shutil.copy(s0, copy)
    with pytest.raises(utils.UserError, match=rf"holds one training run twice .*{s0} and {copy}"):
        aggregate([("copy", [s0, copy])])
    # the same weights under another path: an export of the checkpoint, evaluated
    small = str(tmp_path / "small.pt")
    export_pretrained.main(export_pretrained.get_args_parser().parse_args(
        ["--checkpoint", runs["s0"], "--out", small, "--allow-dirty"]))
    classify(small, tmp_path / "small.json", "--data-root", runs["root"])
    with pytest.raises(utils.UserError, match=r"the same weights \(sha256\)"):
        aggregate([("export", [s0, str(tmp_path / "small.json")])])
    # the same seed, setting and code with the weights hash and checkpoint left out of the record
    other = json.load(open(s0))
    other["checkpoint"] = other["run"]["checkpoint"] = "elsewhere/last.pt"
    other["run"]["weights_sha256"] = "0" * 64
    (tmp_path / "same_seed.json").write_text(json.dumps(other))
    with pytest.raises(utils.UserError, match="the same training seed 0, setting and code"):
        aggregate([("seed", [s0, str(tmp_path / "same_seed.json")])])
    # the older form, without a record: its checkpoint path still tells
    old = tmp_path / "old.json"
    old.write_text(json.dumps(older_form(json.load(open(s0)))))
    shutil.copy(old, tmp_path / "old_copy.json")
    with pytest.raises(utils.UserError, match="the same checkpoint"):
        aggregate([("old", [str(old), str(tmp_path / "old_copy.json")])])


def test_a_row_mixing_training_flags_is_refused(runs, tmp_path):
    with pytest.raises(utils.UserError, match=r"row 'mixed' mixes training gen_steps values \['1', '2'\]"):
        aggregate([("mixed", [runs["s0_json"], runs["s1_gen1_json"]])])
    d = json.load(open(runs["s1_json"]))  # how long a run was meant to be may differ, and None is not recorded
    d["run"]["flags"]["epochs"] += 10
    d["run"]["recipe"] = None
    (tmp_path / "longer.json").write_text(json.dumps(d))
    assert seeds_cell(aggregate([("longer", [runs["s0_json"], str(tmp_path / "longer.json")])]), "longer") == "2"


def test_mixed_evaluation_settings_are_refused_unless_allowed(runs, tmp_path):
    d = json.load(open(runs["s1_json"]))
    d["evaluation"]["threads"] = 2
    (tmp_path / "t2.json").write_text(json.dumps(d))
    row = [("mixed", [runs["s0_json"], str(tmp_path / "t2.json")])]
    with pytest.raises(utils.UserError, match=r"mixes evaluation threads values \['1', '2'\].*--allow-mixed-evaluation"):
        aggregate(row)
    assert seeds_cell(aggregate(row, "--allow-mixed-evaluation"), "mixed") == "2"
    old = tmp_path / "old.json"  # an older JSON records no threads: it does not pass for one evaluated alike
    old.write_text(json.dumps(older_form(json.load(open(runs["s1_json"])))))
    with pytest.raises(utils.UserError, match="mixes evaluation threads"):
        aggregate([("old and new", [runs["s0_json"], str(old)])])


def test_older_jsons_still_read_and_count_files_with_a_note(runs, tmp_path, capsys):
    paths = []
    for name in ("s0", "s1"):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(older_form(json.load(open(runs[f"{name}_json"])))))
        paths.append(str(p))
    md = aggregate([("older", paths)])
    assert seeds_cell(md, "older") == "2"
    assert "row 'older': a file records no training run, so its seeds column counts files" in capsys.readouterr().err
    old = json.load(open(paths[0]))
    assert evaluation.eval_seed(old) == 0 and classify_latents.header(old)[0].endswith(", seed 0")
    plot_results.read_series(paths)


# ----------------------------------------------------------------------------- the backfill

def test_backfill_reads_the_checkpoint_or_a_file_with_the_same_weights(runs, tmp_path):
    new = json.load(open(runs["s1_json"]))
    old = older_form(new)
    here, gone, other = tmp_path / "here.json", tmp_path / "gone.json", tmp_path / "other.json"
    here.write_text(json.dumps(old, indent=2))
    here.with_suffix(".md").write_text(classify_latents.markdown(old) + "\n")
    moved = str(tmp_path / "moved.pt")  # the run's weights, exported: the JSON's checkpoint is gone
    export_pretrained.main(export_pretrained.get_args_parser().parse_args(
        ["--checkpoint", runs["s1"], "--out", moved, "--allow-dirty"]))
    gone.write_text(json.dumps({**old, "checkpoint": str(tmp_path / "gone" / "last.pt")}, indent=2))
    other.write_text(json.dumps({**older_form(json.load(open(runs["s0_json"]))),
                                 "checkpoint": str(tmp_path / "gone" / "s0.pt")}, indent=2))
    missing = tmp_path / "MISSING.md"
    args = backfill_run_records.get_args_parser().parse_args(
        [str(here), str(gone), str(other), "--candidates", moved, "--data-root", runs["root"], "--missing", str(missing)])
    backfill_run_records.main(args)
    h, g, o = (json.load(open(p)) for p in (here, gone, other))
    assert h["run"]["seed"] == 1 and h["run"]["weights_sha256"] == new["run"]["weights_sha256"]
    assert h["evaluation"] == {"seed": 0, "threads": None, "device": None, "code_version": None} and "seed" not in h
    assert list(h) == list(new)  # classify_latents.py's key order
    assert g["run"]["seed"] == 1 and g["run"]["record_source"]["file"] == moved
    assert g["run"]["unrecorded"] == [] and g["run"]["flags"]["gen_steps"] == 2  # a new export keeps the flags
    assert o["run"] is None  # seed 0's weights are nowhere at hand: the candidate's posterior differs
    assert {k: h[k] for k in ("targets", "posterior", "errors", "swap")} == {k: new[k] for k in ("targets", "posterior", "errors", "swap")}
    md = here.with_suffix(".md").read_text()
    assert md.splitlines()[1].startswith("Training run: seed 1") and md.endswith(classify_latents.markdown(new).split("\n", 3)[3] + "\n")
    assert str(other) in missing.read_text() and str(here) not in missing.read_text()
    before = here.read_text()
    backfill_run_records.main(args)  # again: nothing changes
    assert here.read_text() == before


def test_backfill_refuses_a_checkpoint_at_the_jsons_path_that_holds_another_step(runs, tmp_path):
    """Without posterior statistics to compare, dataset, code sizes and step still have to fit."""
    d = older_form(json.load(open(runs["s1_json"])))
    del d["posterior"]
    later = tmp_path / "later.json"
    later.write_text(json.dumps({**d, "step": d["step"] + 1}, indent=2))
    backfill_run_records.main(backfill_run_records.get_args_parser().parse_args(
        [str(later), "--data-root", runs["root"], "--missing", str(tmp_path / "MISSING.md")]))
    assert json.load(open(later))["run"] is None
    assert "now holds another run" in (tmp_path / "MISSING.md").read_text()


# ----------------------------------------------------------------------------- data root and pretrained files

def test_data_root_order(monkeypatch):
    ckpt = {"args": {"data_root": "from_ckpt"}}
    monkeypatch.delenv("DISENTANGLE_DATA_ROOT", raising=False)
    assert evaluation.eval_data_root({"args": {}})[0] == "./data"
    assert evaluation.eval_data_root(ckpt)[0] == "from_ckpt"
    monkeypatch.setenv("DISENTANGLE_DATA_ROOT", "from_env")
    assert evaluation.eval_data_root(ckpt)[0] == "from_env"
    assert evaluation.eval_data_root(ckpt, "from_flag")[0] == "from_flag"
    parser = train.get_args_parser()  # resuming: the same order
    saved = {**vars(parser.parse_args([])), "data_root": "from_ckpt"}
    assert train.merge_resume_args(parser.parse_args(["--resume", "x"]),
                                   {"args": saved, "path": "r/checkpoints/last.pt"}).data_root == "from_env"
    assert train.merge_resume_args(parser.parse_args(["--resume", "x", "--data-root", "from_flag"]),
                                   {"args": saved, "path": "r/checkpoints/last.pt"}).data_root == "from_flag"


def test_swap_grid_of_a_pretrained_file_with_only_the_environment_variable(tmp_path):
    """The README's new-user command, in a folder without ./data, with a file that records a data root
    of another machine and with the committed file."""
    root = make_fake_mnist(tmp_path / "fake")
    committed = os.path.join(ROOT, "pretrained", "mnist_z16_s16_prior.pt")
    ck = torch.load(committed, weights_only=True)
    ck["args"]["data_root"] = str(tmp_path / "another_machine")
    torch.save(ck, tmp_path / "recorded.pt")
    env = {**os.environ, "DISENTANGLE_DATA_ROOT": root, "OMP_NUM_THREADS": "1"}
    for ckpt in (committed, str(tmp_path / "recorded.pt")):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "swap_grid.py"), "--checkpoint", ckpt,
                            "--out", "swap"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "swap.png").exists()
        os.remove(tmp_path / "swap.png")


def test_export_records_training_args_and_no_folder_and_reexport_keeps_the_weights(runs, tmp_path):
    small, again = str(tmp_path / "small.pt"), str(tmp_path / "again.pt")
    for src, dst in ((runs["s0"], small), (small, again)):
        export_pretrained.main(export_pretrained.get_args_parser().parse_args(
            ["--checkpoint", src, "--out", dst, "--allow-dirty"]))
    ckpt, a, b = (torch.load(p, weights_only=True) for p in (runs["s0"], small, again))
    assert a["args"] == utils.training_args(ckpt["args"]) and "data_root" not in a["args"]
    assert a["args"]["seed"] == 0 and a["args"]["gen_steps"] == 2 and a["epoch"] == ckpt["epoch"]
    assert evaluation.weights_sha256(a) == evaluation.weights_sha256(b) == evaluation.weights_sha256(ckpt)
    assert {k: v for k, v in a.items() if k not in ("encoder", "decoder")} == \
        {k: v for k, v in b.items() if k not in ("encoder", "decoder")}


def test_committed_pretrained_files_record_no_folder():
    for name in sorted(os.listdir(os.path.join(ROOT, "pretrained"))):
        if name.endswith(".pt"):
            args = torch.load(os.path.join(ROOT, "pretrained", name), weights_only=True)["args"]
            assert not set(args) & set(utils.NOT_TRAINING_ARGS), name


def test_the_arguments_left_out_of_the_record_are_train_py_arguments():
    """A misspelt name would leave its argument in the record and out of nothing."""
    assert set(utils.NOT_TRAINING_ARGS) <= set(vars(train.get_args_parser().parse_args([])))


def test_the_process_group_timeout_is_not_a_training_flag():
    """--dist-timeout waits longer for rank 0's data; the weights it trains are the same."""
    args = vars(train.get_args_parser().parse_args([]))
    records = [evaluation.training_run({"args": {**args, "dist_timeout": t}, "encoder": {}, "decoder": {}},
                                       classify_latents.train_flags())
               for t in (60, 600)]
    assert records[0]["flags"] == records[1]["flags"] and "dist_timeout" not in records[0]["unrecorded"]
