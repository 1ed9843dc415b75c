"""What a solver reads: its own settings, declared on its class, and what a run hands it beside them.

A solver declares its settings as a dataclass nested in its class (``Solver.Settings``), each field
made by :func:`setting`: its default, one help line, its kind and the kind's range or choices. The
settings floor above (``options/``) builds each network's Method-2 block from these fields, so the
block's keys are the solver's own names: no adapter renames them, and a solver registered later
brings its settings with it (the check, ``-h``, the file name part and the LDS rows read them).

Fields marked ``run=True`` (:func:`run_value`) are not settings: the run hands them in (the seed,
the factor file, TracIn's checkpoints, the progress factory, the writer).

Kinds of value (checked by ``options.check``): bool, int and float (a [low, high] range, None =
open), str, choice (one of), solver (a registered name a network offers), subset (a non-empty list
drawn from), one_or_list, str_list, int_list, float_list, range ([low, high]), points ([[row, col],
...]), path_or_empty, test_ids, lds_test_ids.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any, Callable


def setting(default: Any, help: str, kind: str, extra: Any = None, scores: bool = True):  # noqa: A002
    """A setting: its default, one help line, and its kind with the kind's extra (range or choices).
    ``scores=False`` marks a setting that does not change a method's scores (a file name, a list
    length, a memory bound, a check): the trust table's match leaves it out."""
    metadata = {"help": help, "kind": kind, "extra": extra, "scores": scores}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def run_value(default: Any = None):
    """A value the run hands a solver (not a setting: no key in a settings file)."""
    return field(default=default, metadata={"run": True})


def is_setting(f) -> bool:
    """Whether a dataclass field is a setting (not a run value)."""
    return not f.metadata.get("run", False)


@dataclass
class SolverSettings:
    """What every solver reads: the damping, the sweep's chunk, and the run's values."""
    damp: float = setting(0.01, "damping lambda: cg, exact and arnoldi solve (H + damp I); LiSSA's recursion "
                                "applies damp x scale", 'float', (0.0, None))
    chunk_size: int = setting(10000, "training points per chunk of the influence sweep (memory bound)", 'int',
                              (1, None))
    solver: str = run_value("")             # the registered name (set by Solver.settings_from)
    seed: int = run_value(0)                # sampled batches, the true Fisher's labels, projections
    factor_file: str = run_value("")        # kfac/ekfac: read/write the factors here ("" = recompute)
    checkpoints: list | None = run_value()  # tracin: [(InfluenceProblem at a checkpoint, its learning rate)]
    progress: Callable | None = run_value()  # a tqdm-like factory for the long passes (None = silent)
    save: Callable[[str, object], object] | None = run_value()  # writes a factor file (path, state); None = torch.save

    @classmethod
    def setting_fields(cls) -> list:
        """The fields that are settings (keys of the Method-2 block), in declaration order."""
        return [f for f in fields(cls) if is_setting(f)]
