"""The Method-2 solver registry: every solver is one small class that owns its name, the part of a
result file name that its settings make, the damping it really applies, and how it attributes.

    influence(t, i) = grad L(t)^T (H + lambda I)^-1 grad L(z_i)      (positive = z_i helped t)

A solver that approximates (H + lambda I)^-1 overrides :meth:`Solver.inverse_hvp`; one that scores
pairs another way (TRAK's kernel, TracIn's sum over checkpoints) overrides :meth:`Solver.attribute`.
A solver's own settings are a dataclass nested in its class (``Settings``, fields made by
:func:`influence.settings.setting`): the settings floor builds each network's Method-2 block from
them. The settings check, the file names, the ``-h`` text and the LDS rows all read :data:`SOLVERS`;
adding a solver is one subclass with the :func:`register` decorator (docs/methods.md shows it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from influence.kronecker import KroneckerCurvature
from influence.krylov import arnoldi_inverse_hvp, conjugate_gradient, exact_inverse_hvp, hessian_subset
from influence.lissa import LissaSettings, lissa
from influence.losses import SampleLoss
from influence.problem import InfluenceProblem
from influence.settings import SolverSettings, setting
from influence.sweep import influence_sweep
from influence.tracin import sample_grad_sq_norms, tracin, tracin_self_influence
from influence.trak import Trak


class Solver:
    """One way to attribute. ``name`` is the settings value; ``summary`` one line for ``-h`` and the
    docs; ``Settings`` its own settings (a subclass of :class:`SolverSettings`); ``tasks`` the losses
    it applies to (classification, regression); ``all_pairs``: fast enough to stream every test x
    training pair (m2_Test with test_ids "all", self-influence); ``kronecker``: reads and writes
    factor files; ``slow_per_test``: its cost grows with the number of test points (HVP-based: LDS
    runs it on the first few test images only); ``needs_checkpoints``: reads the training run's
    checkpoints; ``lds_row``: ldsTest scores it under :attr:`lds_name`."""
    name = ""
    summary = ""
    Settings: type[SolverSettings] = SolverSettings
    tasks: tuple[str, ...] = ("classification", "regression")
    lds_row = True
    all_pairs = False
    kronecker = False
    slow_per_test = False
    needs_checkpoints = False

    @property
    def lds_name(self) -> str:
        """The ldsTest row that scores this solver."""
        return f"if_{self.name}"

    def settings_from(self, block, **run) -> SolverSettings:
        """Its settings read from a Method-2 block by their own names (the block holds every field of
        :attr:`Settings`: the settings floor builds it from them), with the run's values added."""
        own = {f.name: getattr(block, f.name) for f in self.Settings.setting_fields()}
        return self.Settings(**own, solver=self.name, **run)

    def file_part(self, cfg: SolverSettings) -> str:
        """What of the settings changes the result (the damping it applies included), for file names."""
        return "nohess"

    def effective_damping(self, cfg: SolverSettings) -> float | str:
        return cfg.damp

    def inverse_hvp(self, problem: InfluenceProblem, vectors: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    cfg: SolverSettings, info: dict, show_progress: bool = True) -> torch.Tensor:
        """(H + lambda I)^-1 v for (k, p) vectors; solver details go into ``info``."""
        raise ValueError(f"solver {self.name!r} scores pairs without an inverse-HVP: it cannot solve for "
                         f"given vectors (choose one of {', '.join(n for n, s in SOLVERS.items() if s.solves)})")

    def s_test(self, problem: InfluenceProblem, vectors: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               cfg: SolverSettings, show_progress: bool = True) -> tuple[torch.Tensor, dict]:
        """s = (H + lambda I)^-1 v for (k, p) vectors, and an info dict (the damping it applies, whether
        it converged, the solver's own details)."""
        info: dict = {"solver": self.name, "effective_damping": self.effective_damping(cfg), "converged": True}
        return self.inverse_hvp(problem, vectors, x, y, cfg, info, show_progress), info

    def influences(self, problem: InfluenceProblem, test_grads: torch.Tensor, x_train: torch.Tensor,
                   y_train: torch.Tensor, cfg: SolverSettings, show_progress: bool = True) -> tuple[torch.Tensor, dict]:
        """influence (k, n_train) for k given test-loss gradients (rows may come from different test
        losses): one inverse-HVP solve for all rows, then one chunked sweep."""
        t1 = time.perf_counter()
        s_test, info = self.s_test(problem, test_grads, x_train, y_train, cfg, show_progress)
        t2 = time.perf_counter()
        influence = influence_sweep(problem, s_test, x_train, y_train, cfg.chunk_size, show_progress,
                                    progress=cfg.progress)
        t3 = time.perf_counter()
        info.update(num_params=problem.num_params, n_train=len(x_train),
                    seconds_s_test=round(t2 - t1, 3), seconds_sweep=round(t3 - t2, 3))
        return influence, info

    @property
    def solves(self) -> bool:
        return type(self).inverse_hvp is not Solver.inverse_hvp

    def attribute(self, problem: InfluenceProblem, x_test: torch.Tensor, y_test: torch.Tensor,
                  x_train: torch.Tensor, y_train: torch.Tensor, cfg: SolverSettings, show_progress: bool = True,
                  test_loss: SampleLoss | None = None) -> tuple[torch.Tensor, dict]:
        """influence (k, n_train) of every training point on each of k test points, and an info dict:
        one (k, p) matrix of test gradients, one solve for all of them, one chunked sweep."""
        t0 = time.perf_counter()
        test_grads = problem.sample_grads(x_test, y_test, loss=test_loss)
        influence, info = self.influences(problem, test_grads, x_train, y_train, cfg, show_progress)
        info["seconds_test_grads"] = round(time.perf_counter() - t0 - info["seconds_s_test"]
                                           - info["seconds_sweep"], 3)
        return influence, info

    def chunks(self, problem: InfluenceProblem, x_test: torch.Tensor, y_test: torch.Tensor, x_train: torch.Tensor,
               y_train: torch.Tensor, cfg: SolverSettings, test_chunk: int, log: Callable[[str], None]
               ) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, (k, n)) for consecutive chunks of ``test_chunk`` test points."""
        for start in range(0, len(x_test), test_chunk):
            grads = problem.sample_grads(x_test[start:start + test_chunk], y_test[start:start + test_chunk])
            s_test = self.inverse_hvp(problem, grads, x_train, y_train, cfg, {}, show_progress=False)
            yield start, influence_sweep(problem, s_test, x_train, y_train, cfg.chunk_size, show_progress=False)

    def self_influence(self, problem: InfluenceProblem, x: torch.Tensor, y: torch.Tensor, cfg: SolverSettings,
                       log: Callable[[str], None]) -> torch.Tensor:
        """Each training point's influence on its own loss, (n,)."""
        raise ValueError(f"solver {self.name!r} has no fast self-influence (choose one of "
                         f"{', '.join(n for n, s in SOLVERS.items() if type(s).self_influence is not Solver.self_influence)})")


SOLVERS: dict[str, Solver] = {}


def register(cls: type[Solver]) -> type[Solver]:
    """Add a solver class to :data:`SOLVERS` under its name (a class decorator)."""
    SOLVERS[cls.name] = cls()
    return cls


def solver_for(name: str) -> Solver:
    """The registered solver called ``name``, or a ValueError listing the valid names."""
    if name not in SOLVERS:
        raise ValueError(f"solver {name!r}: valid choices are {', '.join(SOLVERS)}")
    return SOLVERS[name]


def solver_names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(SOLVERS)


def solver_help(names: tuple[str, ...] | None = None) -> str:
    """One line per solver (``names``, default all), for ``-h`` texts and the docs."""
    return "\n".join(f"  {n:<14} {SOLVERS[n].summary}" for n in (names or solver_names()))


def solver_config(name: str, **values) -> SolverSettings:
    """A solver's settings by keyword (its defaults for the rest): ``solver_config("lissa", repeats=2)``."""
    solver = solver_for(name)
    return solver.Settings(solver=name, **values)


# ---- the solvers ------------------------------------------------------------------------------
@register
class Lissa(Solver):
    """LiSSA (Agarwal et al. 2017): h_j = v + (1 - damp) h_{j-1} - H_j h_{j-1} / scale on sampled
    batches, s = h_t / scale; its fixed point is (H + damp*scale I)^-1 v (see :func:`influence.lissa.lissa`)."""
    name = "lissa"
    summary = "LiSSA, the report's: a damped, scaled Neumann recursion on sampled batches (damp x scale)"
    slow_per_test = True

    Settings = LissaSettings  # its settings live beside the recursion (influence/lissa.py)

    def file_part(self, cfg):
        return (f"t{cfg.recursion_depth}r{cfg.repeats}b{cfg.batch}d{cfg.damp:g}sc{cfg.scale:g}"
                f"_lam{cfg.damp * cfg.scale:g}")

    def effective_damping(self, cfg):
        return cfg.damp * cfg.scale

    def inverse_hvp(self, problem, vectors, x, y, cfg, info, show_progress=True):
        return lissa(problem, vectors, x, y, cfg, show_progress, info)


class HessianSolver(Solver):
    """A solver on exact HVPs of the training objective over ``hessian_points`` training points."""

    @dataclass
    class Settings(SolverSettings):
        hessian_points: int = setting(0, "cg/exact/arnoldi: training points in the Hessian (0 = all)", 'int',
                                      (0, None))

    def inverse_hvp(self, problem, vectors, x, y, cfg, info, show_progress=True):
        xh, yh = hessian_subset(x, y, cfg.hessian_points, cfg.seed)
        info["hessian_points"] = len(xh)
        return self.solve(problem, vectors, xh, yh, cfg, info)

    def solve(self, problem, vectors, x, y, cfg, info) -> torch.Tensor:
        raise NotImplementedError


@register
class ConjugateGradient(HessianSolver):
    """CG on (H + damp I) s = v with exact full-data HVPs; flags a residual above cg_tol."""
    name = "cg"
    summary = "conjugate gradient on exact HVPs, (H + damp I)^-1; non-convergence is flagged"
    slow_per_test = True
    lds_row = False  # ldsTest runs it once per lds.cg_damps value (rows if_cg_d*)

    @dataclass
    class Settings(HessianSolver.Settings):
        cg_tol: float = setting(1e-06, "cg: relative residual at which CG stops", 'float', (0.0, None))
        cg_max_iter: int = setting(200, "cg: most iterations", 'int', (1, None))

    def file_part(self, cfg):
        return f"lam{cfg.damp:g}tol{cfg.cg_tol:g}it{cfg.cg_max_iter}h{cfg.hessian_points}"

    label = "CG"
    hint = "negative curvature of a non-convex net: raise damp, or cg_max_iter"

    def product(self, problem, x, y, d: torch.Tensor, cfg) -> torch.Tensor:
        """The curvature CG solves with, on (k, p) vectors: here the exact Hessian over (x, y)."""
        return problem.hvp_full(x, y, d, cfg.chunk_size)

    def solve(self, problem, vectors, x, y, cfg, info):
        def apply_a(d: torch.Tensor) -> torch.Tensor:
            return self.product(problem, x, y, d, cfg) + cfg.damp * d
        s, iters, residual = conjugate_gradient(apply_a, vectors.detach(), cfg.cg_tol, cfg.cg_max_iter)
        info.update(cg_iterations=iters, cg_relative_residual=residual, converged=residual <= cfg.cg_tol)
        if residual > cfg.cg_tol:
            info["warning"] = (f"{self.label} did not converge: relative residual {residual:.3g} > cg_tol "
                               f"{cfg.cg_tol:g} after {iters} iterations ({self.hint})")
        return s


@register
class GaussNewtonCG(ConjugateGradient):
    """CG on (G + damp I) s = v, G the Gauss-Newton matrix (1/n) sum_i J_i^T H_i J_i of the full
    training objective (``InfluenceProblem.ggnvp_full``): the curvature that "Better Hessians Matter"
    (Hong et al. 2025) orders between the exact Hessian and EK-FAC on small MLPs. Positive
    semi-definite, so CG converges where the Hessian's negative curvature stops it."""
    name = "ggn_cg"
    summary = "conjugate gradient on exact Gauss-Newton products, (G + damp I)^-1"
    lds_row = True
    label = "GGN-CG"
    hint = "raise cg_max_iter, or damp"

    def product(self, problem, x, y, d, cfg):
        return problem.ggnvp_full(x, y, d, cfg.chunk_size)


@register
class Exact(HessianSolver):
    """The dense Hessian, (H + damp I)^-1 by a float64 solve (small parameter sets)."""
    name = "exact"
    lds_name = "if_exact_last"  # ldsTest runs it on the last layer (the network's side names it)
    summary = "the dense Hessian solved exactly (small parameter sets, e.g. the last layer)"

    @dataclass
    class Settings(HessianSolver.Settings):
        exact_max_params: int = setting(5000, "exact: refuse dense Hessians larger than this", 'int', (1, None))

    def file_part(self, cfg):
        return f"lam{cfg.damp:g}h{cfg.hessian_points}"

    def solve(self, problem, vectors, x, y, cfg, info):
        s, more = exact_inverse_hvp(problem, vectors, x, y, cfg.damp, cfg.chunk_size, cfg.exact_max_params)
        info.update(more)
        return s


class Kronecker(Solver):
    """K-FAC / EK-FAC (:class:`influence.kronecker.KroneckerCurvature`): the factors are built (or read
    from ``factor_file``) once and serve every test chunk and the self-influence."""
    kronecker = True
    all_pairs = True
    eigen_corrected = False
    factored_damping = False

    @dataclass
    class Settings(SolverSettings):
        fisher: str = setting('true', "kfac/ekfac: true (labels sampled from the model, seeded) | empirical "
                                      "(training labels)", 'choice', ('true', 'empirical'))
        kfac_damp_factor: float = setting(0.1, "kfac/ekfac: damping per layer = factor x its mean eigenvalue "
                                               "(kronfluence's heuristic), plus l2_reg", 'float', (0.0, None))
        fit_points: int = setting(0, "kfac/ekfac: fit the factors and eigenvalues on this many training points "
                                     "drawn at random (seeded; kronfluence's covariance_max_examples); 0 = all",
                                  'int', (0, None))

    @property
    def factor_name(self) -> str:
        """The factors it reads and writes: K-FAC's serve every damping of K-FAC (factored or not)."""
        return "ekfac" if self.eigen_corrected else "kfac"

    def file_part(self, cfg):
        return f"{cfg.fisher}df{cfg.kfac_damp_factor:g}" + (f"fp{cfg.fit_points}" if cfg.fit_points else "")

    def effective_damping(self, cfg):
        return f"{cfg.kfac_damp_factor:g} x mean eigenvalue per layer"

    def curvature(self, problem, x, y, cfg, log=lambda _: None) -> KroneckerCurvature:
        """The curvature: read from (or written to) ``cfg.factor_file`` when one is set, else computed;
        fitted on ``cfg.fit_points`` training points drawn at random (seeded) when that is set."""
        x, y = hessian_subset(x, y, cfg.fit_points, cfg.seed)
        options = dict(eigen_corrected=self.eigen_corrected, fisher=cfg.fisher, damp_factor=cfg.kfac_damp_factor,
                       chunk_size=cfg.chunk_size, seed=cfg.seed, progress=cfg.progress,
                       factored_damping=self.factored_damping)
        if cfg.factor_file:
            return KroneckerCurvature.cached(cfg.factor_file, problem, x, y, **options, log=log, save=cfg.save)
        return KroneckerCurvature(problem, x, y, **options)

    def inverse_hvp(self, problem, vectors, x, y, cfg, info, show_progress=True):
        curvature = self.curvature(problem, x, y, cfg)
        info["factor_file"] = cfg.factor_file
        info.update(curvature.info())
        return curvature.inverse_hvp(vectors)

    def chunks(self, problem, x_test, y_test, x_train, y_train, cfg, test_chunk, log):
        yield from self.chunks_with(self.curvature(problem, x_train, y_train, cfg, log), problem, x_test, y_test,
                                    x_train, y_train, cfg, test_chunk)

    @staticmethod
    def chunks_with(curvature: KroneckerCurvature, problem, x_test, y_test, x_train, y_train, cfg, test_chunk):
        for start in range(0, len(x_test), test_chunk):
            grads = problem.sample_grads(x_test[start:start + test_chunk], y_test[start:start + test_chunk])
            yield start, influence_sweep(problem, curvature.inverse_hvp(grads), x_train, y_train, cfg.chunk_size,
                                         show_progress=False)

    def self_influence(self, problem, x, y, cfg, log):
        return self.curvature(problem, x, y, cfg, log).self_influence(x, y, cfg.chunk_size)


@register
class Kfac(Kronecker):
    name = "kfac"
    summary = "K-FAC: Kronecker-factored Fisher per Linear/Conv2d layer"


@register
class Ekfac(Kronecker):
    name = "ekfac"
    eigen_corrected = True
    summary = "EK-FAC: K-FAC with eigenvalues corrected in the Kronecker eigenbasis (the best measured)"


@register
class KfacFactored(Kronecker):
    """K-FAC with the damping split over the two factors: every Linear gradient stays rank one, so
    all test x train pairs come in closed form (:meth:`KroneckerCurvature.factored_pair_scores`)."""
    name = "kfac_factored"
    factored_damping = True
    summary = "K-FAC with damping split over the factors: all test x train pairs in closed form (fastest)"

    def effective_damping(self, cfg):
        return f"{cfg.kfac_damp_factor:g} x mean eigenvalue per layer, split over the two factors"

    def chunks(self, problem, x_test, y_test, x_train, y_train, cfg, test_chunk, log):
        curvature = self.curvature(problem, x_train, y_train, cfg, log)
        train_io = curvature.linear_layer_io(x_train, y_train, cfg.chunk_size)
        if train_io is None:  # conv layers: not rank one, the ordinary solve
            yield from self.chunks_with(curvature, problem, x_test, y_test, x_train, y_train, cfg, test_chunk)
            return
        for start in range(0, len(x_test), test_chunk):
            test_io = curvature.linear_layer_io(x_test[start:start + test_chunk], y_test[start:start + test_chunk])
            yield start, curvature.factored_pair_scores(test_io, train_io)


@register
class Arnoldi(HessianSolver):
    """Arnoldi influence (Schioppa et al. 2022): (H + damp I)^-1 on the top-rank eigenspace of H."""
    name = "arnoldi"
    summary = "Arnoldi: (H + damp I)^-1 on H's top eigenspace from Lanczos on exact HVPs"

    @dataclass
    class Settings(HessianSolver.Settings):
        arnoldi_rank: int = setting(50, "arnoldi: eigenpairs of H kept (largest |eigenvalue|); influence = g_t U "
                                        "(Lambda + damp)^-1 U^T g_i", 'int', (1, None))
        arnoldi_iterations: int = setting(100, "arnoldi: Lanczos steps, one full-data HVP each", 'int', (1, None))

    def file_part(self, cfg):
        return f"r{cfg.arnoldi_rank}it{cfg.arnoldi_iterations}lam{cfg.damp:g}h{cfg.hessian_points}"

    def solve(self, problem, vectors, x, y, cfg, info):
        s, more = arnoldi_inverse_hvp(problem, vectors, x, y, cfg.arnoldi_rank, cfg.arnoldi_iterations,
                                      cfg.damp, cfg.chunk_size, cfg.seed)
        info.update(more)
        return s


@register
class Identity(Solver):
    """No Hessian: influence = grad L(t) . grad L(z) (the gradient dot product)."""
    name = "identity"
    lds_name = "grad_dot"
    summary = "no Hessian: the gradient dot product"
    all_pairs = True

    def effective_damping(self, cfg):
        return 0.0

    def inverse_hvp(self, problem, vectors, x, y, cfg, info, show_progress=True):
        return vectors.detach().clone()

    def self_influence(self, problem, x, y, cfg, log):
        return sample_grad_sq_norms(problem, x, y, cfg.chunk_size)


@register
class TracIn(Solver):
    """TracInCP (Pruthi et al. 2020): sum over Train.py's checkpoints c of lr_c grad L(t) . grad L(z)."""
    name = "tracin"
    needs_checkpoints = True
    summary = "TracIn: gradient dot products summed over the training run's checkpoints"
    lds_row = False  # ldsTest's base models keep no checkpoints

    def effective_damping(self, cfg):
        return 0.0

    def _checkpoints(self, cfg) -> list:
        if not cfg.checkpoints:
            raise ValueError("TracIn needs the training run's checkpoints: none were given")
        return cfg.checkpoints

    def attribute(self, problem, x_test, y_test, x_train, y_train, cfg, show_progress=True, test_loss=None):
        start = time.perf_counter()
        checkpoints = self._checkpoints(cfg)
        influence = tracin(checkpoints, x_test, y_test, x_train, y_train, cfg.chunk_size)
        return influence, {"solver": self.name, "checkpoints": len(checkpoints), "effective_damping": 0.0,
                           "converged": True, "learning_rates": [lr for _, lr in checkpoints],
                           "seconds_sweep": round(time.perf_counter() - start, 3)}

    def self_influence(self, problem, x, y, cfg, log):
        return tracin_self_influence(self._checkpoints(cfg), x, y, cfg.chunk_size)


@register
class TrakSolver(Solver):
    """TRAK (Park et al. 2023) with one model: phi_t^T (Phi^T Phi)^-1 phi_i (1 - p_i) on projected
    gradients of the margin (:class:`influence.trak.Trak`): a kernel, not an inverse-HVP."""
    name = "trak"
    lds_name = "trak"
    summary = "TRAK: projected margin gradients and the training kernel (one model)"
    tasks = ("classification",)  # the margin of a class
    all_pairs = True

    @dataclass
    class Settings(SolverSettings):
        proj_dim: int = setting(2048, "trak: projected gradient dimension (Kronecker projection of Linear layers)",
                                'int', (1, None))

    def file_part(self, cfg):
        return f"d{cfg.proj_dim}"

    def effective_damping(self, cfg):
        return 0.0

    def attribute(self, problem, x_test, y_test, x_train, y_train, cfg, show_progress=True, test_loss=None):
        start = time.perf_counter()
        trak = Trak(problem, x_train, y_train, cfg.proj_dim, cfg.seed, chunk_size=cfg.chunk_size)
        middle = time.perf_counter()
        scores = trak.scores(x_test, y_test)
        end = time.perf_counter()
        return scores, {"solver": self.name, **trak.info(), "seconds_training_side": round(middle - start, 3),
                        "seconds_scores": round(end - middle, 3), "seconds_total": round(end - start, 3)}

    def chunks(self, problem, x_test, y_test, x_train, y_train, cfg, test_chunk, log):
        trak = Trak(problem, x_train, y_train, cfg.proj_dim, cfg.seed, chunk_size=cfg.chunk_size)
        for start in range(0, len(x_test), test_chunk):
            yield start, trak.scores(x_test[start:start + test_chunk], y_test[start:start + test_chunk])

    def self_influence(self, problem, x, y, cfg, log):
        return Trak(problem, x, y, cfg.proj_dim, cfg.seed, chunk_size=cfg.chunk_size).self_influence()


# ---- the verbs the scripts use ----------------------------------------------------------------------
def inverse_hvp(problem: InfluenceProblem, vectors: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                cfg: SolverSettings, show_progress: bool = True) -> tuple[torch.Tensor, dict]:
    """s = (H + lambda I)^-1 v for (k, p) vectors with the chosen solver; returns (s, info)."""
    return solver_for(cfg.solver).s_test(problem, vectors, x, y, cfg, show_progress)


def compute_influences(problem: InfluenceProblem, x_test: torch.Tensor, y_test: torch.Tensor,
                       x_train: torch.Tensor, y_train: torch.Tensor, cfg: SolverSettings,
                       show_progress: bool = True, test_loss: SampleLoss | None = None
                       ) -> tuple[torch.Tensor, dict]:
    """influence (k, n_train) of every training point on each of k test points with the chosen
    solver (:meth:`Solver.attribute`). ``test_loss`` (default: the training loss) is the loss whose
    change is predicted, e.g. the error at one pixel. Returns the influences and an info dict."""
    return solver_for(cfg.solver).attribute(problem, x_test, y_test, x_train, y_train, cfg, show_progress, test_loss)


def influences_from_test_grads(problem: InfluenceProblem, test_grads: torch.Tensor,
                               x_train: torch.Tensor, y_train: torch.Tensor, cfg: SolverSettings,
                               show_progress: bool = True) -> tuple[torch.Tensor, dict]:
    """influence (k, n_train) for k given test-loss gradients with the chosen solver (:meth:`Solver.influences`)."""
    return solver_for(cfg.solver).influences(problem, test_grads, x_train, y_train, cfg, show_progress)


def kronecker_curvature(problem: InfluenceProblem, x: torch.Tensor, y: torch.Tensor, cfg: SolverSettings,
                        log: Callable[[str], None] = lambda _: None) -> KroneckerCurvature:
    """The K-FAC/EK-FAC curvature a solver setting asks for (:meth:`Kronecker.curvature`)."""
    solver = solver_for(cfg.solver)
    if not isinstance(solver, Kronecker):
        raise ValueError(f"solver {cfg.solver!r} has no Kronecker curvature (choose one of "
                         f"{', '.join(n for n, s in SOLVERS.items() if s.kronecker)})")
    return solver.curvature(problem, x, y, cfg, log)


def influence_chunks(problem: InfluenceProblem, x_test: torch.Tensor, y_test: torch.Tensor,
                     x_train: torch.Tensor, y_train: torch.Tensor, cfg: SolverSettings, test_chunk: int = 1000,
                     log: Callable[[str], None] = print) -> Iterator[tuple[int, torch.Tensor]]:
    """Influence of every training point on many test points, streamed: yields (start, (k, n))
    for consecutive chunks of ``test_chunk`` test points, so that 10,000 x 60,000 never has to
    sit in memory. What a solver computes once (K-FAC/EK-FAC factors, TRAK's training side) serves
    all chunks; other solvers solve chunk by chunk."""
    yield from solver_for(cfg.solver).chunks(problem, x_test, y_test, x_train, y_train, cfg, test_chunk, log)
