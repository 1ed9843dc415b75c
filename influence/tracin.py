"""TracIn (Pruthi et al. 2020, TracInCP): influence accumulated along training, and self-influence."""
from __future__ import annotations

import torch

from influence.layers import linear_owners
from influence.problem import InfluenceProblem
from influence.sweep import influence_sweep


def sample_grad_sq_norms(problem: "InfluenceProblem", x: torch.Tensor, y: torch.Tensor,
                         chunk_size: int = 10000) -> torch.Tensor:
    """||grad L(z_i)||^2 over the chosen parameters for every sample, (n,), without the L2 term.

    Linear layers in closed form (||delta a^T||^2 = ||delta||^2 ||a||^2, bias ||delta||^2); other
    modules from per-sample gradients chunk by chunk.
    """
    owners = linear_owners(problem)
    out = []
    for s in range(0, len(x), chunk_size):
        xb, yb = x[s:s + chunk_size], y[s:s + chunk_size]
        if owners is None:
            out.append(problem.sample_grads(xb, yb, chunk_size=chunk_size).square().sum(1))
            continue
        captured, deltas = problem.capture(owners, xb, yb, problem.sample_loss)
        total = torch.zeros(len(xb), dtype=xb.dtype, device=xb.device)
        for (name, _), delta in zip(owners.items(), deltas):
            d2 = delta.detach().square().sum(1)
            if f"{name}.weight" in problem.params:
                total += d2 * captured[name][0].detach().square().sum(1)
            if f"{name}.bias" in problem.params:
                total += d2
        out.append(total)
    return torch.cat(out)


def tracin(checkpoints: list[tuple[InfluenceProblem, float]], x_test: torch.Tensor, y_test: torch.Tensor,
           x_train: torch.Tensor, y_train: torch.Tensor, chunk_size: int = 10000) -> torch.Tensor:
    """TracInCP(t, z) = sum over checkpoints c of lr_c * grad L(t; theta_c) . grad L(z; theta_c), (k, n).

    Positive = z's gradient steps lowered the test loss (a proponent), the same sign as influence
    here. Each checkpoint costs one closed-form sweep; no per-sample gradient is materialised.
    """
    total = None
    for problem, lr in checkpoints:
        grads = problem.sample_grads(x_test, y_test)
        part = influence_sweep(problem, grads, x_train, y_train, chunk_size, show_progress=False) * lr
        total = part if total is None else total + part
    if total is None:
        raise ValueError("TracIn needs at least one checkpoint")
    return total


def tracin_self_influence(checkpoints: list[tuple[InfluenceProblem, float]], x: torch.Tensor, y: torch.Tensor,
                          chunk_size: int = 10000) -> torch.Tensor:
    """TracIn self-influence sum_c lr_c * ||grad L(z; theta_c)||^2 of every point, (n,)."""
    return sum(sample_grad_sq_norms(problem, x, y, chunk_size) * lr for problem, lr in checkpoints)
