"""The Method-2 blocks, made from the solver registry: the registry is the only list of solvers.

Each network's ``method2`` block is its own fields (the solver's name, which parameters, the
script's options) plus every setting of every solver that network offers, under the solver's own
names, with the solver's default and help unless the network changes them here. A solver registered
later (one class, as docs/methods.md shows) brings its settings into the block, the check, ``-h``
and ldsTest's rows with nothing else touched.

What is network knowledge lives here, not in the engine: the loss each network's attribution
differentiates (its task), the solvers it does not offer and why, and the defaults it changes.
"""
from __future__ import annotations

import copy
from dataclasses import MISSING, Field, dataclass, field, fields, make_dataclass

from influence.settings import SolverSettings
from influence.settings import setting as spec
from influence.solvers import SOLVERS, solver_for


@dataclass
class MnistMethod2Own:
    """Method 2 on the MNIST MLP: influence functions and their baselines (m2_Test.py)."""
    solver: str = spec('lissa', "the Method-2 solver (python3 mnist_test/m2_Test.py -h lists them)", 'solver', 'mnist')
    mode: str = spec('staTest0', "which model (same naming as method1.mode)", 'str', None)
    params: list[str] = spec([], "parameter-name prefixes to take influence over ([] = all), e.g. [\"main.4\"]",
                             'str_list', None)
    l2_reg: float = spec(0.001, "L2 term in the Hessian (the training weight decay)", 'float', (0.0, None))
    test_sample_num: int = spec(10, "how many of the selected test images get influences", 'int', (1, 10000))
    save_matrix: str = spec('none', "test_ids \"all\": also write the full influence matrix as .npy (none | float16"
                                    " | float32)", 'choice', ('none', 'float16', 'float32'))
    self_influence: bool = spec(False, "test_ids \"all\": also the self-influence of every training image "
                                       "(kfac/ekfac/identity)", 'bool', None)
    test_chunk: int = spec(1000, "test_ids \"all\": test images per streamed chunk (memory bound)", 'int', (1, 10000))
    write_unconverged: bool = spec(False, "cg: a solve whose relative residual stays above 1e-2 is refused unless "
                                          "true (always flagged in meta)", 'bool', None)
    top_k: int = spec(100, "length of the helpful / harmful lists", 'int', (1, 60000))
    if_dir: str = spec('if', "sub-folder of output_dir for influence files", 'str', None)


@dataclass
class FfdnetMethod2Own:
    """Method 2 on the denoiser (pixel-window influence)."""
    solver: str = spec('lissa', "the Method-2 solver (python3 ffdnet_test/m2_Test.py -h lists them; the "
                                "report's is the default)", 'solver', 'ffdnet')
    params: list[str] = spec([], "parameter-name prefixes ([] = all), e.g. [\"main.38\", \"main.41\"]", 'str_list', None)
    l2_reg: float = spec(0.0, "the training weight decay, as an L2 term in the Hessian", 'float', (0.0, None))
    top_k: int = spec(100, "length of the helpful / harmful lists", 'int', (1, None))
    max_train_points: int = spec(5000, "influence over the first n training patches (0 = all)", 'int', (0, None))
    window: int = spec(1, "pixel-level loss: a window of (2*window+1)^2 pixels around the point", 'int', (0, 64))


@dataclass(frozen=True)
class NetworkSolvers:
    """What a network's Method-2 block is made of: its own fields, the loss its attribution
    differentiates (a solver's ``tasks``), the solvers it does not offer (name: why), and the solver
    settings whose default or help it changes (name: a ``spec`` field)."""
    own: type
    task: str
    not_offered: dict
    changed: dict


NETWORKS = {
    "mnist": NetworkSolvers(MnistMethod2Own, "classification", {}, {}),
    "ffdnet": NetworkSolvers(
        FfdnetMethod2Own, "regression",
        {"arnoldi": "a Lanczos step is a full-data HVP of the denoiser (too slow to offer)",
         "tracin": "FFDNet_Train.py keeps no TracIn checkpoints"},
        {"recursion_depth": spec(100, "LiSSA t: recursion depth", 'int', (1, None)),
         "repeats": spec(1, "LiSSA r: independent chains, averaged", 'int', (1, None)),
         "cg_tol": spec(0.0001, "cg: CG stops at this relative residual", 'float', (0.0, None)),
         "cg_max_iter": spec(50, "cg: the most iterations", 'int', (1, None)),
         "chunk_size": spec(64, "patches per chunk of the influence sweep (memory bound)", 'int', (1, None)),
         "fisher": spec('empirical', "kfac/ekfac: empirical (the training targets; a denoiser has no label to "
                                     "sample)", 'choice', ('empirical',))}),
}


def offered_solvers(network: str) -> tuple[str, ...]:
    """The registered solvers a network offers, in registration order: those for its task, less the
    ones it lists as not offered."""
    spec_ = NETWORKS[network]
    return tuple(name for name, solver in SOLVERS.items()
                 if spec_.task in solver.tasks and name not in spec_.not_offered)


def _copy(f: Field) -> Field:
    """A fresh field with ``f``'s default and metadata (a dataclass field belongs to one class)."""
    if f.default_factory is not MISSING:
        default = f.default_factory()
        return field(default_factory=lambda: copy.deepcopy(default), metadata=f.metadata)
    return field(default=f.default, metadata=f.metadata)


_CLASSES: dict[tuple, type] = {}


def method2_class(network: str) -> type:
    """The network's Method-2 block: its own fields, then each offered solver's settings (the first
    declaration of a name wins; the network's changes replace default and help). Made again when
    the registry changes, so a solver registered later counts."""
    key = (network, tuple(SOLVERS))
    if key not in _CLASSES:
        spec_ = NETWORKS[network]
        taken = {f.name for f in fields(spec_.own)}
        extra = []
        for name in offered_solvers(network):
            for f in SOLVERS[name].Settings.setting_fields():
                if f.name not in taken:
                    taken.add(f.name)
                    extra.append((f.name, f.type, _copy(spec_.changed.get(f.name, f))))
        class_name = spec_.own.__name__.replace("Own", "")
        made = make_dataclass(class_name, extra, bases=(spec_.own,))
        made.__doc__ = spec_.own.__doc__
        _CLASSES[key] = made
    return _CLASSES[key]


# ldsTest's rows beside the solvers': Method 1's four, the deeper LiSSA and the per-damping CG rows (the
# study's variants of those solvers), the gradient cosine, the ensembles over base models, Method 3
METHOD1_ROWS = ("m1_batch_raw", "m1_batch_normalized", "m1_per_sample_raw", "m1_per_sample_normalized")
STUDY_ROWS = {"lissa": "if_lissa_deep", "cg": "if_cg", "identity": "grad_cos"}  # solver -> the study's row beside it
ENSEMBLE_ROWS = ("ensemble_m1_batch_raw", "ensemble_if_ekfac", "ensemble_if_kfac_factored", "ensemble_grad_dot",
                 "ensemble_trak")


def lds_methods() -> tuple[str, ...]:
    """Every attribution ldsTest can score (mnist.lds.methods): Method 1's rows, each solver the MNIST
    side offers with an LDS row (:attr:`Solver.lds_name`) and the study's rows beside it, the
    ensembles of the rows registered, and Method 3's replay."""
    rows = list(METHOD1_ROWS)
    for name in offered_solvers("mnist"):
        solver = SOLVERS[name]
        rows += [solver.lds_name] if solver.lds_row else []
        rows += [STUDY_ROWS[name]] if name in STUDY_ROWS else []
    rows += [row for row in ENSEMBLE_ROWS if row[len("ensemble_"):] in rows]
    return tuple(rows + ["m3_replay"])


def solver_file_part(m2, solver=None) -> str:
    """The solver part of every influence file name (MNIST and FFDNet), from a typed method2 block:
    the solver, its own settings and the damping it really applies (the registry's
    :meth:`Solver.file_part`), the L2 term and the chosen parameters. Two runs that differ in any of
    these never share a file. ``solver``: the registry's solver of ``m2.solver`` when the caller has it."""
    solver = solver or solver_for(m2.solver)
    params = "_p" + "+".join(m2.params) if m2.params else ""
    return f"{m2.solver}_{solver.file_part(solver.settings_from(m2))}{params}_l2{m2.l2_reg:g}"


def solver_run(m2, seed: int):
    """(the chosen solver, its settings read from a typed method2 block by their own names, with the
    run's seed, the progress bars and the atomic writer for K-FAC factor files)."""
    from options.results import progress, save_torch
    solver = solver_for(m2.solver)
    return solver, solver.settings_from(m2, seed=seed, progress=progress, save=lambda path, state: save_torch(path, state))
