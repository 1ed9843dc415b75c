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
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import numpy as np
import torch

from influence.settings import SolverSettings
from influence.solvers import SOLVERS, solver_for
from options.blocks import RECIPES, defaults, help_lines, schema, typed  # noqa: F401
from options.method2 import lds_methods, method2_class, offered_solvers  # noqa: F401

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


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        raw = json.loads(strip_comments(text))
    except json.JSONDecodeError as err:
        raise SettingsError(f"{path}: not valid JSON after removing // comments "
                            f"(line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: a settings file is one JSON object {{...}}")
    return raw


def settings_layers(path: str, chain: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """The chain of files a settings file ``extends``, the most general first: [(path, its JSON)]."""
    raw = _read_json(path)
    if "extends" not in raw:
        return [(path, raw)]
    base_path = os.path.normpath(os.path.join(os.path.dirname(path), raw.pop("extends")))
    if not os.path.isfile(base_path):
        raise MissingFileError(f"{path}: \"extends\" names {base_path}, which does not exist "
                               f"(give a path relative to {os.path.dirname(path)})")
    if base_path in chain + (os.path.normpath(path),):
        raise SettingsError(f"{path}: \"extends\" makes a loop through {base_path}")
    return settings_layers(base_path, chain + (os.path.normpath(path),)) + [(path, raw)]


def parse_assignment(text: str) -> dict:
    """``-set KEY=VALUE`` as a nested dict: the value is JSON (a bare word is taken as a string),
    the key a dotted settings key that must exist."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SettingsError(f"-set {text!r}: expected KEY=VALUE, e.g. -set 'mnist.test_ids=[42]'")
    key = next((key[:-len(old)] + new for old, new in RENAMED_KEYS.items() if key.endswith(old)), key)
    if key not in SCHEMA:
        children = sorted(k for k in SCHEMA if k.startswith(key + "."))
        if children:  # a block, not a setting: name one of its keys
            raise SettingsError(f"-set {key}: a block of settings, not one; set one of its keys, e.g. "
                                f"-set {children[0]}=VALUE (the script's -h lists them)")
        import difflib
        close = difflib.get_close_matches(key, list(SCHEMA), n=1, cutoff=0.6)
        raise SettingsError(f"-set {key}: unknown setting" + (f"; did you mean {close[0]!r}?" if close else ""))
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return _set_dotted({}, key, parsed)


def _set_dotted(tree: dict, dotted: str, value: Any) -> dict:
    """``tree`` with ``value`` placed at the dotted key "a.b.c" (nested dicts made as needed)."""
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def load_settings(path: str | None = None, profile: str | None = None,
                  overrides: dict | None = None, assignments: list[str] | None = None) -> dict:
    """:func:`_load_settings`, with one more hint: a file that sets only some keys and extends nothing
    is told to add ``"extends"``."""
    try:
        return _load_settings(path, profile, overrides, assignments)
    except SettingsError as err:
        resolved = resolve_path(path or DEFAULT_SETTINGS)
        if (str(err).startswith("missing setting") and resolved != resolve_path(DEFAULT_SETTINGS)
                and not any("extends" in raw for _, raw in settings_layers(resolved))):
            raise SettingsError(f"{resolved}: {err}; a file that sets only some keys takes the rest from the file it "
                                f"extends: add \"extends\": \"Implementation.json\" (as settings_shared.json does)"
                                ) from None
        raise


def _load_settings(path: str | None = None, profile: str | None = None,
                   overrides: dict | None = None, assignments: list[str] | None = None) -> dict:
    """Read, merge and check a settings file; the most specific value wins.

    The order, each replacing the one before: the most general file (``Implementation.json``), its
    profile, a file that ``extends`` it, that file's profile, ..., then ``overrides`` (a nested
    dict, for drivers and tests), then ``assignments`` (``-set KEY=VALUE``). A profile never
    replaces a value that a more specific file sets. ``profile`` (else the most specific file's
    ``"profile"`` key, else "report") names the profile. Every value is checked where it is
    written, even one that a later layer replaces; ``settings["profile_changed"]`` lists the keys
    the profile set.
    """
    path = resolve_path(path or DEFAULT_SETTINGS)
    if not os.path.isfile(path):
        raise MissingFileError(f"settings file not found: {path} (pass -opt PATH to a valid file)")
    layers = settings_layers(path)
    renamed: list[str] = []
    for layer_path, raw in layers:
        renamed += rename_keys({k: v for k, v in raw.items() if k not in STRUCTURAL_KEYS}, layer_path)
        for name, body in raw.get("profiles", {}).items():
            renamed += rename_keys(body, f"{layer_path} (profile {name})") if isinstance(body, dict) else []
        check_known_keys(raw, layer_path)
    if overrides:
        overrides = copy.deepcopy(overrides)
        renamed += rename_keys(overrides, "overrides")
    chosen = profile or next((raw["profile"] for _, raw in reversed(layers) if "profile" in raw), "report")
    defined = {name for _, raw in layers for name in raw.get("profiles", {})}
    if chosen not in defined and chosen != "report":
        raise SettingsError(f"profile = {chosen!r} is not defined; valid choices: {sorted(defined | {'report'})}")
    settings: dict = {}
    changed: list[str] = []
    for position, (layer_path, raw) in enumerate(layers):
        body = {k: v for k, v in raw.items() if k not in STRUCTURAL_KEYS}
        check_written(body, layer_path)
        settings = deep_merge(settings, body)
        extra = raw.get("profiles", {}).get(chosen, {})
        if extra:
            check_written(extra, f"{layer_path} (profile {chosen})")
            later = [b for _, b in layers[position + 1:]]
            extra = _without_keys_set_in(extra, later)  # a more specific file's own value wins
            settings = deep_merge(settings, extra)
            changed += [k for k in _leaf_keys(extra) if k not in changed]
    for where, layer in (("overrides", overrides), *(("-set", parse_assignment(a)) for a in assignments or [])):
        if layer:
            check_written(layer, where)
            settings = deep_merge(settings, layer)
    taken = _take_defaults(settings) if resolve_path(layers[0][0]) == resolve_path(DEFAULT_SETTINGS) else []
    written = [raw for _, raw in layers[1:]] + [raw.get("profiles", {}).get(chosen, {}) for _, raw in layers]
    written += [overrides or {}] + [parse_assignment(a) for a in assignments or []]
    settings, recipe_set, recipe_kept = _apply_recipe(settings, layers[0][1], written)
    merged_profiles: dict = {}
    for _, raw in layers:
        merged_profiles = deep_merge(merged_profiles, raw.get("profiles", {}))
    settings["profiles"] = merged_profiles
    settings["profile"] = chosen
    settings["profile_changed"] = changed
    settings["recipe_changed"], settings["recipe_kept"] = recipe_set, recipe_kept
    settings["renamed"], settings["defaults_taken"] = renamed, taken
    settings["settings_file"] = path
    validate(settings, SCHEMA)
    return settings


def _apply_recipe(settings: dict, base: dict, written: list[dict]) -> tuple[dict, list[str], list[str]]:
    """The preset of ``mnist.recipe`` (options.blocks.RECIPES) over ``settings``: each of its keys takes
    the preset's value unless the user set that key: a layer in ``written`` (a file that extends the
    base, a profile, overrides, -set) writes it, or the base file holds another value than the
    default. Returns (settings, keys the preset set, "key = yours (the preset's: value)" kept)."""
    name = _lookup(settings, "mnist.recipe") if "mnist" in settings and "recipe" in settings["mnist"] else "report"
    preset = RECIPES[name]
    explicit = {key for body in written for key in _leaf_keys({k: v for k, v in body.items() if k not in STRUCTURAL_KEYS})}
    default = defaults()
    base_body = {k: v for k, v in base.items() if k not in STRUCTURAL_KEYS}
    explicit |= {key for key in _leaf_keys(base_body) if key in SCHEMA and _has(default, key)
                 and _lookup(base_body, key) != _lookup(default, key)}
    changed, kept = [], []
    for key, value in preset.items():
        if key in explicit:
            if _lookup(settings, key) != value:
                kept.append(f"{key} = {json.dumps(_lookup(settings, key))} (the preset's: {json.dumps(value)})")
        elif _lookup(settings, key) != value:
            settings = _set_dotted(settings, key, value)
            changed.append(key)
    return settings, changed, kept


def _take_defaults(settings: dict) -> list[str]:
    """Every setting the repository's ``Implementation.json`` (or a profile, a file extending it)
    leaves out takes its default from the typed blocks, in place (e.g. the setting of a solver
    registered after the file was written); returns those keys, which the log names."""
    default = defaults()
    taken = [key for key in SCHEMA if not _has(settings, key)]
    for key in taken:
        _set_dotted(settings, key, _lookup(default, key))
    return taken


def _has(tree: dict, dotted: str) -> bool:
    try:
        _lookup(tree, dotted)
        return True
    except SettingsError:
        return False


def _without_keys_set_in(profile: dict, later: list[dict]) -> dict:
    """``profile`` minus every leaf key that one of the ``later`` (more specific) files sets."""
    taken = {key for body in later for key in _leaf_keys({k: v for k, v in body.items() if k not in STRUCTURAL_KEYS})}
    out: dict = {}
    for key in _leaf_keys(profile):
        if key not in taken:
            _set_dotted(out, key, _lookup(profile, key))
    return out


def check_written(partial: dict, where: str) -> None:
    """Check every setting a file, profile or ``-set`` writes, where it is written (one line naming
    ``where`` on the first bad one), whatever replaces it later."""
    for key in _leaf_keys(partial):
        if key not in SCHEMA:
            continue  # check_known_keys names unknown keys
        try:
            _check_value(key, *SCHEMA[key], _lookup(partial, key))
        except SettingsError as err:
            raise SettingsError(f"{err} (in {where})") from None


# The settings' history, in one table each (the checker itself knows no key):
# keys the toolkit no longer reads, each with why (a file that still sets one is told, not ignored);
RETIRED_KEYS = {"method3.smoothness_fraction": "metasmoothness directions are Gaussian over all points "
                                               "(Definition 2); the step smoothness_step sets how far they move"}
# keys renamed (old suffix -> new suffix): still read, under the new name, and said in one line;
RENAMED_KEYS = {"method2.training_points": "method2.recursion_depth", "method2.recursion_nums": "method2.repeats",
                "lissa_deep.training_points": "lissa_deep.recursion_depth",
                "lissa_deep.recursion_nums": "lissa_deep.repeats"}
# keys whose type changed (suffix -> (the old type, what to write now)): named when the old type is found.
RETYPED_KEYS = {".damp": (bool, "damp is a number now: 0.01 is the original's value, 0 turns it off")}


def rename_keys(tree: dict, where: str) -> list[str]:
    """Move every renamed key of ``tree`` (a settings file's body, a profile, overrides) to its new
    name, in place; one line per key moved, naming ``where`` (the caller says them)."""
    said = []
    for key in _leaf_keys(tree):
        new = next((key[:-len(old)] + new for old, new in RENAMED_KEYS.items() if key.endswith(old)), None)
        if new is None or key in SCHEMA:
            continue
        value = _walk(tree, key)
        parent = _walk(tree, key.rpartition(".")[0]) if "." in key else tree
        del parent[key.rpartition(".")[2]]
        if not _has(tree, new):
            _set_dotted(tree, new, value)
        said.append(f"{where}: {key} is now {new} (read as {new}; rename it there)")
    return said
STRUCTURAL_KEYS = ("extends", "profile", "profiles", "settings_file", "profile_changed", "recipe_changed", "recipe_kept",
                   "renamed", "defaults_taken")


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
            retired = next((why for suffix, why in RETIRED_KEYS.items() if key.endswith(suffix)), None)
            if retired and key not in SCHEMA:
                raise SettingsError(f"{path}: '{where}{key}' is no longer a setting: {retired}; delete it")
            if key not in SCHEMA:
                close = difflib.get_close_matches(key, list(SCHEMA), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else "; see the README's settings table"
                raise SettingsError(f"{path}: unknown setting '{where}{key}'{hint}")


# --------------------------------------------------------------------------------------------
# validation: one schema entry per key, "a.b.c" -> (kind, extra)
# --------------------------------------------------------------------------------------------
class _LiveSchema(Mapping):
    """{"a.b.c": (kind, extra)} made from the typed blocks (options/blocks.py), made again when the
    solver registry changes (a solver registered later brings its settings)."""

    def __init__(self) -> None:
        self._made_for, self._schema = None, {}

    def _current(self) -> dict:
        if self._made_for != tuple(SOLVERS):
            self._made_for, self._schema = tuple(SOLVERS), schema()
        return self._schema

    def __getitem__(self, key: str) -> tuple:
        return self._current()[key]

    def __iter__(self):
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())


SCHEMA = _LiveSchema()


def _walk(tree: Any, dotted: str) -> Any:
    """The value at the dotted key "a.b.c" of nested dicts; KeyError when a part is missing."""
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _lookup(settings: dict, dotted: str) -> Any:
    try:
        return _walk(settings, dotted)
    except KeyError:
        raise SettingsError(f"missing setting {dotted!r} (add it to the settings file; "
                            f"see the README's settings table)") from None


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
        _check_value(key, kind, extra, _lookup(settings, key))


def _retyped_hint(key: str, value: Any) -> str:
    """" (what to write now)" when ``value`` has a type the key used to take (RETYPED_KEYS)."""
    return next((f" ({hint})" for suffix, (old, hint) in RETYPED_KEYS.items()
                 if key.endswith(suffix) and isinstance(value, old)), "")


def _check_value(key: str, kind: str, extra: Any, value: Any) -> None:
    """One setting against its kind (options.blocks): a SettingsError naming key and value if bad."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise _bad(key, value, "true or false")
    elif kind in ("int", "float"):
        ok = isinstance(value, int) if kind == "int" else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            raise _bad(key, value, f"a{'n integer' if kind == 'int' else ' number'}{_retyped_hint(key, value)}")
        low, high = extra
        if (low is not None and value < low) or (high is not None and value > high):
            raise _bad(key, value, f"a value in [{low}, {'inf' if high is None else high}]")
    elif kind == "str":
        if not isinstance(value, str) or not value:
            raise _bad(key, value, "a non-empty string")
    elif kind == "choice":
        extra = extra() if callable(extra) else extra  # a list made from the registry when checked
        if value not in extra:
            raise _bad(key, value, f"one of {list(extra)}")
    elif kind == "solver":  # the registry's names, read when checked (a solver registered later counts)
        if value not in offered_solvers(extra):
            raise _bad(key, value, f"one of {list(offered_solvers(extra))}")
    elif kind == "subset":
        extra = extra() if callable(extra) else extra
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
            return
        if not isinstance(value, list) or len(value) < 1 or any(
                isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 10000 for v in value):
            raise _bad(key, value, "n (the first n test images) or a list of test indices in [0, 9999]")
    elif kind == "float_list":
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                              or v < 0 for v in value):
            raise _bad(key, value, "a list of non-negative numbers")
    elif kind == "test_ids":
        if value in ("loss_rank", "all"):
            return
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
    side = "ffdnet" if "ffdnet_test" in os.path.abspath(sys.argv[0] if sys.argv else "") else "mnist"
    settings_help = [line for line in help_lines() if line.startswith(("  output_dir", "  threads", "  profile",
                                                                        f"  {side}."))]
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="settings (key = default: meaning):\n" + "\n".join(settings_help))
    parser.add_argument("-opt", default=DEFAULT_SETTINGS,
                        help="settings file (JSON with // comments); a relative path is taken from the "
                             "current directory")
    parser.add_argument("-profile", default=None, help="profile to apply, e.g. quick or report")
    parser.add_argument("-debug", action="store_true", help="show the traceback of an unexpected error")
    parser.add_argument("-set", action="append", default=[], metavar="KEY=VALUE",
                        help="set one setting, e.g. -set 'mnist.test_ids=[42]' (repeatable; the value is JSON, "
                             "a bare word a string; checked like the file's; wins over files and profiles)")
    args, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if unknown and not is_interactive():  # Spyder/IPython pass arguments of their own: ignored there
        import difflib
        close = difflib.get_close_matches(unknown[0], ["-opt", "-profile", "-set", "-debug"], n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else " (valid: -opt PATH, -profile NAME, -set KEY=VALUE)"
        print(f"error: unknown argument {unknown[0]}{hint}", file=sys.stderr)
        raise SystemExit(2)
    path = os.path.abspath(args.opt)  # relative to where the user typed it, not the repo
    return settings_or_exit(lambda: load_settings(path, args.profile, assignments=args.set))


DEBUG = "-debug" in sys.argv  # show tracebacks (the console gets one line otherwise)


def settings_or_exit(make: Callable[[], Any]) -> Any:
    """Run ``make``; a settings, missing-file or unreadable-file error becomes one line and exit
    status 2; any other error one line and exit status 1 (the traceback with ``-debug``)."""
    try:
        return make()
    except Exception as err:  # noqa: BLE001
        user_facing = isinstance(err, (SettingsError, MissingFileError)) or getattr(err, "one_line", False)
        if DEBUG:
            raise
        if user_facing:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        text = " ".join(str(err).split())
        print(f"error: {type(err).__name__}: {text[:300]} (run again with -debug for the traceback)",
              file=sys.stderr)
        raise SystemExit(1) from None


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
        with quiet_console():
            module.main(settings)


def solver_file_part(m2) -> str:
    """The solver part of every influence file name (MNIST and FFDNet), from a typed method2 block:
    the solver, its own settings and the damping it really applies (the registry's
    :meth:`Solver.file_part`), the L2 term and the chosen parameters. Two runs that differ in any of
    these never share a file."""
    solver = solver_for(m2.solver)
    params = "_p" + "+".join(m2.params) if m2.params else ""
    return f"{m2.solver}_{solver.file_part(solver.settings_from(m2))}{params}_l2{m2.l2_reg:g}"


def solver_run(m2, seed: int) -> SolverSettings:
    """The chosen solver's settings, read from a typed method2 block by their own names, with the
    run's seed, the progress bars and the atomic writer for K-FAC factor files."""
    return solver_for(m2.solver).settings_from(m2, seed=seed, progress=progress,
                                                save=lambda path, state: save_torch(path, state))


def solver_error(block: str, err: Exception) -> "SettingsError":
    """An influence-engine error (its words are the solver settings' names) as a one-line settings
    error naming the block they live in, e.g. "mnist.method2: LiSSA diverged ... raise the scale"."""
    return SettingsError(f"{block}: {err}")


def resolve_path(path: str) -> str:
    """Absolute path; a relative one is taken from the repository root, not the working dir."""
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(REPO_ROOT, path))


def data_path(path: str) -> str:
    """A data folder setting (mnist.data_dir): repo-relative; the default "data" goes to
    $TOOLKIT_DATA_DIR when that is set (the tests set it to a temporary folder, so that they never
    write into the clone's data/)."""
    override = os.environ.get("TOOLKIT_DATA_DIR")
    if override and os.path.normpath(path) == "data":
        return override
    return resolve_path(path)


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
        logger.info(f"device: {device} (use_gpu={use_gpu}, CUDA available: {has_cuda}, GPU: {gpu})",
                    extra={"header": True})
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
DETAIL = {"detail": True}  # logger.info(..., extra=DETAIL): the log file only, never the console
_QUIET = [0]  # > 0 while a driver runs a stage: its console shows warnings only (its log file has everything)


def detail_log(logger: logging.Logger) -> Callable[[str], None]:
    """A log function for lines the log file keeps and the console does not (a study's stages)."""
    return lambda message: logger.info(message, extra=DETAIL)


class quiet_console:
    """``with opt.quiet_console():`` the scripts run inside (a driver's stages) print warnings and
    progress bars only; their log files keep every line."""

    def __enter__(self):
        _QUIET[0] += 1

    def __exit__(self, *exc):
        _QUIET[0] -= 1
_ANNOUNCED: set = set()  # (settings file, profile, output, threads) already shown on this process's console


def start_script(settings: dict, name: str, cfg, seed: bool = True) -> tuple[logging.Logger, torch.device]:
    """The opening every script shares: its logger (:func:`make_logger`), its device from the
    network's typed block's ``use_gpu`` (logged), and, with ``seed``, python, numpy and torch seeded
    from its ``seed``."""
    logger = make_logger(settings, name)
    device = select_device(cfg.use_gpu, logger)
    if seed:
        seed_everything(cfg.seed)
    return logger, device


def make_logger(settings: dict, name: str) -> logging.Logger:
    """A logger to the console and to ``output_dir/logs/{name}_{time}.log``; logs the settings. The
    header lines (settings, profile, device) reach the console once per process and settings: a
    driver running several stages shows them once, every log file has them all."""
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
    if _QUIET[0]:
        console.setLevel(logging.WARNING)
    # the full settings (a long JSON line) go to the log file only: the console stays readable
    console.addFilter(lambda record: not record.getMessage().startswith("settings: "))
    console.addFilter(lambda record: not getattr(record, "detail", False))
    announced = (settings.get("settings_file"), settings["profile"], resolve_path(settings["output_dir"]),
                 settings["threads"], tuple(settings.get("profile_changed", [])), tuple(settings.get("recipe_kept", [])))
    if announced in _ANNOUNCED:
        console.addFilter(lambda record: not getattr(record, "header", False))
    _ANNOUNCED.add(announced)
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
                f"log file {log_file}", extra={"header": True})
    changed = settings.get("profile_changed", [])
    if changed:
        shown_keys = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        logger.info(f"profile {settings['profile']} set {shown_keys}", extra={"header": True})
    if settings.get("recipe_changed") or settings.get("recipe_kept"):
        recipe = settings["mnist"]["recipe"]
        logger.info(f"mnist.recipe {recipe} set {', '.join(settings['recipe_changed']) or 'nothing'}"
                    + (f"; kept your {'; '.join(settings['recipe_kept'])}" if settings["recipe_kept"] else ""),
                    extra={"header": True})
    for line in settings.get("renamed", []):
        logger.info(line, extra={"header": True})
    if settings.get("defaults_taken"):
        taken = settings["defaults_taken"]
        logger.info(f"{settings['settings_file']} leaves out {', '.join(taken[:6])}"
                    + (f" and {len(taken) - 6} more" if len(taken) > 6 else "") + ": their defaults are used "
                    "(python3 <script> -h lists them)", extra={"header": True})
    shown = {k: v for k, v in settings.items() if k not in ("profiles",)}
    logger.info("settings: " + json.dumps(shown, sort_keys=True))
    return logger


# --------------------------------------------------------------------------------------------
# result files
# --------------------------------------------------------------------------------------------
def _announce_replace(path: str, logger: logging.Logger | None) -> None:
    if os.path.exists(path) and logger is not None:
        logger.info(f"replacing the earlier result {path} (same settings)", extra=DETAIL)


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


def markdown_table(header: list[str], rows: list[list], float_format: str = ".3g") -> str:
    """The one Markdown table writer: a header and rows of cells (floats formatted by ``float_format``,
    everything else by str; a cell's own line breaks become spaces)."""
    def cell(value: Any) -> str:
        text = f"{value:{float_format}}" if isinstance(value, float) else str(value)
        return " ".join(text.split("\n"))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


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


class UnreadableFileError(SettingsError):
    """An input that exists but cannot be read (truncated, corrupt, foreign). One line for the user."""


def read_json(path: str, made_by: str, shape: tuple[str, ...] = ()) -> Any:
    """Read a JSON result, with a one-line error naming the script that writes it (missing), saying
    what to do (truncated or corrupt), or naming the first of the dotted keys of ``shape`` that a
    well-formed file of another shape lacks."""
    with open(require_file(path, made_by), encoding="utf-8") as f:
        try:
            record = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UnreadableFileError(f"{path} is not readable JSON ({type(err).__name__}: truncated or corrupt): "
                                      f"delete it and run {made_by} again") from None
    return require_shape(record, path, made_by, shape)


def require_shape(record: Any, path: str, made_by: str, shape: tuple[str, ...]) -> Any:
    """``record`` (read from ``path``), refused in one line naming the first of the dotted keys of
    ``shape`` it lacks: a well-formed file of another shape."""
    for dotted in shape:
        try:
            _walk(record, dotted)
        except KeyError:
            raise UnreadableFileError(f"{path} is not a result of {made_by} (it has no '{dotted}'): delete it "
                                      f"and run {made_by} again") from None
    return record


def load_torch(path: str, made_by: str, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    """``torch.load`` of an input file, with a one-line error naming the file and what to do when it
    is missing, truncated, corrupt or not a torch file."""
    require_file(path, made_by)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as err:  # noqa: BLE001  (every way a file can be unreadable)
        raise UnreadableFileError(f"{path} is not a readable torch file ({type(err).__name__}: truncated, corrupt "
                                  f"or foreign): delete it and run {made_by} again") from None


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
