"""Result files: the one atomic writer and what writes through it (JSON, CSV, text, torch, figures),
reading inputs with one-line errors, and the small tools every script shares (progress bars, timers).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Callable, Iterable

import numpy as np
import torch

from options.base import MissingFileError, UnreadableFileError

DETAIL = {"detail": True}  # logger.info(..., extra=DETAIL): the log file only, never the console


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


def require_file(path: str, made_by: str) -> str:
    """Return ``path`` if it exists, else raise a one-line error naming the script that makes it."""
    if not os.path.isfile(path):
        raise MissingFileError(f"missing file {path}: run {made_by} first with the same settings")
    return path


def require_shape(record: Any, path: str, made_by: str, shape: tuple[str, ...]) -> Any:
    """``record`` (read from ``path``), refused in one line naming the first of the dotted keys of
    ``shape`` it lacks: a well-formed file of another shape."""
    for dotted in shape:
        try:
            node = record
            for part in dotted.split("."):
                node = node[part]
        except (KeyError, TypeError, IndexError):
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


def key_differences(wanted: dict, found: dict) -> list[str]:
    """The dotted keys in which two trust keys ({part: {key: value}}) differ, each with both values
    (this run's first): why a measured number is not quoted for this run."""
    out = []
    for part in sorted(set(wanted) | set(found)):
        mine, theirs = wanted.get(part, {}), found.get(part, {})
        if not isinstance(mine, dict) or not isinstance(theirs, dict):
            if mine != theirs:
                out.append(f"{part} ({mine!r} here, {theirs!r} measured)")
            continue
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                out.append(f"{part}.{key} ({mine.get(key)!r} here, {theirs.get(key)!r} measured)")
    return out
