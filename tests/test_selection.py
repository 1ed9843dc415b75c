"""Never hand back another run's answer: every result file names the test selection it was made
for, and a file made for another selection is refused in one line."""
import os
import shutil

import pytest

import utils_option as opt
from mnist_test import Test, Train, common, m1_Test, m2_Test
from tests.conftest import small_settings


def test_an_explicit_selection_then_the_default_leaves_the_default_files_untouched(tmp_path, mnist_raw):
    mine = small_settings(tmp_path, train_subset=300, test_ids=[42])
    default = small_settings(tmp_path, train_subset=300, test_ids="loss_rank", test_num=3, test_rank_step=50)
    Train.main(mine)
    made_42 = Test.main(mine)
    assert made_42["test_ids"] == [42]
    m1_42, m2_42 = m1_Test.main(mine)["act_grad_file"], m2_Test.main(mine)["if_file"]
    made = Test.main(default)
    assert made["test_file"] != made_42["test_file"] and len(made["test_ids"]) == 3 and 42 not in made["test_ids"]
    m1_default, m2_default = m1_Test.main(default)["act_grad_file"], m2_Test.main(default)["if_file"]
    assert {m1_default, m2_default}.isdisjoint({m1_42, m2_42})
    record = opt.read_json(m2_default, "m2_Test")
    assert sorted(record[k]["test_id_num"] for k in ("0", "1", "2")) == sorted(made["test_ids"])
    assert [opt.read_json(m2_42, "m2_Test")["0"]["test_id_num"]] == [42]
    # a file made for another selection, where this selection's file should be: refused in one line
    shutil.copy(made_42["test_file"], made["test_file"])
    with pytest.raises(opt.SettingsError) as err:
        common.selected_test_ids(default)
    message = str(err.value)
    assert "\n" not in message and "ids" in message and "lr3x50" in message and "mnist_test/Test.py" in message
    assert os.path.isfile(m2_42)


def test_a_truncated_model_file_is_one_line_and_exit_2(tmp_path, mnist_raw):
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT
    settings = small_settings(tmp_path, train_subset=200, test_ids=[1])
    Train.main(settings)
    path = common.model_file(settings, "staTest0")
    with open(path, "rb") as f:
        head = f.read(300)
    with open(path, "wb") as f:
        f.write(head)
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"extends": opt.DEFAULT_SETTINGS, "output_dir": settings.output_dir,
                                "mnist": {"epoch": 1, "train_subset": 200, "test_ids": [1]}}))
    done = subprocess.run([sys.executable, "mnist_test/Test.py", "-opt", str(mine)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and path in done.stderr and "Train.py" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
