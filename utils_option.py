"""Settings, paths, seeding, device choice, logging and result files, shared by every script.

Every script calls :func:`script_settings` first: it parses ``-opt PATH`` (default: the repo's
``Implementation.json``) and ``-profile NAME``, validates the settings and returns them, so that a
bad value stops the script with one line naming the key, not a traceback deep inside torch.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import sys
import time
from typing import Any, Callable, Iterable

import numpy as np
import torch

from influence.solvers import SolverSettings, solver_for, solver_names

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SETTINGS = os.path.join(REPO_ROOT, "Implementation.json")


class SettingsError(ValueError):
    """A bad or missing setting. Its message is one line meant for the user."""


class MissingFileError(FileNotFoundError):
    """An input file another script should have written. The message says which script."""


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------
def strip_comments(text: str) -> str:
    """Remove ``//`` comments (outside strings), as the original's parser allowed them."""
    out_lines = []
    for line in text.splitlines():
        in_string, escaped, cut = False, False, len(line)
        for i, ch in enumerate(line):
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = not in_string
            elif not in_string and line.startswith("//", i):
                cut = i
                break
        out_lines.append(line[:cut])
    return "\n".join(out_lines)


def deep_merge(base: dict, override: dict) -> dict:
    """Return ``base`` updated recursively with ``override`` (neither is modified)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_extended(path: str, chain: tuple[str, ...]) -> dict:
    """A settings file merged over the file it ``extends`` (which may extend another, and so on)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        raw = json.loads(strip_comments(text))
    except json.JSONDecodeError as err:
        raise SettingsError(f"{path}: not valid JSON after removing // comments "
                            f"(line {err.lineno}, column {err.colno}: {err.msg})") from None
    if "extends" not in raw:
        return raw
    base_path = os.path.normpath(os.path.join(os.path.dirname(path), raw.pop("extends")))
    if not os.path.isfile(base_path):
        raise MissingFileError(f"{path}: \"extends\" names {base_path}, which does not exist "
                               f"(give a path relative to {os.path.dirname(path)})")
    if base_path in chain + (os.path.normpath(path),):
        raise SettingsError(f"{path}: \"extends\" makes a loop through {base_path}")
    base = _read_extended(base_path, chain + (os.path.normpath(path),))
    check_known_keys(base, base_path)
    return deep_merge(base, raw)


def load_settings(path: str | None = None, profile: str | None = None,
                  overrides: dict | None = None) -> dict:
    """Read, merge the chosen profile into, and validate a settings file.

    ``profile`` (or the file's own ``"profile"`` key) picks ``profiles[profile]``, whose values
    replace the base values. ``overrides`` (a nested dict) is applied last, for drivers and tests.
    """
    path = resolve_path(path or DEFAULT_SETTINGS)
    if not os.path.isfile(path):
        raise MissingFileError(f"settings file not found: {path} (pass -opt PATH to a valid file)")
    raw = _read_extended(path, ())
    check_known_keys(raw, path)
    profile = profile or raw.get("profile", "report")
    profiles = raw.get("profiles", {})
    if profile not in profiles and profile != "report":
        raise SettingsError(f"profile = {profile!r} is not defined; valid choices: "
                            f"{sorted(set(profiles) | {'report'})}")
    settings = deep_merge(raw, profiles.get(profile, {}))
    if overrides:
        settings = deep_merge(settings, overrides)
    settings["profile"] = profile
    settings["settings_file"] = path
    validate(settings, SCHEMA)
    return settings


STRUCTURAL_KEYS = ("extends", "profile", "profiles", "settings_file")


def _leaf_keys(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        keys += _leaf_keys(value, dotted + ".") if isinstance(value, dict) and dotted not in SCHEMA else [dotted]
    return keys


def check_known_keys(raw: dict, path: str) -> None:
    """Refuse a key the toolkit does not know (a typo would otherwise be ignored silently), in
    the file and in each of its profiles, naming the closest valid key."""
    import difflib
    parts = [("", {k: v for k, v in raw.items() if k not in STRUCTURAL_KEYS})]
    parts += [(f"profiles.{name}.", body) for name, body in raw.get("profiles", {}).items() if isinstance(body, dict)]
    for where, body in parts:
        for key in _leaf_keys(body):
            if key not in SCHEMA:
                close = difflib.get_close_matches(key, list(SCHEMA), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else "; see the README's settings table"
                raise SettingsError(f"{path}: unknown setting '{where}{key}'{hint}")


# --------------------------------------------------------------------------------------------
# validation: one schema entry per key, "a.b.c" -> (kind, extra)
# --------------------------------------------------------------------------------------------
def _choice(*options: str):
    return ("choice", options)


# every attribution ldsTest.py scores (mnist.lds.methods); if_cg runs once per lds.cg_damps value
LDS_METHODS = ("m1_batch_raw", "m1_batch_normalized", "m1_per_sample_raw", "m1_per_sample_normalized",
               "if_ekfac", "if_kfac", "if_kfac_factored", "if_exact_last", "if_lissa", "if_lissa_deep", "if_cg",
               "grad_dot", "grad_cos", "ensemble_m1_batch_raw", "ensemble_if_ekfac", "ensemble_if_kfac_factored",
               "ensemble_grad_dot", "m3_replay", "if_arnoldi", "trak", "ensemble_trak")

SCHEMA: dict[str, tuple] = {
    "output_dir": ("str", None),
    "threads": ("int", (0, 256)),
    "profile": ("str", None),
    "mnist.seed": ("int", (0, None)),
    "mnist.use_gpu": ("bool", None),
    "mnist.data_dir": ("str", None),
    "mnist.epoch": ("int", (1, None)),
    "mnist.batch_size": ("int", (1, None)),
    "mnist.learning_rate": ("float", (0.0, None)),
    "mnist.momentum": ("float", (0.0, 1.0)),
    "mnist.weight_decay": ("float", (0.0, None)),
    "mnist.activation": _choice("relu", "softplus"),
    "mnist.train_subset": ("int", (0, 60000)),
    "mnist.checkpoint_every": ("int", (0, None)),
    "mnist.vis_num": ("int", (1, 100)),
    "mnist.method": ("one_or_list", ("method1", "method2", "method3")),
    "mnist.newData": ("one_or_list", ("algo", "random", "remove_algo", "remove_random")),
    "mnist.explain.m2_lists": ("subset", ("helpful", "harmful")),
    "mnist.explain.n_values": ("int_list", None),
    "mnist.explain.group_size": ("int", (1, 10000)),
    "mnist.stability.seeds": ("int_list", None),
    "mnist.stability.methods": ("subset", ("method1", "method2", "method3")),
    "mnist.stability.top": ("int", (1, 60000)),
    "mnist.test_ids": ("test_ids", None),
    "mnist.test_num": ("int", (1, 10000)),
    "mnist.test_rank_step": ("int", (1, 10000)),
    "mnist.method1.mode": ("str", None),
    "mnist.method1.grad_mode": _choice("batch", "per_sample"),
    "mnist.method1.skip_first_epoch": ("bool", None),
    "mnist.method1.layers": ("subset", ("fc1", "fc2", "fc3")),
    "mnist.method1.top_k": ("int", (1, 60000)),
    "mnist.lds.setting": _choice("algorithm", "single_model"),
    "mnist.lds.drop_fractions": ("float_list", None),
    "mnist.lds.method3_test_num": ("int", (1, 10000)),
    "mnist.lds.train_subset": ("int", (10, 60000)),
    "mnist.lds.test_ids": ("lds_test_ids", None),
    "mnist.lds.subset_fraction": ("float", (0.01, 0.99)),
    "mnist.lds.num_subsets": ("int", (3, None)),
    "mnist.lds.seeds_per_subset": ("int", (1, None)),
    "mnist.lds.epoch": ("int", (1, None)),
    "mnist.lds.seed": ("int", (0, None)),
    "mnist.lds.group_size": ("int", (1, 10000)),
    "mnist.lds.keep_weights": ("bool", None),
    "mnist.lds.methods": ("subset", LDS_METHODS),
    "mnist.lds.ensemble_seeds": ("int_list", None),
    "mnist.lds.solver_test_num": ("int", (1, 10000)),
    "mnist.lds.lissa_deep.training_points": ("int", (1, None)),
    "mnist.lds.lissa_deep.recursion_nums": ("int", (1, None)),
    "mnist.lds.cg_damps": ("float_list", None),
    "mnist.lds.ekfac_damp_factors": ("float_list", None),
    "mnist.lds.kfac_factored_damp_factors": ("float_list", None),
    "mnist.lds.cg_max_iter": ("int", (1, None)),
    "mnist.lds.bootstrap": ("int", (10, None)),
    "mnist.lds.loo.test_num": ("int", (0, 10000)),
    "mnist.lds.loo.k": ("int", (1, 10000)),
    "mnist.lds.loo.seeds": ("int", (1, None)),
    "mnist.lds.loo.rank_by": _choice(*LDS_METHODS),
    "mnist.mislabel.train_subset": ("int", (0, 60000)),
    "mnist.mislabel.fraction": ("float", (0.001, 0.9)),
    "mnist.mislabel.seed": ("int", (0, None)),
    "mnist.mislabel.epoch": ("int", (1, None)),
    "mnist.mislabel.checkpoint_every": ("int", (0, None)),
    "mnist.vis_method": _choice("method2", "method3"),
    "mnist.method3.mode": ("str", None),
    "mnist.method3.target": _choice("loss", "margin"),
    "mnist.method3.test_sample_num": ("int", (1, 10000)),
    "mnist.method3.checkpoint_interval": ("int", (0, None)),
    "mnist.method3.test_chunk": ("int", (1, 10000)),
    "mnist.method3.replay_tolerance": ("float", (0.0, None)),
    "mnist.method3.top_k": ("int", (1, 60000)),
    "mnist.method3.if_dir": ("str", None),
    "mnist.method2.mode": ("str", None),
    "mnist.method2.solver": ("solver", "mnist"),
    "mnist.method2.proj_dim": ("int", (1, None)),
    "mnist.method2.arnoldi_rank": ("int", (1, None)),
    "mnist.method2.arnoldi_iterations": ("int", (1, None)),
    "mnist.method2.fisher": _choice("true", "empirical"),
    "mnist.method2.kfac_damp_factor": ("float", (0.0, None)),
    "mnist.method2.write_unconverged": ("bool", None),
    "mnist.method2.save_matrix": _choice("none", "float16", "float32"),
    "mnist.method2.self_influence": ("bool", None),
    "mnist.method2.test_chunk": ("int", (1, 10000)),
    "mnist.method2.damp": ("float", (0.0, None)),
    "mnist.method2.scale": ("float", (1e-12, None)),
    "mnist.method2.stochastic": ("bool", None),
    "mnist.method2.hvp_batch_size": ("int", (1, 60000)),
    "mnist.method2.recursion_nums": ("int", (1, None)),
    "mnist.method2.training_points": ("int", (1, None)),
    "mnist.method2.test_sample_num": ("int", (1, 10000)),
    "mnist.method2.params": ("str_list", None),
    "mnist.method2.l2_reg": ("float", (0.0, None)),
    "mnist.method2.cg_tol": ("float", (0.0, None)),
    "mnist.method2.cg_max_iter": ("int", (1, None)),
    "mnist.method2.hessian_points": ("int", (0, 60000)),
    "mnist.method2.exact_max_params": ("int", (1, None)),
    "mnist.method2.chunk_size": ("int", (1, None)),
    "mnist.method2.top_k": ("int", (1, 60000)),
    "mnist.method2.if_dir": ("str", None),
    "ffdnet.seed": ("int", (0, None)),
    "ffdnet.use_gpu": ("bool", None),
    "ffdnet.is_gray": ("bool", None),
    "ffdnet.layout": _choice("bn", "plain"),
    "ffdnet.residual": ("bool", None),
    "ffdnet.bn_recalibrate_batches": ("int", (0, None)),
    "ffdnet.channel_order": _choice("rgb", "bgr"),
    "ffdnet.train_dir": ("str", None),
    "ffdnet.val_dir": ("str", None),
    "ffdnet.test_dir": ("str", None),
    "ffdnet.patch_size": ("int", (8, 1024)),
    "ffdnet.stride": ("int", (1, 1024)),
    "ffdnet.max_patches": ("int", (0, None)),
    "ffdnet.sigma": ("range", (0.0, 255.0)),
    "ffdnet.fixed_noise": ("bool", None),
    "ffdnet.val_sigma": ("float", (0.0, 255.0)),
    "ffdnet.epoch": ("int", (1, None)),
    "ffdnet.batch_size": ("int", (1, None)),
    "ffdnet.learning_rate": ("float", (0.0, None)),
    "ffdnet.lr_decay_epochs": ("int_list", None),
    "ffdnet.train_checkpoints": ("int", (1, None)),
    "ffdnet.init_checkpoint": ("path_or_empty", None),
    "ffdnet.test.model": ("path_or_empty", None),
    "ffdnet.test.noise_level_img": ("float", (0.0, 255.0)),
    "ffdnet.test.is_clip": ("bool", None),
    "ffdnet.test.border": ("int", (0, None)),
    "ffdnet.test.save_images": ("bool", None),
    "ffdnet.method1.record": ("bool", None),
    "ffdnet.method1.grad_mode": _choice("batch", "per_sample"),
    "ffdnet.method1.layers": ("int_list", None),
    "ffdnet.method1.mode": _choice("raw", "normalized", "remove_out"),
    "ffdnet.method1.outlim": ("float", (0.0, None)),
    "ffdnet.method1.activation": _choice("block", "conv"),
    "ffdnet.method1.top_k": ("int", (1, None)),
    "ffdnet.attribution.images": ("str_list", None),
    "ffdnet.attribution.points": ("points", None),
    "ffdnet.attribution.vis_num": ("int", (1, 100)),
    "ffdnet.method2.solver": ("solver", "ffdnet"),
    "ffdnet.method2.damp": ("float", (0.0, None)),
    "ffdnet.method2.scale": ("float", (1e-12, None)),
    "ffdnet.method2.stochastic": ("bool", None),
    "ffdnet.method2.hvp_batch_size": ("int", (1, None)),
    "ffdnet.method2.recursion_nums": ("int", (1, None)),
    "ffdnet.method2.training_points": ("int", (1, None)),
    "ffdnet.method2.params": ("str_list", None),
    "ffdnet.method2.l2_reg": ("float", (0.0, None)),
    "ffdnet.method2.cg_tol": ("float", (0.0, None)),
    "ffdnet.method2.cg_max_iter": ("int", (1, None)),
    "ffdnet.method2.hessian_points": ("int", (0, None)),
    "ffdnet.method2.exact_max_params": ("int", (1, None)),
    "ffdnet.method2.chunk_size": ("int", (1, None)),
    "ffdnet.method2.max_train_points": ("int", (0, None)),
    "ffdnet.method2.window": ("int", (0, 64)),
    "ffdnet.method2.top_k": ("int", (1, None)),
    "ffdnet.explain.test_images": ("int", (1, 100)),
    "ffdnet.explain.rankings": ("subset", ("m3_window", "m3_whole", "m2_window", "m2_whole", "m1", "random")),
    "ffdnet.explain.manipulations": ("subset", ("remove", "corrupt")),
    "ffdnet.explain.k_values": ("int_list", None),
    "ffdnet.explain.seeds": ("int", (1, 100)),
    "ffdnet.explain.m1_layer": ("int", (0, 100)),
    "ffdnet.explain.m1_mode": _choice("raw", "normalized", "remove_out"),
    "ffdnet.explain.finetune.epochs": ("float", (1e-6, None)),
    "ffdnet.explain.finetune.learning_rate": ("float", (0.0, None)),
    "ffdnet.explain.finetune.batch_size": ("int", (1, None)),
    "ffdnet.explain.maps": ("int", (0, 100)),
    "ffdnet.method3.checkpoint_interval": ("int", (0, None)),
    "ffdnet.method3.replay_tolerance": ("float", (0.0, None)),
    "ffdnet.method3.top_k": ("int", (1, None)),
}


def _lookup(settings: dict, dotted: str) -> Any:
    node: Any = settings
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise SettingsError(f"missing setting {dotted!r} (add it to the settings file; "
                                f"see the README's settings table)")
        node = node[part]
    return node


def _bad(key: str, value: Any, expected: str) -> SettingsError:
    return SettingsError(f"bad setting {key} = {json.dumps(value)}: expected {expected}")


def validate(settings: dict, schema: dict[str, tuple]) -> None:
    """Check every schema key; raise :class:`SettingsError` with one line on the first problem."""
    _validate_keys(settings, schema)
    mnist = settings.get("mnist", {})
    if mnist.get("test_ids") == "loss_rank" and "mnist.test_num" in schema and \
            (mnist["test_num"] - 1) * mnist["test_rank_step"] >= 10000:
        raise SettingsError(f"bad settings mnist.test_num = {mnist['test_num']} with mnist.test_rank_step = "
                            f"{mnist['test_rank_step']}: rank {(mnist['test_num'] - 1) * mnist['test_rank_step']} "
                            f"is beyond the 10,000 test images (lower one of them)")


def _validate_keys(settings: dict, schema: dict[str, tuple]) -> None:
    for key, (kind, extra) in schema.items():
        value = _lookup(settings, key)
        if kind == "bool":
            if not isinstance(value, bool):
                raise _bad(key, value, "true or false")
        elif kind in ("int", "float"):
            ok = isinstance(value, int) if kind == "int" else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok:
                hint = " (damp is a number now: 0.01 is the original's value, 0 turns it off)" \
                    if key.endswith(".damp") and isinstance(value, bool) else ""
                raise _bad(key, value, f"a{'n integer' if kind == 'int' else ' number'}{hint}")
            low, high = extra
            if (low is not None and value < low) or (high is not None and value > high):
                raise _bad(key, value, f"a value in [{low}, {'inf' if high is None else high}]")
        elif kind == "str":
            if not isinstance(value, str) or not value:
                raise _bad(key, value, "a non-empty string")
        elif kind == "choice":
            if value not in extra:
                raise _bad(key, value, f"one of {list(extra)}")
        elif kind == "solver":  # the registry's names, read when checked (a solver registered later counts)
            if value not in solver_names(extra):
                raise _bad(key, value, f"one of {list(solver_names(extra))}")
        elif kind == "subset":
            if not isinstance(value, list) or not value or any(v not in extra for v in value):
                raise _bad(key, value, f"a non-empty list drawn from {list(extra)}")
        elif kind == "one_or_list":
            values = value if isinstance(value, list) else [value]
            if not values or any(v not in extra for v in values):
                raise _bad(key, value, f"one of {list(extra)} or a list of them")
        elif kind == "str_list":
            if not isinstance(value, list) or any(not isinstance(v, str) for v in value):
                raise _bad(key, value, "a list of parameter-name prefixes ([] = all parameters)")
        elif kind == "range":
            if (not isinstance(value, list) or len(value) != 2 or
                    any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value) or
                    not extra[0] <= value[0] <= value[1] <= extra[1]):
                raise _bad(key, value, f"[low, high] with {extra[0]} <= low <= high <= {extra[1]}")
        elif kind == "int_list":
            if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0
                                                  for v in value):
                raise _bad(key, value, "a list of non-negative integers")
        elif kind == "path_or_empty":
            if not isinstance(value, str):
                raise _bad(key, value, 'a path string ("" for none)')
        elif kind == "points":
            if not isinstance(value, list) or not value or any(
                    not isinstance(p, list) or len(p) != 2 or any(isinstance(v, bool) or not isinstance(v, int)
                                                                  or v < 0 for v in p) for p in value):
                raise _bad(key, value, "a list of [row, col] pixel positions")
        elif kind == "lds_test_ids":
            if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 10000:
                continue
            if not isinstance(value, list) or len(value) < 1 or any(
                    isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 10000 for v in value):
                raise _bad(key, value, "n (the first n test images) or a list of test indices in [0, 9999]")
        elif kind == "float_list":
            if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                  or v < 0 for v in value):
                raise _bad(key, value, "a list of non-negative numbers")
        elif kind == "test_ids":
            if value in ("loss_rank", "all"):
                continue
            if not isinstance(value, list) or not value or any(
                    isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 10000 for v in value):
                raise _bad(key, value, '"loss_rank", "all" or a list of test indices in [0, 9999]')


# --------------------------------------------------------------------------------------------
# command line and paths
# --------------------------------------------------------------------------------------------
def script_settings(description: str, argv: list[str] | None = None) -> dict:
    """Parse ``-opt`` / ``-profile`` and return validated settings; exit with one line on error.

    Spyder's run button passes no arguments, so every flag is optional. Unknown arguments (IPython's
    own) are ignored.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-opt", default=DEFAULT_SETTINGS,
                        help="settings file (JSON with // comments); a relative path is taken from the "
                             "current directory")
    parser.add_argument("-profile", default=None, help="profile to apply, e.g. quick or report")
    args, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if unknown and not is_interactive():  # Spyder/IPython pass arguments of their own: ignored there
        import difflib
        close = difflib.get_close_matches(unknown[0], ["-opt", "-profile"], n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else " (valid: -opt PATH, -profile NAME)"
        print(f"error: unknown argument {unknown[0]}{hint}", file=sys.stderr)
        raise SystemExit(2)
    path = os.path.abspath(args.opt)  # relative to where the user typed it, not the repo
    return settings_or_exit(lambda: load_settings(path, args.profile))


def settings_or_exit(make: Callable[[], dict]) -> dict:
    """Run ``make``; turn a settings or missing-file error into one line and exit status 2."""
    try:
        return make()
    except Exception as err:  # noqa: BLE001  (only the user-facing kinds; everything else re-raised)
        if not isinstance(err, (SettingsError, MissingFileError)) and not getattr(err, "one_line", False):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run_script(main: Callable[[dict], Any], description: str) -> Any:
    """The body of every script's ``__main__``: settings from the command line, then ``main``,
    with bad settings and missing inputs reported in one line (exit status 2)."""
    settings = script_settings(description)
    return settings_or_exit(lambda: main(settings))


def run_stage(module, paths: str | list[str], settings: dict, log: Callable[[str], Any] = print) -> None:
    """A study's prerequisite: run ``module.main(settings)`` unless every file in ``paths`` (what it
    writes for these settings) already exists, in which case those files are reused (logged)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    name = module.__name__.split(".")[-1]
    if all(os.path.isfile(p) for p in paths):
        log(f"reuse {name}'s {paths[0]}" + (f" (+{len(paths) - 1} more)" if len(paths) > 1 else ""))
    else:
        log(f"run {name}: {next(p for p in paths if not os.path.isfile(p))} is missing")
        module.main(settings)


def solver_file_part(m2: dict) -> str:
    """The solver part of every influence file name (MNIST and FFDNet), from a method2 block:
    the solver, its own settings and the damping it really applies (the registry's
    :meth:`Solver.file_part`), the L2 term and the chosen parameters. Two runs that differ in any of
    these never share a file."""
    params = "_p" + "+".join(m2["params"]) if m2["params"] else ""
    detail = solver_for(m2["solver"]).file_part(solver_settings(m2, 0))
    return f"{m2['solver']}_{detail}{params}_l2{m2['l2_reg']:g}"


def solver_settings(m2: dict, seed: int):
    """The influence engine's solver settings from a ``method2`` block (the original's key names:
    training_points = LiSSA's depth t, recursion_nums = its repeats r), with the progress bars on
    and the atomic writer for K-FAC factor files."""
    return SolverSettings(
        solver=m2["solver"], damp=float(m2["damp"]), scale=float(m2["scale"]),
        recursion_depth=m2["training_points"], repeats=m2["recursion_nums"],
        hvp_batch_size=1 if m2["stochastic"] else m2["hvp_batch_size"], cg_tol=m2["cg_tol"],
        cg_max_iter=m2["cg_max_iter"], hessian_points=m2["hessian_points"],
        exact_max_params=m2["exact_max_params"], chunk_size=m2["chunk_size"], seed=seed,
        fisher=m2.get("fisher", "true"), kfac_damp_factor=float(m2.get("kfac_damp_factor", 0.1)),
        arnoldi_rank=m2.get("arnoldi_rank", 50), arnoldi_iterations=m2.get("arnoldi_iterations", 100),
        proj_dim=m2.get("proj_dim", 2048),
        progress=progress, save=lambda path, state: save_torch(path, state))


def solver_error(block: str, err: Exception) -> "SettingsError":
    """An influence-engine error (its words are the solver settings' names) as a one-line settings
    error naming the block they live in, e.g. "mnist.method2: LiSSA diverged ... raise the scale"."""
    return SettingsError(f"{block}: {err}")


def resolve_path(path: str) -> str:
    """Absolute path; a relative one is taken from the repository root, not the working dir."""
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(REPO_ROOT, path))


def output_path(settings: dict, subdir: str, *parts: str) -> str:
    """A path under ``output_dir/subdir`` (created); results never go into the source tree."""
    folder = os.path.join(resolve_path(settings["output_dir"]), subdir, *parts[:-1])
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, parts[-1])


def output_folder(settings: dict, subdir: str, *parts: str) -> str:
    """A folder under ``output_dir/subdir`` (created)."""
    folder = os.path.join(resolve_path(settings["output_dir"]), subdir, *parts)
    os.makedirs(folder, exist_ok=True)
    return folder


def require_file(path: str, made_by: str) -> str:
    """Return ``path`` if it exists, else raise a one-line error naming the script that makes it."""
    if not os.path.isfile(path):
        raise MissingFileError(f"missing file {path}: run {made_by} first with the same settings")
    return path


# --------------------------------------------------------------------------------------------
# seeding and device
# --------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and all GPUs)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def apply_threads(settings: dict) -> int:
    """Set torch's CPU thread count from the ``threads`` setting and return it. The default 1
    makes seeded CPU results independent of the machine's core count (reductions split across
    threads sum in another order); 0 keeps torch's default (all cores: faster influence sweeps,
    results that can differ in the last bits between machines)."""
    wanted = settings.get("threads", 0)
    if wanted and torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return torch.get_num_threads()


def select_device(use_gpu: bool, logger: logging.Logger | None = None) -> torch.device:
    """CUDA when ``use_gpu`` is true and a GPU exists, else CPU; the choice is logged."""
    has_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu and has_cuda else "cpu")
    if logger is not None:
        gpu = torch.cuda.get_device_name(0) if has_cuda else "none"
        logger.info(f"device: {device} (use_gpu={use_gpu}, CUDA available: {has_cuda}, GPU: {gpu})")
        if use_gpu and not has_cuda:
            logger.warning("use_gpu is true but no CUDA GPU is visible: running on the CPU")
    return device


# --------------------------------------------------------------------------------------------
# several processes (torchrun)
# --------------------------------------------------------------------------------------------
def distributed_start(use_gpu: bool) -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE set) join the group: gloo on CPU, NCCL on GPU;
    run alone, (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        backend = "nccl" if use_gpu and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def distributed_barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def distributed_end() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def partition(jobs: list, rank: int, world: int) -> list:
    """This rank's disjoint share of the jobs (round robin): every job goes to exactly one rank."""
    return jobs[rank::world]


def pending_share(jobs: list[dict], rank: int, world: int) -> tuple[list[dict], list[dict]]:
    """(the jobs whose output file ``job["path"]`` does not exist yet, this rank's share of them).
    Every rank lists the pending jobs before any rank writes one (a barrier under torchrun), so all
    ranks partition the same list: a resumed study redoes exactly the missing jobs, once."""
    pending = [job for job in jobs if not os.path.isfile(job["path"])]
    distributed_barrier()
    return pending, partition(pending, rank, world)


# --------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------
def make_logger(settings: dict, name: str) -> logging.Logger:
    """A logger to the console and to ``output_dir/logs/{name}_{time}.log``; logs the settings."""
    if os.environ.get("RANK") not in (None, "0"):  # torchrun: one log per rank
        name = f"{name}_rank{os.environ['RANK']}"
    logger = logging.getLogger(f"toolkit.{name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):  # Spyder re-runs in one interpreter: no doubled lines
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s - %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    # the full settings (a long JSON line) go to the log file only: the console stays readable
    console.addFilter(lambda record: not record.getMessage().startswith("settings: "))
    logger.addHandler(console)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_file = output_path(settings, "logs", f"{name}_{stamp}_{os.getpid()}.log")
    counter = 1
    while os.path.exists(log_file):  # two runs in one second in one process: never share a log
        counter += 1
        log_file = output_path(settings, "logs", f"{name}_{stamp}_{os.getpid()}_{counter}.log")
    logger.log_file = log_file  # type: ignore[attr-defined]
    file_handler = logging.FileHandler(log_file, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s - %(message)s"))
    logger.addHandler(file_handler)
    threads = apply_threads(settings)
    logger.info(f"{name}: settings {settings['settings_file']} (profile {settings['profile']}), "
                f"{threads} torch thread{'s' if threads > 1 else ''}, output {resolve_path(settings['output_dir'])}, "
                f"log file {log_file}")
    shown = {k: v for k, v in settings.items() if k not in ("profiles",)}
    logger.info("settings: " + json.dumps(shown, sort_keys=True))
    return logger


# --------------------------------------------------------------------------------------------
# result files
# --------------------------------------------------------------------------------------------
def _announce_replace(path: str, logger: logging.Logger | None) -> None:
    if os.path.exists(path) and logger is not None:
        logger.info(f"replacing the earlier result {path} (same settings)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path: str, write: Callable[[str], None], logger: logging.Logger | None = None,
                 suffix: str = "", announce: bool = True) -> str:
    """The one way results are written: ``write(tmp)`` fills a temporary file beside ``path``,
    which then replaces ``path`` in one rename, so no half-written result is ever read. Temporary
    files left by killed processes (their pid is gone) are removed on the way."""
    import glob
    folder, name = os.path.split(path)
    for stale in glob.glob(os.path.join(glob.escape(folder), glob.escape(name) + ".tmp*")):
        pid = stale[len(path) + 4:].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            try:
                os.remove(stale)
            except OSError:
                pass
    if announce:
        _announce_replace(path, logger)
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json(path: str, obj: Any, logger: logging.Logger | None = None) -> str:
    """Write JSON atomically (temporary file then rename): no half-written result is ever left."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, separators=(",", ":"))
    atomic_write(path, write, logger)
    if logger is not None:
        logger.info(f"wrote {path}")
    return path


def write_csv(path: str, rows: list[dict], logger: logging.Logger | None = None) -> str:
    """Rows of dicts (same keys) as CSV, atomically."""
    import csv

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return atomic_write(path, write, logger)


def write_text(path: str, text: str, logger: logging.Logger | None = None) -> str:
    """Write a text file (Markdown tables) atomically, announcing a replacement."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write, logger)
    if logger is not None:
        logger.info(f"wrote {path}")
    return path


def read_json(path: str, made_by: str) -> Any:
    """Read a JSON result, with a one-line error naming the script that writes it."""
    with open(require_file(path, made_by), encoding="utf-8") as f:
        return json.load(f)


def save_torch(path: str, obj: Any, logger: logging.Logger | None = None) -> str:
    """``torch.save`` atomically, announcing a replacement."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp), logger)
    if logger is not None:
        logger.info(f"wrote {path}")
    return path


def float_matrix_json(matrix: np.ndarray, digits: int = 8) -> str:
    """A 2-D float array as a JSON list of lists, formatted fast (``digits`` significant)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError("float_matrix_json expects a 2-D array")
    if matrix.size == 0:
        return "[" + ",".join("[]" for _ in range(matrix.shape[0])) + "]"
    row_fmt = "[" + ",".join([f"%.{digits}g"] * matrix.shape[1]) + "]"
    rows = [row_fmt % tuple(row) for row in matrix.tolist()]
    return "[" + ",".join(rows) + "]"


def write_json_with_matrices(path: str, obj: dict, matrices: dict[str, np.ndarray],
                             logger: logging.Logger | None = None) -> str:
    """Write ``obj`` plus big float matrices (under key ``"arrays"``) as one JSON file, atomically.

    Equivalent to ``write_json(path, {**obj, "arrays": {name: matrix.tolist()}})`` but formats the
    numbers in bulk, so a 60,000 x 202 matrix takes seconds, not minutes.
    """
    head = json.dumps(obj, separators=(",", ":"))

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(head[:-1] + (',"arrays":{' if obj else '"arrays":{'))
            for i, (name, matrix) in enumerate(matrices.items()):
                f.write(("," if i else "") + json.dumps(name) + ":")
                f.write(float_matrix_json(matrix))
            f.write("}}")
    atomic_write(path, write, logger)
    if logger is not None:
        logger.info(f"wrote {path}")
    return path


def is_interactive() -> bool:
    """True inside Spyder/IPython/Jupyter or a Python prompt: figures are then shown on screen."""
    return hasattr(sys, "ps1") or "ipykernel" in sys.modules or "SPYDER_ARGS" in os.environ \
        or any(k.startswith("SPY_") for k in os.environ)


def save_figure(fig, path: str, logger: logging.Logger | None = None) -> str:
    """Save a matplotlib figure as PNG (atomically); show it when interactive, never block."""
    import matplotlib.pyplot as plt
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"), logger,
                 suffix=".png")
    if logger is not None:
        logger.info(f"figure {path}")
    if is_interactive():
        plt.show(block=False)
    else:
        plt.close(fig)
    return path


def progress(iterable: Iterable | None = None, **kwargs):
    """tqdm progress bar (one place to change how bars look)."""
    from tqdm.auto import tqdm
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, **kwargs)


def peak_rss_mb() -> float:
    """The process's peak resident memory (VmHWM, Linux) in MB; NaN where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return float("nan")


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
