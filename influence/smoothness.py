"""Can this run be attributed? Metasmoothness (Engstrom et al. 2025, "Optimizing ML training with
metagradient descent", Defs. 1 and 2), measured before Method 3 spends its replay.

A training run maps data weights z (1 = as trained) to final parameters theta(z). Method 3 is the
exact derivative d theta / d z; it predicts what removing points does only when theta is close to
linear in z over that distance. For a direction v in data-weight space and a step h, three
trainings give theta(z), theta(z + h v), theta(z + 2 h v) and two successive changes

    d1 = theta(z + h v) - theta(z),     d2 = theta(z + 2 h v) - theta(z + h v).

    metasmoothness  S_hat = sum_i (|d1_i| + |d2_i|) sign(d1_i d2_i) / sum_i (|d1_i| + |d2_i|)   in [-1, 1]

(1: every parameter keeps moving the same way, as a run linear in z does; near 0: the moves are
noise, a chaotic run), and for a scalar output f of the run (a test loss)

    curvature  S = |f(z + 2 h v) - 2 f(z + h v) + f(z)| / h^2.

Cost: 1 + 2 x directions trainings (z shared), which a grouped trainer runs side by side.
"""
from __future__ import annotations

from typing import Callable

import torch

# The verdict's threshold, calibrated on 17 MNIST runs (bench/attributable.py; docs/results.md,
# "Checking the check"): every run at S_hat >= 0.97 had Method 3's single-model LDS at a 1% drop
# between 0.89 and 0.99; below it (every ReLU run sits at the noise floor, S_hat -0.45 to -0.12, and
# two long softplus runs at 0.95-0.96 reached 0.66 and 0.79) anything from 0.00 to 0.92. The check
# vouches one way only. (EleutherAI's GPT-2 study: S_hat 0.99 with MAGIC LDS 0.86-0.98, 0.88 with 0.17.)
SMOOTH_ENOUGH = 0.97
MEASURED_ABOVE = (0.89, 0.99)   # Method 3's LDS at 1% on the calibration runs at or above the threshold
MEASURED_BELOW = (0.00, 0.92)   # ... and below it


def random_direction(n: int, count: int, seed: int) -> torch.Tensor:
    """(n,) float64: +1 or -1 (seeded) on ``count`` random points, 0 elsewhere."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.zeros(n, dtype=torch.float64)
    chosen = torch.randperm(n, generator=generator)[:count]
    v[chosen] = torch.randint(0, 2, (len(chosen),), generator=generator).double() * 2 - 1
    return v


def weight_sets(directions: list[torch.Tensor], h: float) -> list[torch.Tensor]:
    """The data weights of the trainings: z = 1 first, then z + h v and z + 2 h v per direction."""
    ones = torch.ones_like(directions[0])
    return [ones] + [ones + step * h * v for v in directions for step in (1, 2)]


def metasmoothness(finals: list[torch.Tensor], h: float, outputs: list[torch.Tensor] | None = None) -> dict:
    """S_hat and S from the trainings of :func:`weight_sets` (their final flat parameters, in that
    order; ``outputs``: each training's (t,) scalar outputs, e.g. test losses, for S). Returns
    {"s_hat": mean over directions, "s_hat_each": [...], "curvature": mean S over directions and
    outputs, "s_hat_outputs": the same sign agreement over the outputs instead of the parameters
    (both None without outputs), "trainings": count}."""
    base, each, curvature, on_outputs = finals[0].double(), [], [], []
    for d in range(1, len(finals), 2):
        each.append(sign_agreement(base, finals[d].double(), finals[d + 1].double()))
        if outputs is not None:
            f0, f1, f2 = (outputs[i].double() for i in (0, d, d + 1))
            curvature.append(float(((f2 - 2 * f1 + f0).abs() / h ** 2).mean()))
            on_outputs.append(sign_agreement(f0, f1, f2))
    mean = (lambda values: sum(values) / len(values) if values else None)  # noqa: E731
    return {"s_hat": mean(each), "s_hat_each": each, "curvature": mean(curvature),
            "s_hat_outputs": mean(on_outputs), "trainings": len(finals)}


def sign_agreement(at_z: torch.Tensor, at_h: torch.Tensor, at_2h: torch.Tensor) -> float:
    """S_hat of one direction over the entries of a vector (parameters, or outputs such as test
    losses): the |change|-weighted mean sign agreement of d1 = x(h) - x(0) and d2 = x(2h) - x(h)."""
    d1, d2 = at_h - at_z, at_2h - at_h
    weight = d1.abs() + d2.abs()
    return float((weight * torch.sign(d1 * d2)).sum() / weight.sum().clamp_min(1e-300))


MNIST_REMEDY = 'train with mnist.recipe "attributable" or softplus (docs/results.md)'


def verdict(s_hat: float, remedy: str = MNIST_REMEDY) -> str:
    """One line: whether Method 3's scores can be expected to predict removals for this run (the
    ranges measured on the MNIST calibration recipes), and ``remedy`` when they cannot."""
    if s_hat >= SMOOTH_ENOUGH:
        return (f"metasmoothness S_hat = {s_hat:.3f} >= {SMOOTH_ENOUGH}: the run is smooth in its data weights; "
                f"Method 3's scores can be expected to predict removals (single-model LDS at a 1% drop "
                f"{MEASURED_ABOVE[0]}-{MEASURED_ABOVE[1]} on such MNIST runs)")
    return (f"metasmoothness S_hat = {s_hat:.3f} < {SMOOTH_ENOUGH}: the run is not smooth in its data weights; "
            f"Method 3 is its exact derivative, but its removal predictions cannot be vouched for (LDS at a 1% "
            f"drop {MEASURED_BELOW[0]}-{MEASURED_BELOW[1]} on such MNIST runs); for that, {remedy}")


def measure(train: Callable[[list[torch.Tensor]], tuple[list[torch.Tensor], list[torch.Tensor] | None]], n: int,
            directions: int, points: int, h: float, seed: int = 0) -> dict:
    """The whole check: ``directions`` random +-1 directions on ``points`` points each, the
    trainings by ``train(weight sets) -> (final flat parameters, outputs or None)``, and S_hat, S."""
    vs = [random_direction(n, points, seed * 1000 + j) for j in range(directions)]
    finals, outputs = train(weight_sets(vs, h))
    return {**metasmoothness(finals, h, outputs), "directions": directions, "points": points, "h": h}
