"""Krylov and dense solvers on exact HVPs: conjugate gradient, Lanczos/Arnoldi, and the dense Hessian solve."""
from __future__ import annotations

from typing import Callable

import torch

from influence.problem import InfluenceProblem


def conjugate_gradient(apply_a: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       tol: float, max_iter: int) -> tuple[torch.Tensor, int, float]:
    """Solve A x = b for (k, p) right-hand sides at once (independent CG per row).

    Returns the solution, the iterations used and the largest relative residual.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    d = r.clone()
    rs = (r * r).sum(dim=1)
    b_norm = b.norm(dim=1).clamp_min(1e-30)
    it = 0
    for it in range(1, max_iter + 1):
        ad = apply_a(d)
        curvature = (d * ad).sum(dim=1)
        alpha = torch.where(curvature > 0, rs / curvature.clamp_min(1e-30), torch.zeros_like(rs))
        x = x + alpha[:, None] * d
        r = r - alpha[:, None] * ad
        rs_new = (r * r).sum(dim=1)
        if (rs_new.sqrt() / b_norm).max() <= tol:
            rs = rs_new
            break
        d = r + (rs_new / rs.clamp_min(1e-30))[:, None] * d
        rs = rs_new
    return x, it, (rs.sqrt() / b_norm).max().item()


def hessian_subset(x: torch.Tensor, y: torch.Tensor, points: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training points the Hessian is taken over: ``points`` drawn without replacement (seeded),
    or all of them (points 0 or at least n)."""
    if points and points < len(x):
        g = torch.Generator(device="cpu").manual_seed(seed)
        idx = torch.randperm(len(x), generator=g)[:points].to(x.device)
        return x[idx], y[idx]
    return x, y


def exact_inverse_hvp(problem: InfluenceProblem, vectors: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      damp: float, chunk_size: int, max_params: int) -> tuple[torch.Tensor, dict]:
    """s = (H + damp I)^-1 v from the dense (p, p) Hessian over (x, y), solved in float64; refuses
    p above ``max_params``. Returns (s, info with H's extreme eigenvalues)."""
    p = problem.num_params
    if p > max_params:
        raise ValueError(f"the dense solve needs a {p} x {p} Hessian, above "
                         f"exact_max_params = {max_params}: choose fewer parameters "
                         f"(e.g. the last layer) or an iterative or Kronecker solver")
    hessian = problem.dense_hessian(x, y, chunk_size).double()
    system = hessian + damp * torch.eye(p, dtype=torch.float64, device=hessian.device)
    s = torch.linalg.solve(system, vectors.detach().double().T).T.to(vectors.dtype)
    eig = torch.linalg.eigvalsh(hessian)
    return s, {"hessian_eig_min": eig[0].item(), "hessian_eig_max": eig[-1].item()}


def lanczos_eigenpairs(apply: Callable[[torch.Tensor], torch.Tensor], dim: int, iterations: int, seed: int = 0,
                       dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz pairs of a symmetric operator from ``iterations`` Lanczos steps with full
    re-orthogonalisation (the symmetric case of Arnoldi's iteration): (values (m,), vectors (dim, m)),
    values ascending. ``apply`` maps a (1, dim) row to (1, dim). The extreme eigenvalues converge
    first; with iterations = dim the pairs are the exact eigendecomposition (up to rounding). When the
    Krylov space closes (an invariant subspace: repeated eigenvalues, e.g. dead ReLU units), the
    iteration restarts from a fresh random vector orthogonal to the basis (off-diagonal 0)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def orthogonal(w: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
        for _ in range(2):  # full re-orthogonalisation, twice (Kahan's "twice is enough")
            w = w - stacked.T @ (stacked @ w)
        return w

    q = torch.randn(dim, generator=generator, dtype=torch.float64).to(device)
    basis = [q / q.norm()]
    alphas, betas = [], []
    for j in range(min(iterations, dim)):
        w = apply(basis[j][None].to(dtype))[0].to(torch.float64)
        alphas.append(float(basis[j] @ w))
        stacked = torch.stack(basis)
        w = orthogonal(w, stacked)
        beta = float(w.norm())
        if j + 1 == min(iterations, dim):
            break
        if beta < 1e-10 * max(1.0, max(abs(a) for a in alphas)):  # invariant subspace: restart
            w = orthogonal(torch.randn(dim, generator=generator, dtype=torch.float64).to(device), stacked)
            betas.append(0.0)
            basis.append(w / w.norm())
            continue
        betas.append(beta)
        basis.append(w / beta)
    m = len(alphas)
    tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[:m - 1], dtype=torch.float64)
        tri += torch.diag(off, 1) + torch.diag(off, -1)
    values, small = torch.linalg.eigh(tri)
    return values.to(device), torch.stack(basis[:m]).T @ small.to(device)


def arnoldi_inverse_hvp(problem: InfluenceProblem, vectors: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                        rank: int, iterations: int, damp: float, chunk_size: int = 10000, seed: int = 0
                        ) -> tuple[torch.Tensor, dict]:
    """Arnoldi influence's solve (Schioppa et al. 2022): (H + damp I)^-1 restricted to the top-``rank``
    eigenspace of H (the training objective's Hessian, L2 term included), from Lanczos on exact
    full-data HVPs:

        s = U_r diag(1 / (lambda_j + damp)) U_r^T v

    with (lambda_j, U_r) the ``rank`` Ritz pairs of largest |lambda| out of ``iterations`` steps (the
    paper keeps the dominant eigenvalues). Directions outside the subspace are dropped, not damped.
    Returns (s (k, p), info with the eigenvalues kept)."""
    def apply(row: torch.Tensor) -> torch.Tensor:
        return problem.hvp_full(x, y, row, chunk_size)
    values, vecs = lanczos_eigenpairs(apply, problem.num_params, iterations, seed, device=vectors.device)
    keep = torch.argsort(values.abs(), descending=True)[:rank]
    values, vecs = values[keep], vecs[:, keep]
    coefficients = (vectors.detach().double() @ vecs) / (values + damp)[None, :]
    info = {"arnoldi_rank": len(keep), "arnoldi_iterations": iterations,
            "arnoldi_eig_max": float(values.max()), "arnoldi_eig_min_kept": float(values.abs().min())}
    if bool(((values + damp).abs() < 1e-8).any()):
        info["warning"] = "Arnoldi: a kept eigenvalue is -damp: its direction blows up (raise damp)"
    return (coefficients @ vecs.T).to(vectors.dtype), info
