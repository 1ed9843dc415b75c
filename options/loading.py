"""Loading the settings: read the file and the files it extends, apply the profile, the recipe preset,
``overrides`` and ``-set``, check every value where it is written, and hand back one typed
:class:`options.blocks.Settings` (the only settings object the scripts see).

Variants of loaded settings are made with :func:`with_values` (``dataclasses.replace`` on the
blocks, checking only what changes); result metas and study hashes read :func:`as_dict` of a block.
The settings' history (retired, renamed and retyped keys) is three tables here.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from influence.solvers import SOLVERS
from options.base import DEFAULT_SETTINGS, MissingFileError, SettingsError, resolve_path
from options.blocks import Loaded, Settings, defaults, schema, typed
from options.recipe import preset_values
from options.check import check_value


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
    key = renamed_key(key) or key
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
                  overrides: dict | None = None, assignments: list[str] | None = None) -> Settings:
    """The checked settings as one typed :class:`Settings` (:func:`load_settings_dict`), what loading
    found beside the values in its ``source``."""
    checked = load_settings_dict(path, profile, overrides, assignments)
    settings = typed(checked)
    settings.source = Loaded(**{f.name: checked[f.name] for f in dataclasses.fields(Loaded)})
    return settings


def load_settings_dict(path: str | None = None, profile: str | None = None,
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
                                f"extends: add \"extends\": \"Implementation.json\" (as settings/shared.json does)"
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
    for assignment in assignments or []:  # -set of a renamed key: read under its new name (parse_assignment), said
        key = assignment.partition("=")[0].strip()
        new = renamed_key(key)
        if new is not None and key not in SCHEMA:
            renamed.append(f"-set: {key} is now {new} (read as {new})")
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
    """The presets of ``mnist.recipe`` and ``ffdnet.recipe`` (options/recipe.py) over ``settings``: each of their keys takes
    the preset's value unless the user set that key: a layer in ``written`` (a file that extends the
    base, a profile, overrides, -set) writes it, or the base file holds another value than the
    default. Returns (settings, keys the preset set, "key = yours (the preset's: value)" kept)."""
    preset = {}
    for network in ("mnist", "ffdnet"):
        name = _lookup(settings, f"{network}.recipe") if "recipe" in settings.get(network, {}) else "report"
        preset.update(preset_values(name, network))
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
    taken = [key for key in SCHEMA if key not in STRUCTURAL_KEYS and not _has(settings, key)]
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
            value = _lookup(partial, key)
            check_value(key, *SCHEMA[key], value, _retyped_hint(key, value))
        except SettingsError as err:
            raise SettingsError(f"{err} (in {where})") from None


# The settings' history, in one table each (the checker itself knows no key):
# keys the toolkit no longer reads, each with why (a file that still sets one is told, not ignored);
RETIRED_KEYS = {"method3.smoothness_fraction": "metasmoothness directions are Gaussian over all points "
                                               "(Definition 2); the step smoothness_step sets how far they move"}
# keys renamed (old suffix -> new suffix): still read, under the new name, and said in one line;
RENAMED_KEYS = {"method2.training_points": "method2.recursion_depth", "method2.recursion_nums": "method2.repeats",
                "method3.window": "window", "method3.window_unit": "window_unit",  # the run's, not Method 3's
                "lissa_deep.training_points": "lissa_deep.recursion_depth",
                "lissa_deep.recursion_nums": "lissa_deep.repeats"}
# keys whose type changed (suffix -> (the old type, what to write now)): named when the old type is found.
RETYPED_KEYS = {".damp": (bool, "damp is a number now: 0.01 is the original's value, 0 turns it off")}


def renamed_key(key: str) -> str | None:
    """The new name of a dotted key that RENAMED_KEYS renames (by its suffix), else None."""
    return next((key[:-len(old)] + new for old, new in RENAMED_KEYS.items() if key.endswith(old)), None)


def rename_keys(tree: dict, where: str) -> list[str]:
    """Move every renamed key of ``tree`` (a settings file's body, a profile, overrides) to its new
    name, in place; one line per key moved, naming ``where`` (the caller says them)."""
    said = []
    for key in _leaf_keys(tree):
        new = renamed_key(key)
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


def validate(settings: dict, schema: Mapping[str, tuple]) -> None:
    """Check every schema key of a settings dict; raise :class:`SettingsError` with one line on the
    first problem."""
    for key, (kind, extra) in schema.items():
        value = _lookup(settings, key)
        check_value(key, kind, extra, value, _retyped_hint(key, value))
    mnist = settings.get("mnist", {})
    _check_together(mnist.get("test_ids"), mnist.get("test_num", 1), mnist.get("test_rank_step", 1))


def _check_together(test_ids: Any, test_num: int, test_rank_step: int) -> None:
    """The one rule across keys: the loss ranks asked for exist."""
    if test_ids == "loss_rank" and (test_num - 1) * test_rank_step >= 10000:
        raise SettingsError(f"bad settings mnist.test_num = {test_num} with mnist.test_rank_step = "
                            f"{test_rank_step}: rank {(test_num - 1) * test_rank_step} "
                            f"is beyond the 10,000 test images (lower one of them)")


def _retyped_hint(key: str, value: Any) -> str:
    """" (what to write now)" when ``value`` has a type the key used to take (RETYPED_KEYS)."""
    return next((f" ({hint})" for suffix, (old, hint) in RETYPED_KEYS.items()
                 if key.endswith(suffix) and isinstance(value, old)), "")


# --------------------------------------------------------------------------------------------
# the typed settings: variants, plain dicts, dotted reads
# --------------------------------------------------------------------------------------------
def with_values(settings: Any, changes: dict, where: str = "overrides") -> Any:
    """``settings`` (a typed block, or the whole :class:`Settings`) with the nested ``changes``
    ({"mnist": {"method2": {"solver": "cg"}}}) made by ``dataclasses.replace``: only the changed keys
    are checked (one line naming ``where`` on a bad one), and renamed keys are read as their new names."""
    changes = copy.deepcopy(changes)
    rename_keys(changes, where)
    if isinstance(settings, Settings):
        check_written(changes, where)
    new = _replaced(settings, changes, where)
    if isinstance(new, Settings):
        _check_together(new.mnist.test_ids, new.mnist.test_num, new.mnist.test_rank_step)
    return new


def _replaced(block: Any, changes: dict, where: str) -> Any:
    names = {f.name for f in dataclasses.fields(block)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise SettingsError(f"unknown setting {unknown[0]!r} in {where} (the script's -h lists them)")
    values = {}
    for name, value in changes.items():
        current = getattr(block, name)
        values[name] = (_replaced(current, value, where) if dataclasses.is_dataclass(current) and isinstance(value, dict)
                        else value)
    return dataclasses.replace(block, **values)


def as_dict(block: Any) -> dict:
    """A typed block's settings as a plain nested dict, as a settings file holds them (result metas and
    study hashes read this; what loading found beside the values is left out)."""
    return {f.name: as_dict(getattr(block, f.name)) if dataclasses.is_dataclass(getattr(block, f.name))
            else copy.deepcopy(getattr(block, f.name)) for f in dataclasses.fields(block) if not f.metadata.get("run")}


def value_at(settings: Any, dotted: str) -> Any:
    """The value at a dotted key ("mnist.method2.solver") of typed settings or of a settings dict."""
    node = settings
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


