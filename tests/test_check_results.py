"""scripts/check_results.py: every committed table regenerated from committed files, each difference named."""
import json
import os
import shutil
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import check_results  # noqa: E402

JSON = "results/mnist/seeds/z16_seed1_epoch50_sample.json"  # z test 70.46, in several tables


@pytest.fixture
def copy(tmp_path):
    """The committed results and README.md, without the figures."""
    shutil.copytree(os.path.join(ROOT, "results"), tmp_path / "results", ignore=shutil.ignore_patterns("*.png", "*.pdf"))
    shutil.copy(os.path.join(ROOT, "README.md"), tmp_path / "README.md")
    return tmp_path


def edit(path, old, new):
    text = path.read_text()
    assert text.count(old) == 1, (path, old)
    path.write_text(text.replace(old, new))


def test_the_committed_tables_agree_with_their_regeneration():
    assert check_results.check(ROOT) == []


def test_a_number_changed_in_a_json_is_named_in_every_table_made_from_it(copy):
    d = json.loads((copy / JSON).read_text())
    assert d["targets"]["class"]["mlp"]["z_test"] == 70.46
    d["targets"]["class"]["mlp"]["z_test"] = 71.46
    (copy / JSON).write_text(json.dumps(d, indent=2))
    errors = check_results.check(str(copy))
    assert any(e.startswith("results/mnist/seeds/z16_seed1_epoch50_sample.md line ")
               and e.endswith(", table 'reference MLP: target', row 'class', column 'z test': committed '70.46', "
                              "regenerated '71.46'") for e in errors), errors
    # the seeds 0-1 mean moves from 69.91 to 70.41 in the table file and in the README's copy of it
    assert ("results/mnist/seeds/epochs40_50.md line 1, table 'setting', row 'seeds 0-1, epoch 50, z sample', "
            "column 'z test': committed '69.91 ± 0.77', regenerated '70.41 ± 1.48'") in errors, errors
    assert any(e.startswith("results/mnist/seeds/README.md line ") and "row 'seeds 0-1, epoch 50, z sample', "
               "column 'z test': committed '69.91 ± 0.77'" in e for e in errors), errors


def test_a_number_changed_in_a_table_or_a_readme_is_named(copy):
    edit(copy / "results/mnist/seeds/epochs40_50.md", "| 69.91 ± 0.77 |", "| 69.92 ± 0.77 |")
    edit(copy / "results/mnist/seeds/README.md", "| 74.36 ± 0.70 | 69.91 ± 0.77 |", "| 74.36 ± 0.70 | 69.93 ± 0.77 |")
    errors = check_results.check(str(copy))
    assert errors[0] == ("results/mnist/seeds/epochs40_50.md line 1, table 'setting', row 'seeds 0-1, epoch 50, "
                         "z sample', column 'z test': committed '69.92 ± 0.77', regenerated '69.91 ± 0.77'")
    assert errors[1].startswith("results/mnist/seeds/README.md line ") and errors[1].endswith(
        "row 'seeds 0-1, epoch 50, z sample', column 'z test': committed '69.93 ± 0.77', regenerated '69.91 ± 0.77'")
    assert len(errors) == 2, errors


def test_tables_no_command_regenerates_are_refused_unless_marked(copy):
    (copy / "results/mnist/extra.md").write_text("| a | b |\n|---|---|\n| x | 1.00 |\n")
    readme = copy / "results/mnist/README.md"
    readme.write_text(readme.read_text() + "\n| measure | value |\n|---|---|\n| z test | 70.48 ± 1.13 |\n")
    errors = check_results.check(str(copy))
    assert errors[0].startswith("results/mnist/extra.md: a table file that nothing regenerates")
    assert errors[1].startswith("results/mnist/README.md line ") and "a table of numbers that no command" in errors[1]
    assert len(errors) == 2, errors
    (copy / "results/mnist/extra.md").unlink()
    text = readme.read_text().replace("\n| measure | value |", "\n<!-- from: results/mnist/epoch50.md -->\n| measure | value |")
    readme.write_text(text)
    assert check_results.check(str(copy)) == []  # 70.48 ± 1.13 is a cell of epoch50.md
    readme.write_text(text.replace("| z test | 70.48 ± 1.13 |", "| z test | 70.48 ± 1.14 |"))
    assert check_results.check(str(copy))[0].endswith(
        "row 'z test', column 'value': ['70.48 ± 1.14'] in no table of results/mnist/epoch50.md")
    readme.write_text(text.replace("from: results/mnist/epoch50.md", "quoted: a paper"))
    assert check_results.check(str(copy)) == []


def test_a_relative_root_works_and_a_folder_without_the_manifest_is_one_clear_error(copy, tmp_path, monkeypatch):
    monkeypatch.chdir(copy.parent)
    assert check_results.check(copy.name) == []
    with pytest.raises(check_results.UserError, match="tables.sh not found: --root must be the repository root"):
        check_results.check(str(tmp_path / "results"))
