"""Method 3's shared parts: the runs a replay differentiates (SGD, Adam), the replayed parameters as flat
vectors and the checkpointed forward replay."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


METHOD3_SIGN_CONVENTION = (
    "influence[t][i] = -n_train * dF_t/dw_i, F_t the test target (loss, or minus the margin) after the "
    "last step of the replayed run, w_i training point i's data weight (1 = as trained); positive = "
    "point i helped; influence / n_train = the first-order change of F_t when point i is removed "
    "(w_i = 0, same seed, same order: the single-model counterfactual)")


@dataclass
class SgdRun:
    """One SGD run as replay needs it (torch.optim.SGD: momentum, weight decay, no dampening).

    ``orders`` (epochs, n) holds each epoch's permutation of the training points; step s reads the
    s-th slice of ``batch_size`` of its epoch (the last one may be shorter). With ``num_points`` > 0
    ``orders`` is (steps, batch) instead, one row per step over that many points (the denoiser's
    fine-tuning: concatenated permutations cut into batches). ``data_weights`` (n,)
    weight each point's loss (None = 1 for all) in the steps of the attribution window, s >=
    ``window_start`` (0 = the whole run); before it every weight is 1 (:func:`window_start`).
    ``schedule`` sets step s's learning rate eta_s (:meth:`lr`): constant, or a decay from
    ``learning_rate`` towards 0 at the end of the run (linear or cosine)."""
    learning_rate: float
    momentum: float
    weight_decay: float
    batch_size: int
    orders: torch.Tensor
    data_weights: torch.Tensor | None = None
    window_start: int = 0
    schedule: str = "constant"
    num_points: int = 0

    @property
    def n(self) -> int:
        return self.num_points or self.orders.shape[1]

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n // self.batch_size)

    @property
    def num_steps(self) -> int:
        return self.orders.shape[0] if self.num_points else self.orders.shape[0] * self.steps_per_epoch

    def batch(self, step: int) -> torch.Tensor:
        if self.num_points:
            return self.orders[step]
        epoch, position = divmod(step, self.steps_per_epoch)
        return self.orders[epoch, position * self.batch_size:(position + 1) * self.batch_size]

    def lr(self, step: int) -> float:
        """eta_s of this run's schedule (:func:`scheduled_lr`)."""
        return scheduled_lr(self.learning_rate, self.schedule, step, self.num_steps)

    def step_weights(self, step: int, idx: torch.Tensor) -> torch.Tensor | None:
        """The data weights of batch ``idx`` at ``step`` (None = all 1: no weights, or before the window)."""
        if self.data_weights is None or step < self.window_start:
            return None
        return self.data_weights[idx]

    def optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """torch.optim.SGD of this run (the learning rate of step s: set it from :meth:`lr` before the step)."""
        return torch.optim.SGD(params, lr=self.learning_rate, momentum=self.momentum, weight_decay=self.weight_decay)


WINDOW_UNITS = ("epochs", "steps", "fraction")
SCHEDULES = ("constant", "linear", "cosine")


def scheduled_lr(learning_rate: float, schedule: str, step: int, num_steps: int) -> float:
    """Step s's learning rate eta_s (s = 0..T-1, T = ``num_steps``): constant eta; linear
    eta (1 - s/T); cosine eta (1 + cos(pi s/T)) / 2. The last two end near 0, which is what makes a
    run smooth in its data weights (the steps that end it are small)."""
    if schedule == "constant":
        return learning_rate
    done = step / num_steps
    if schedule == "linear":
        return learning_rate * (1.0 - done)
    if schedule == "cosine":
        return learning_rate * 0.5 * (1.0 + math.cos(math.pi * done))
    raise ValueError(f"learning-rate schedule {schedule!r}: one of {', '.join(SCHEDULES)}")


def window_start(num_steps: int, steps_per_epoch: int, size: float, unit: str) -> int:
    """The first step of the attribution window: the data weights act only in the last ``size``
    epochs, steps, or fraction of the steps (``unit``) of a run of ``num_steps`` steps; size 0 = the
    whole run (step 0). Method 3 then differentiates only those steps: dF/dw_i asks "which images,
    seen in the window, made this network do this", with everything before the window held fixed."""
    if unit not in WINDOW_UNITS:
        raise ValueError(f"window unit {unit!r}: one of {', '.join(WINDOW_UNITS)}")
    if size < 0:
        raise ValueError(f"window {size}: 0 (the whole run) or a positive length")
    if size == 0:
        return 0
    steps = {"epochs": size * steps_per_epoch, "steps": size, "fraction": size * num_steps}[unit]
    steps = int(round(steps))
    if steps < 1 or steps > num_steps:
        raise ValueError(f"window of {size:g} {unit} = {steps} steps, but the run has {num_steps} steps "
                         f"({steps_per_epoch} per epoch): choose 1 to {num_steps} steps")
    return num_steps - steps


class Replay:
    """What every Method-3 replay shares: the replayed parameters as flat vectors, and the forward
    replay that keeps the optimiser's state every ``checkpoint_interval`` steps. A subclass sets
    ``run`` (with ``num_steps``), calls :meth:`_keep` with the parameters it replays, and defines
    ``_start_state()`` (the flat state before step 0, parameters first) and
    ``_steps(start, stop, state, store=None)`` (the state after step stop-1)."""

    def _keep(self, model: nn.Module, names: list[str]) -> None:
        named = dict(model.named_parameters())
        self.names = names
        self.initial = [named[n].detach().clone() for n in names]
        self.shapes = [t.shape for t in self.initial]
        self.sizes = [t.numel() for t in self.initial]
        self.checkpoints: dict[int, tuple] = {}
        self.interval = 0

    @property
    def num_params(self) -> int:
        return sum(self.sizes)

    @staticmethod
    def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in tensors])

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        lead = flat.shape[:-1]
        return [piece.reshape(*lead, *shape) for piece, shape in
                zip(torch.split(flat, self.sizes, dim=-1), self.shapes)]

    def _jvp_primal(self, params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights by name as torch.func.jvp primals: copies, never views of the walk's segment
        store, since forward-mode AD gives every view a tangent as large as its base (measured on
        FFDNet: 9.8 GB and 7x slower per step with views)."""
        return {name: p.clone() for name, p in zip(self.names, params)}

    def forward(self, checkpoint_interval: int = 0, progress: Callable | None = None) -> dict[str, torch.Tensor]:
        """Replay the whole run from the model's initial weights, keeping the state every
        ``checkpoint_interval`` steps (0 = about sqrt(T)). Returns the final parameters by name.
        ``progress``: a tqdm-like factory for a bar (None = silent)."""
        total = self.run.num_steps
        self.interval = checkpoint_interval or max(1, int(math.ceil(math.sqrt(total))))
        state = self._start_state()
        self.checkpoints = {}
        bar = step_bar(progress, total, "replay forward")
        for start in range(0, total, self.interval):
            self.checkpoints[start] = state
            stop = min(start + self.interval, total)
            state = self._steps(start, stop, state)
            bar.update(stop - start)
        bar.close()
        return dict(zip(self.names, self._split(state[0])))


def replay_error(final: dict[str, torch.Tensor], model: nn.Module) -> float:
    """Relative distance ||theta_replayed - theta_model|| / ||theta_model|| over the model's trainable
    parameters: how far a Method-3 replay ended from the run it claims to replay."""
    saved = {n: p for n, p in model.named_parameters() if p.requires_grad}
    diff = sum(float((final[n] - p.detach()).pow(2).sum()) for n, p in saved.items())
    size = sum(float(p.detach().pow(2).sum()) for p in saved.values())
    return (diff / max(size, 1e-30)) ** 0.5


class ReplayMismatch(ValueError):
    """The forward replay ended ``error`` (relative) away from the run it claims to replay."""

    def __init__(self, error: float, tolerance: float) -> None:
        super().__init__(f"the replay ends {error:.2g} (relative) away from the trained weights (tolerance {tolerance:g})")
        self.error, self.tolerance = error, tolerance


def forward_checked(replay: Replay, trained: nn.Module, checkpoint_interval: int, tolerance: float,
                    progress: Callable | None = None) -> tuple[dict[str, torch.Tensor], float, float]:
    """The forward replay, checked against the run it claims to replay: (final parameters, relative
    error to ``trained`` (:func:`replay_error`), seconds). Raises :class:`ReplayMismatch` past
    ``tolerance``: the replay does not describe that run, so its metagradient would not either."""
    start = time.perf_counter()
    final = replay.forward(checkpoint_interval, progress=progress)
    seconds = time.perf_counter() - start
    error = replay_error(final, trained)
    if error > tolerance:
        raise ReplayMismatch(error, tolerance)
    return final, error, seconds


class _NoBar:
    def update(self, _: int) -> None:
        pass

    def close(self) -> None:
        pass


def step_bar(progress: Callable | None, total: int, desc: str):
    """A bar from the caller's tqdm-like factory, or one that shows nothing."""
    return progress(total=total, desc=desc, unit="step") if progress else _NoBar()


@dataclass
class AdamRun:
    """One Adam run as replay needs it (torch.optim.Adam: no weight decay, no amsgrad): ``orders``
    (steps, batch) holds each step's training points; ``data_weights`` (n,) weight each point's loss
    (None = 1 for all). The batch loss is sum_i w_i l_i / |B|; ``schedule`` sets step s's learning
    rate (:meth:`lr`; set it on the optimiser before each step). ``eps_root`` > 0 puts an epsilon
    inside the square root too (optax's eps_root): theta -= c1 m / (sqrt(c2^2 v + eps_root) + eps),
    which keeps the step smooth where v is near 0 (Engstrom et al. 2025: a metasmooth Adam); that
    step is :class:`AdamEpsRoot` (:meth:`optimizer`), torch.optim.Adam has no such option."""
    learning_rate: float
    orders: torch.Tensor
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    data_weights: torch.Tensor | None = None
    eps_root: float = 0.0
    schedule: str = "constant"

    @property
    def num_steps(self) -> int:
        return self.orders.shape[0]

    def batch(self, step: int) -> torch.Tensor:
        return self.orders[step]

    def lr(self, step: int) -> float:
        """eta_s of this run's schedule (:func:`scheduled_lr`): Adam's step s uses it in place of lr."""
        return scheduled_lr(self.learning_rate, self.schedule, step, self.num_steps)

    def optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """The optimiser that makes this run: torch.optim.Adam, or :class:`AdamEpsRoot` with eps_root."""
        if self.eps_root:
            return AdamEpsRoot(params, self.learning_rate, self.betas, self.eps, self.eps_root)
        return torch.optim.Adam(params, lr=self.learning_rate, betas=self.betas, eps=self.eps)


class AdamEpsRoot(torch.optim.Optimizer):
    """Adam with an epsilon inside the square root (no weight decay): the one definition of that step,
    used by the fine-tuning and by its replay. State as torch.optim.Adam names it (step, exp_avg,
    exp_avg_sq), so a replay segment can start from a checkpoint the same way."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, eps_root: float) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "eps_root": eps_root})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002  (torch's signature)
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t = float(state["step"])
                state["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                c1, c2 = group["lr"] / (1 - b1 ** t), 1.0 / math.sqrt(1 - b2 ** t)
                denominator = (state["exp_avg_sq"] * c2 ** 2 + group["eps_root"]).sqrt_().add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denominator, value=-c1)
