"""One small check per kind of setting (the kinds a field's ``setting(...)`` names; influence/settings.py).

``check_value(key, kind, extra, value)`` raises a one-line :class:`SettingsError` naming the key, its
value and what it expects. The checks know no key: the settings' history (retyped keys) is a table
the caller passes in (options/loading.py).
"""
from __future__ import annotations

import json
from typing import Any, Callable

from options.base import SettingsError


def bad(key: str, value: Any, expected: str) -> SettingsError:
    return SettingsError(f"bad setting {key} = {json.dumps(value)}: expected {expected}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _choices(extra: Any) -> tuple:
    return tuple(extra() if callable(extra) else extra)  # a list made from the registry when checked


def _bool(key, value, extra, hint):
    if not isinstance(value, bool):
        raise bad(key, value, "true or false")


def _ranged(kind: str) -> Callable:
    def check(key, value, extra, hint):
        if not (_is_int(value) if kind == "int" else _is_number(value)):
            raise bad(key, value, f"a{'n integer' if kind == 'int' else ' number'}{hint}")
        low, high = extra
        if (low is not None and value < low) or (high is not None and value > high):
            raise bad(key, value, f"a value in [{low}, {'inf' if high is None else high}]")
    return check


def _str(key, value, extra, hint):
    if not isinstance(value, str) or not value:
        raise bad(key, value, "a non-empty string")


def _choice(key, value, extra, hint):
    if value not in _choices(extra):
        raise bad(key, value, f"one of {list(_choices(extra))}")


def _solver(key, value, extra, hint):  # the registry's names a network offers, read when checked
    from options.method2 import offered_solvers
    if value not in offered_solvers(extra):
        raise bad(key, value, f"one of {list(offered_solvers(extra))}")


def _subset(key, value, extra, hint):
    if not isinstance(value, list) or not value or any(v not in _choices(extra) for v in value):
        raise bad(key, value, f"a non-empty list drawn from {list(_choices(extra))}")


def _one_or_list(key, value, extra, hint):
    values = value if isinstance(value, list) else [value]
    if not values or any(v not in extra for v in values):
        raise bad(key, value, f"one of {list(extra)} or a list of them")


def _str_list(key, value, extra, hint):
    if not isinstance(value, list) or any(not isinstance(v, str) for v in value):
        raise bad(key, value, "a list of parameter-name prefixes ([] = all parameters)")


def _range(key, value, extra, hint):
    if (not isinstance(value, list) or len(value) != 2 or not all(_is_number(v) for v in value)
            or not extra[0] <= value[0] <= value[1] <= extra[1]):
        raise bad(key, value, f"[low, high] with {extra[0]} <= low <= high <= {extra[1]}")


def _int_list(key, value, extra, hint):
    if not isinstance(value, list) or any(not _is_int(v) or v < 0 for v in value):
        raise bad(key, value, "a list of non-negative integers")


def _float_list(key, value, extra, hint):
    if not isinstance(value, list) or any(not _is_number(v) or v < 0 for v in value):
        raise bad(key, value, "a list of non-negative numbers")


def _path_or_empty(key, value, extra, hint):
    if not isinstance(value, str):
        raise bad(key, value, 'a path string ("" for none)')


def _points(key, value, extra, hint):
    if not isinstance(value, list) or not value or any(
            not isinstance(p, list) or len(p) != 2 or any(not _is_int(v) or v < 0 for v in p) for p in value):
        raise bad(key, value, "a list of [row, col] pixel positions")


def _test_index_list(value) -> bool:
    return isinstance(value, list) and len(value) >= 1 and all(_is_int(v) and 0 <= v < 10000 for v in value)


def _lds_test_ids(key, value, extra, hint):
    if not (_is_int(value) and 1 <= value <= 10000) and not _test_index_list(value):
        raise bad(key, value, "n (the first n test images) or a list of test indices in [0, 9999]")


def _test_ids(key, value, extra, hint):
    if value not in ("loss_rank", "all") and not _test_index_list(value):
        raise bad(key, value, '"loss_rank", "all" or a list of test indices in [0, 9999]')


CHECKS: dict[str, Callable] = {
    "bool": _bool, "int": _ranged("int"), "float": _ranged("float"), "str": _str, "choice": _choice,
    "solver": _solver, "subset": _subset, "one_or_list": _one_or_list, "str_list": _str_list, "range": _range,
    "int_list": _int_list, "float_list": _float_list, "path_or_empty": _path_or_empty, "points": _points,
    "lds_test_ids": _lds_test_ids, "test_ids": _test_ids,
}


def check_value(key: str, kind: str, extra: Any, value: Any, hint: str = "") -> None:
    """One setting against its kind: a SettingsError naming key and value if bad. ``hint`` (e.g. what
    a retyped key takes now) is added to a type error."""
    CHECKS[kind](key, value, extra, hint)
