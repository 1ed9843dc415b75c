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
    assert report.mnist.epoch == 20 and quick.mnist.epoch == 5
    assert quick.mnist.batch_size == report.mnist.batch_size == 8


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
    path.write_text(json.dumps(opt.as_dict(settings)))
    proc = subprocess.run([sys.executable, "Test.py", "-opt", str(path)],
                          cwd=os.path.join(ROOT, "mnist_test"), capture_output=True, text=True)
    assert proc.returncode == 2
    assert "run mnist_test/Train.py first" in proc.stderr


def test_unknown_keys_are_refused_with_the_closest_valid_one(tmp_path):
    raw = json.loads(opt.strip_comments(open(opt.DEFAULT_SETTINGS).read()))
    raw["mnist"]["method2"]["dampp"] = 0.1
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(opt.SettingsError, match="unknown setting 'mnist.method2.dampp'; did you mean 'mnist.method2.damp'"):
        opt.load_settings(str(path))
    small = tmp_path / "small.json"  # in an extending file's profile too
    small.write_text(json.dumps({"extends": opt.DEFAULT_SETTINGS, "profiles": {"quick": {"mnist": {"epochs": 3}}}}))
    with pytest.raises(opt.SettingsError, match="profiles.quick.mnist.epochs'; did you mean 'mnist.epoch'"):
        opt.load_settings(str(small))
    missing = tmp_path / "ext.json"
    missing.write_text(json.dumps({"extends": "nowhere.json"}))
    with pytest.raises(opt.MissingFileError, match="extends.*nowhere.json.*does not exist"):
        opt.load_settings(str(missing))


def test_extends_chains_keep_the_profiles_of_the_first_file_and_refuse_loops(tmp_path):
    middle = tmp_path / "middle.json"
    middle.write_text(json.dumps({"extends": opt.DEFAULT_SETTINGS, "mnist": {"epoch": 7}}))
    top = tmp_path / "top.json"
    top.write_text(json.dumps({"extends": "middle.json", "profile": "quick", "mnist": {"seed": 3}}))
    settings = opt.load_settings(str(top))
    assert settings.profile == "quick" and settings.mnist.seed == 3
    # the most specific value wins: middle's epoch 7 over the quick profile of Implementation.json
    # (two files up), whose other values still apply
    assert settings.mnist.epoch == 7 and settings.mnist.explain.n_values == [0, 1000, 5000]
    assert opt.load_settings(str(top), profile="report").mnist.epoch == 7
    middle.write_text(json.dumps({"extends": "top.json"}))
    with pytest.raises(opt.SettingsError, match="loop"):
        opt.load_settings(str(top))


def test_unknown_argument_exits_2_and_opt_is_relative_to_the_working_directory(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "mnist_test", "Test.py"), "-pofile", "quick"],
                          cwd=str(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown argument -pofile (did you mean -profile?)"
    (tmp_path / "mine.json").write_text(json.dumps({"extends": opt.DEFAULT_SETTINGS,
                                                    "output_dir": str(tmp_path / "out")}))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "mnist_test", "Test.py"), "-opt", "mine.json"],
                          cwd=str(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 2 and "run mnist_test/Train.py first" in proc.stderr  # the file was found
    assert str(tmp_path / "out") in proc.stderr


def test_corrupted_mnist_file_is_one_line_exit_2(tmp_path, mnist_raw):
    import shutil
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(mnist_raw, raw)
    with open(raw / "t10k-labels-idx1-ubyte", "r+b") as f:
        f.seek(100)
        f.write(b"\x07")
    (tmp_path / "s.json").write_text(json.dumps({"extends": opt.DEFAULT_SETTINGS, "output_dir": str(tmp_path / "o"),
                                                 "mnist": {"data_dir": str(tmp_path)}}))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "mnist_test", "Train.py"), "-opt", "s.json"],
                          cwd=str(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "t10k-labels-idx1-ubyte has MD5" in lines[0]


def test_atomic_write_removes_temporary_files_of_dead_processes(tmp_path):
    target = tmp_path / "r.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"r.json.tmp{int(dead.stdout)}"
    stale.write_text("half")
    live = tmp_path / f"r.json.tmp{os.getppid()}"  # a running process's file is left alone
    live.write_text("busy")
    opt.write_json(str(target), {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert not stale.exists() and live.exists()


def test_loss_rank_beyond_the_test_set_is_refused():
    with pytest.raises(opt.SettingsError, match="test_num = 12 with mnist.test_rank_step = 1000"):
        opt.load_settings(overrides={"mnist": {"test_num": 12}})


def test_thread_setting_is_applied_logged_and_stored(tmp_path, mnist_raw):
    import torch
    from mnist_test import Train
    from tests.conftest import small_settings
    before = torch.get_num_threads()
    try:
        settings = opt.with_values(small_settings(tmp_path, train_subset=100, epoch=1), {"threads": 1})
        meta = opt.read_json(Train.main(settings)["grad_norm"], "Train")["meta"]
        assert torch.get_num_threads() == 1 and meta["threads"] == 1
        log = open(sorted((tmp_path / "results" / "logs").iterdir())[-1]).read()
        assert "1 torch thread," in log
    finally:
        torch.set_num_threads(before)


def test_a_profile_never_overrides_a_more_specific_file(tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"extends": opt.DEFAULT_SETTINGS, "mnist": {
        "epoch": 3, "lds": {"test_ids": [11, 222, 3333, 4444, 5555]}}}))
    settings = opt.load_settings(str(mine), profile="quick")
    assert settings.mnist.lds.test_ids == [11, 222, 3333, 4444, 5555]
    assert settings.mnist.epoch == 3
    assert settings.mnist.lds.num_subsets == 20  # the profile's values elsewhere still apply
    assert "mnist.lds.num_subsets" in settings.source.profile_changed
    assert "mnist.epoch" not in settings.source.profile_changed


def test_a_bad_value_is_refused_even_when_a_profile_would_replace_it(tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"extends": opt.DEFAULT_SETTINGS, "mnist": {"epoch": -3}}))
    with pytest.raises(opt.SettingsError, match=r"mnist.epoch = -3.*in .*mine.json"):
        opt.load_settings(str(mine), profile="quick")


def test_set_values_are_checked_like_the_file_and_win(tmp_path):
    settings = opt.load_settings(profile="quick", assignments=["mnist.test_ids=[42]", "mnist.method2.solver=ekfac"])
    assert settings.mnist.test_ids == [42] and settings.mnist.method2.solver == "ekfac"
    with pytest.raises(opt.SettingsError, match=r"mnist.epoch = 0.*-set"):
        opt.load_settings(assignments=["mnist.epoch=0"])
    with pytest.raises(opt.SettingsError, match="did you mean 'mnist.test_ids'"):
        opt.load_settings(assignments=["mnist.test_id=[42]"])
    done = subprocess.run([sys.executable, "mnist_test/Test.py", "-set", "mnist.test_num=zero"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "mnist.test_num" in done.stderr


def test_the_typed_blocks_hold_the_defaults_of_implementation_json():
    raw = json.loads(opt.strip_comments(open(opt.DEFAULT_SETTINGS).read()))
    raw.pop("profiles")
    assert opt.defaults() == raw
    typed = opt.typed(opt.load_settings(profile="quick"))
    assert typed.mnist.epoch == 5 and typed.mnist.method2.solver == "lissa" and typed.ffdnet.explain.finetune.epochs == 0.5


# ---- mnist.recipe: a preset of the whole training recipe ---------------------------------------
def test_the_attributable_preset_sets_its_recipe_and_keeps_every_value_the_user_set(tmp_path):
    preset = opt.preset_values("attributable")
    assert preset == {"mnist.epoch": 20, "mnist.batch_size": 128, "mnist.learning_rate": 0.05, "mnist.momentum": 0.9,
                      "mnist.weight_decay": 0.0005, "mnist.lr_schedule": "linear", "mnist.activation": "softplus",
                      "mnist.logit_scale": 1.0, "mnist.window": 1, "mnist.window_unit": "epochs", "mnist.lds.epoch": 20}
    report = opt.load_settings()
    assert report.source.recipe_changed == [] and report.source.recipe_kept == []
    for key, value in opt.preset_values("report").items():
        assert opt.value_at(report, key) == value, key  # the report's preset is the defaults
    chosen = opt.load_settings(assignments=["mnist.recipe=attributable"])
    for key, value in preset.items():
        assert opt.value_at(chosen, key) == value, key
    assert chosen.source.recipe_kept == []
    # a value set by -set, a profile or an extending file wins, and is said
    mine = opt.load_settings(profile="quick", assignments=["mnist.recipe=attributable", "mnist.learning_rate=0.02"])
    assert mine.mnist.learning_rate == 0.02 and mine.mnist.epoch == 5
    assert mine.mnist.batch_size == 128 and mine.mnist.activation == "softplus"
    assert "mnist.learning_rate = 0.02 (the preset's: 0.05)" in mine.source.recipe_kept
    extending = tmp_path / "mine.json"
    extending.write_text(json.dumps({"extends": os.path.join(opt.REPO_ROOT, "Implementation.json"),
                                     "mnist": {"recipe": "attributable", "batch_size": 64}}))
    assert opt.load_settings(str(extending)).mnist.batch_size == 64
    # a value changed in the base file itself (the user's Implementation.json) is theirs too
    text = open(os.path.join(opt.REPO_ROOT, "Implementation.json")).read()
    edited = tmp_path / "Implementation.json"
    edited.write_text(text.replace('"recipe": "report"', '"recipe": "attributable"')
                      .replace('"weight_decay": 0.001,', '"weight_decay": 0.002,', 1))
    base = opt.load_settings(str(edited))
    assert base.mnist.weight_decay == 0.002 and base.mnist.learning_rate == 0.05
    assert any(k.startswith("mnist.weight_decay = 0.002") for k in base.source.recipe_kept)


def test_the_docs_show_the_presets_as_the_code_defines_them():
    with open(os.path.join(opt.REPO_ROOT, "docs", "methods.md"), encoding="utf-8") as f:
        assert opt.recipe_table() in f.read()


def test_a_block_set_as_a_value_and_a_file_without_extends_are_told_what_to_do(tmp_path):
    with pytest.raises(opt.SettingsError, match=r"-set mnist.method2: a block of settings, not one; set one of its "
                                                r"keys, e.g. -set mnist.method2\."):
        opt.load_settings(assignments=["mnist.method2=3"])
    partial = tmp_path / "partial.json"
    partial.write_text('{"mnist": {"epoch": 2}}')
    with pytest.raises(opt.SettingsError, match=r"partial.json: missing setting .*add \"extends\": \"Implementation.json\""):
        opt.load_settings(str(partial))


def test_implementation_json_comments_are_the_blocks_help():
    """Each key's comment in Implementation.json is its help text from the typed blocks (written once;
    python3 -m options.default_file rewrites them), keys in the blocks' order, no key missing."""
    from options import default_file
    with open(opt.DEFAULT_SETTINGS, encoding="utf-8") as f:
        text = f.read()
    assert default_file.render(text) == text, "run python3 -m options.default_file"
    assert '"recursion_depth": 1000,' in text and "// LiSSA t: steps of the recursion" in text


def test_a_variant_checks_only_what_it_changes_and_keeps_the_rest():
    settings = opt.load_settings()
    variant = opt.with_values(settings, {"mnist": {"method2": {"solver": "cg", "cg_max_iter": 7}}})
    assert (variant.mnist.method2.solver, variant.mnist.method2.cg_max_iter) == ("cg", 7)
    assert variant.mnist.lds == settings.mnist.lds and settings.mnist.method2.solver == "lissa"  # the original kept
    with pytest.raises(opt.SettingsError, match="mnist.method2.cg_max_iter"):
        opt.with_values(settings, {"mnist": {"method2": {"cg_max_iter": 0}}})
    with pytest.raises(opt.SettingsError, match="unknown setting 'cg_maxiter'"):
        opt.with_values(settings, {"mnist": {"method2": {"cg_maxiter": 7}}})


def test_the_engine_names_no_settings_key_and_no_network_layer():
    """influence/ takes plain arguments: no settings block, network name or layer of the networks above."""
    import glob
    import re
    for path in glob.glob(os.path.join(opt.REPO_ROOT, "influence", "*.py")):
        code = "\n".join(line.split("#")[0] for line in open(path, encoding="utf-8"))
        assert not re.search(r"\b(mnist|ffdnet)\.\w|method[123]\.\w|\"main\.\d", code), path
        assert "import utils_option" not in code and "from options" not in code, path
