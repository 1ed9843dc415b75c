"""Settings: comments, profiles, one-line errors, repo-relative paths, scripts from any folder."""
import json
import os
import subprocess
import sys

import pytest

import utils_option as opt

ROOT = opt.REPO_ROOT


def test_comments_stripped_but_not_inside_strings():
    text = '{"a": "http://x", // comment\n "b": 1 // another\n}'
    assert json.loads(opt.strip_comments(text)) == {"a": "http://x", "b": 1}


def test_profile_quick_overrides_report():
    report = opt.load_settings(profile="report")
    quick = opt.load_settings(profile="quick")
    assert report["mnist"]["epoch"] == 20 and quick["mnist"]["epoch"] == 5
    assert quick["mnist"]["batch_size"] == report["mnist"]["batch_size"] == 8


@pytest.mark.parametrize("override, key, words", [
    ({"mnist": {"method2": {"solver": "newton"}}}, "mnist.method2.solver", "one of"),
    ({"mnist": {"epoch": "20"}}, "mnist.epoch", "an integer"),
    ({"mnist": {"method2": {"damp": True}}}, "mnist.method2.damp", "0.01 is the original"),
    ({"mnist": {"method1": {"grad_mode": "exact"}}}, "mnist.method1.grad_mode", "per_sample"),
])
def test_bad_setting_one_line(override, key, words):
    with pytest.raises(opt.SettingsError) as err:
        opt.load_settings(overrides=override)
    message = str(err.value)
    assert key in message and words in message and "\n" not in message


def test_missing_key_named(tmp_path):
    raw = json.loads(opt.strip_comments(open(opt.DEFAULT_SETTINGS).read()))
    del raw["mnist"]["method2"]["scale"]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(opt.SettingsError, match="missing setting 'mnist.method2.scale'"):
        opt.load_settings(str(path))


def test_paths_resolve_from_repo_root():
    assert opt.resolve_path("results") == os.path.join(ROOT, "results")
    assert opt.resolve_path("/abs/x") == "/abs/x"


def test_script_with_bad_setting_prints_one_line_and_exits_2(tmp_path):
    raw = json.loads(opt.strip_comments(open(opt.DEFAULT_SETTINGS).read()))
    raw["mnist"]["method2"]["solver"] = "newton"
    raw["output_dir"] = str(tmp_path)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    for cwd in (ROOT, os.path.join(ROOT, "mnist_test")):  # from the root and from its own folder
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "mnist_test", "m2_Test.py"),
                               "-opt", str(path)], cwd=cwd, capture_output=True, text=True)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "mnist.method2.solver" in lines[0] and "newton" in lines[0]


def test_missing_input_file_names_the_script(tmp_path):
    settings = opt.load_settings(overrides={"output_dir": str(tmp_path)})
    path = tmp_path / "s.json"
    path.write_text(json.dumps({k: v for k, v in settings.items()
                                if k not in ("settings_file",)}))
    proc = subprocess.run([sys.executable, "Test.py", "-opt", str(path)],
                          cwd=os.path.join(ROOT, "mnist_test"), capture_output=True, text=True)
    assert proc.returncode == 2
    assert "run mnist_test/Train.py first" in proc.stderr
