"""LiSSA (Agarwal et al. 2017; Koh & Liang 2017): H^-1 v by a damped, scaled Neumann recursion on sampled batches."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from influence.losses import nll_sample_loss
from influence.mlp import MlpHvp, mlp_check, mlp_layers
from influence.problem import InfluenceProblem
from influence.settings import SolverSettings, setting


class LissaDiverged(RuntimeError):
    """LiSSA's recursion blew up: the Hessian has eigenvalues above 2*scale."""


@dataclass
class LissaSettings(SolverSettings):
    """LiSSA's own settings (the registry's ``Lissa.Settings``)."""
    scale: float = setting(100.0, "LiSSA scale: the recursion converges while every Hessian eigenvalue is "
                                  "below 2 x scale (the original's 25 diverges on the MNIST MLP: eigenvalues "
                                  "up to ~130)", 'float', (1e-12, None))
    stochastic: bool = setting(False, "LiSSA: true = one training point per step, false = hvp_batch_size",
                               'bool', None)
    hvp_batch_size: int = setting(8, "LiSSA: training points per HVP step (stochastic: 1)", 'int', (1, None))
    recursion_depth: int = setting(1000, "LiSSA t: steps of the recursion", 'int', (1, None))
    repeats: int = setting(5, "LiSSA r: independent chains, averaged", 'int', (1, None))

    @property
    def batch(self) -> int:
        """Training points per step: 1 when stochastic, else hvp_batch_size."""
        return 1 if self.stochastic else self.hvp_batch_size


LISSA_SETTLED = 0.05  # LiSSA counts as converged when its estimate moved < 5% over the last 10% of steps
LISSA_FOLD_SAMPLES = 256  # folded LiSSA: training points per block (measured best of 128/256/512 on the MLP)


def lissa(problem: InfluenceProblem, vectors: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
          cfg: LissaSettings, show_progress: bool = True, info: dict | None = None,
          fold: bool = True) -> torch.Tensor:
    """LiSSA estimate of H^-1 v for (k, p) vectors (Agarwal et al. 2017; Koh & Liang 2017).

    h_0 = v;  h_j = v + (1 - damp) h_{j-1} - H_j h_{j-1} / scale,  j = 1..t, each H_j on a fresh
    uniformly drawn batch of ``cfg.batch`` training points; the estimate is h_t / scale,
    averaged over ``repeats`` independent chains (run side by side). Its fixed point is
    (H + damp*scale*I)^-1 v, so the damping it applies is damp*scale. The recursion converges when
    every Hessian eigenvalue lies in (-damp*scale, (2 - damp)*scale); a blow-up stops it with
    :class:`LissaDiverged`. Convergence: ``info`` (if given) receives the relative change of the
    estimate's norm over the last 10% of the steps (``lissa_last_change``) and ``converged`` =
    that change < 5%.

    A ReLU or softplus MLP with NLL loss (:func:`mlp_layers`) runs the same recursion on the same batches
    with hand-written batched HVPs and its first weight block folded over many steps
    (:func:`_lissa_folded_mlp`; about 4x faster, and few large operations rather than thousands of
    small ones, which matters on a busy machine). Before it runs, its HVP is checked against autograd
    on the first batch; ``fold=False`` (or a failed check, reported in ``info``) uses the
    step-by-step autograd loop. ``info["lissa_path"]`` says which ran.
    """
    bar = cfg.progress(total=cfg.recursion_depth, desc="LiSSA", unit="step", leave=False) \
        if cfg.progress and show_progress else None
    try:
        mlp = _checked_mlp(problem, vectors, x, y, cfg, info) if fold else None
        if info is not None:
            info["lissa_path"] = "folded_mlp" if mlp is not None else "autograd"
        if mlp is not None:
            return _lissa_folded_mlp(problem, mlp, vectors, x, y, cfg, bar, info)
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        v = vectors.detach()
        h = v.unsqueeze(0).repeat(cfg.repeats, 1, 1)                      # (r, k, p)
        v_norm = v.norm(dim=1).clamp_min(1e-30)                            # (k,)
        n = len(x)
        hv = torch.empty_like(h)                                           # reused every step
        checkpoint = max(int(0.9 * cfg.recursion_depth), 1)
        earlier = None
        for j in range(1, cfg.recursion_depth + 1):
            if j == checkpoint:
                earlier = h.mean(dim=0).norm(dim=1)                       # (k,) norm of the estimate
            idx = torch.randint(n, (cfg.repeats, cfg.batch), generator=generator).to(x.device)
            problem.hvp_per_batch(x[idx], y[idx], h, out=hv)
            h.mul_(1.0 - cfg.damp).add_(v).sub_(hv, alpha=1.0 / cfg.scale)  # in place: h is big
            _check_diverged(h.norm(dim=2) / v_norm, j, cfg)                 # ||h|| / ||v||, (r, k)
            if bar is not None:
                bar.update(1)
        _settled(info, earlier, h.mean(dim=0).norm(dim=1), cfg)
        return (h / cfg.scale).mean(dim=0)
    finally:
        if bar is not None:
            bar.close()


def _check_diverged(ratio: torch.Tensor, step: int, cfg: LissaSettings) -> None:
    """Raise :class:`LissaDiverged` when ||h|| / ||v|| after ``step`` steps is not finite or above
    100 x min(step + 1, 1/damp) (a converging recursion stays below min(step + 1, 1/damp))."""
    bound = 100.0 * min(step + 1, 1.0 / cfg.damp if cfg.damp > 0 else math.inf)
    if torch.isfinite(ratio).all() and ratio.max() <= bound:
        return
    raise LissaDiverged(
        f"LiSSA diverged at step {step} (||h||/||v|| = {ratio.max().item():.3g} > {bound:.3g}): "
        f"a Hessian eigenvalue lies outside (-damp*scale, (2-damp)*scale) = "
        f"({-cfg.damp * cfg.scale:g}, {(2 - cfg.damp) * cfg.scale:g}); raise the scale "
        f"(now {cfg.scale:g}) for large eigenvalues, or damp for negative curvature")


def _settled(info: dict | None, earlier: torch.Tensor | None, final: torch.Tensor, cfg: LissaSettings) -> None:
    """Record how much LiSSA's estimate still moved over its last 10% of steps."""
    if info is None or earlier is None:
        return
    change = ((final - earlier).abs() / final.clamp_min(1e-30)).max().item()
    info.update(lissa_last_change=round(change, 5), converged=change < LISSA_SETTLED)
    if change >= LISSA_SETTLED:
        info["warning"] = (f"LiSSA did not settle: its estimate still changed by {change:.1%} over the last "
                           f"10% of the {cfg.recursion_depth} steps (raise recursion_depth, or damp)")


def _checked_mlp(problem: InfluenceProblem, vectors: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      cfg: LissaSettings, info: dict | None) -> "MlpHvp | None":
    """The hand-written MLP HVP for this problem, if its shape is a ReLU or softplus MLP with NLL loss
    and its product matches autograd's on one batch (else None, with a warning in ``info``)."""
    found = mlp_layers(problem.model) if problem.sample_loss is nll_sample_loss else None
    if found is None:
        return None
    mlp = MlpHvp(problem, *found)
    xb, yb, vb = x[:cfg.batch], y[:cfg.batch], vectors[:2].detach()
    by_hand = mlp.hvp(problem, xb, yb, vb) + problem.l2_reg * vb
    reference = problem.hvp(xb, yb, vb)
    _, warning = mlp_check([by_hand], [reference], "the hand-written MLP HVP differs from autograd",
                           "the step-by-step autograd loop")
    if warning is not None:
        if info is not None:
            info["lissa_mlp_check"] = warning
        return None
    return mlp


def _block_lengths(depth: int, block: int, boundary: int) -> list[int]:
    """Split steps 1..depth into blocks of at most ``block`` steps, one ending at ``boundary``."""
    ends = sorted({*range(block, depth, block), depth, *([boundary] if 0 < boundary < depth else [])})
    return [e - s for s, e in zip([0, *ends[:-1]], ends)]


def _lissa_folded_mlp(problem: InfluenceProblem, mlp: MlpHvp, vectors: torch.Tensor, x: torch.Tensor,
                    y: torch.Tensor, cfg: LissaSettings, bar, info: dict | None) -> torch.Tensor:
    """:func:`lissa`'s recursion for a ReLU or softplus MLP with the first weight block folded over steps.

    The first weight W_1 holds most parameters, and H_j's W_1 block is R_j^T X_j (X_j the step's batch):
    a rank-B update. Unrolled from a block's start j0, with beta = 1 - damp - l2_reg/scale,

        h_{j0+m} = beta^m h_{j0} + c_m v - (1/scale) sum_{i<m} beta^{m-1-i} R_i^T X_i,   c_m = sum_{i<m} beta^i

    so the product X' h_{j0+m}^T a step needs is beta^m (X' h_{j0}^T) + c_m (X' v^T) minus Gram terms
    (X' X_i^T) R_i, all from products computed once per block; h itself is written once per block.
    The same batches as the step-by-step loop (same generator), so the same estimate up to rounding.
    """
    r, k, batch = cfg.repeats, len(vectors), cfg.batch
    first = mlp.weight_names[0] if mlp.weight_names[0] in mlp.selected else None
    flat_x = x.reshape(len(x), -1)
    v = problem.unflatten(vectors.detach())
    h = {name: t.unsqueeze(0).repeat(r, *([1] * t.dim())) for name, t in v.items()}  # (r, k, ...)
    rest = [name for name in problem.param_names if name != first]
    beta = 1.0 - cfg.damp - problem.l2_reg / cfg.scale
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    v_norm = vectors.norm(dim=1).clamp_min(1e-30)
    checkpoint = max(int(0.9 * cfg.recursion_depth), 1)

    def estimate_norms() -> torch.Tensor:  # (k,) norm of the estimate averaged over the repeats
        return torch.sqrt(sum(t.mean(0).reshape(k, -1).pow(2).sum(1) for t in h.values()))

    earlier = estimate_norms() if checkpoint == 1 else None
    done = 0
    for length in _block_lengths(cfg.recursion_depth, max(1, LISSA_FOLD_SAMPLES // batch), checkpoint - 1):
        idx = torch.stack([torch.randint(len(x), (r, batch), generator=generator) for _ in range(length)],
                          dim=1).to(x.device)                                     # (r, K, B)
        xb, yb = flat_x[idx.reshape(r, -1)], y[idx]                             # (r, KB, d), (r, K, B)
        if first is not None:
            n1, d = h[first].shape[2:]
            # X' h_{j0}^T and X' v^T for every batch of the block, laid out (r, K, B, k, n1)
            from_start = (xb @ h[first].reshape(r, k * n1, d).transpose(1, 2)).reshape(r, length, batch, k, n1)
            from_v = (xb @ v[first].reshape(k * n1, d).T).reshape(r, length, batch, k, n1)
            gram = xb @ xb.transpose(1, 2)                                       # (r, KB, KB)
            updates = xb.new_zeros(r, length * batch, k * n1)                    # R_i side by side, (r, KB, k n1)
            # beta^(K-1-i) per column of batch i; its last m batches are the weights step m needs
            weights = (beta ** torch.arange(length - 1, -1, -1, dtype=xb.dtype, device=xb.device)
                       ).repeat_interleave(batch)
        coef_v, decay = 0.0, 1.0                                                 # c_m, beta^m
        for m in range(length):
            cols = slice(m * batch, (m + 1) * batch)
            state = mlp.batch_state(xb[:, cols], yb[:, m])
            first_pre = None
            if first is not None:                                                # X_m h^T: (r, k, B, n1)
                first_pre = (decay * from_start[:, m] + coef_v * from_v[:, m]).transpose(1, 2)
                if m:
                    # one (B, mB) x (mB, k n1) product per repeat, not k small ones
                    earlier_steps = (gram[:, cols, :m * batch] * weights[(length - m) * batch:]) @ updates[:, :m * batch]
                    first_pre = first_pre - earlier_steps.reshape(r, batch, k, n1).transpose(1, 2) / cfg.scale
            rg, hv = mlp.apply(state, first_pre, {n: h[n] for n in rest})
            if first is not None:
                updates[:, cols] = rg.transpose(1, 2).reshape(r, batch, k * n1)
            for name in rest:  # h = v + (1 - damp) h - (H h + l2 h) / scale, in place (h is big)
                h[name].mul_(beta).add_(v[name]).sub_(hv[name].div_(cfg.scale))
            coef_v, decay = coef_v + decay, decay * beta
        if first is not None:
            scaled = (updates * weights[:, None]).transpose(1, 2)                  # (r, k n1, KB)
            h[first].reshape(r, k * n1, d).baddbmm_(scaled, xb, beta=decay, alpha=-1.0 / cfg.scale)
            h[first].add_(v[first], alpha=coef_v)
        done += length
        if bar is not None:
            bar.update(length)
        _check_diverged(torch.sqrt(sum(t.reshape(r, k, -1).pow(2).sum(2) for t in h.values())) / v_norm, done, cfg)
        if done == checkpoint - 1:
            earlier = estimate_norms()
    _settled(info, earlier, estimate_norms(), cfg)
    return problem.flatten({n: t.mean(0) / cfg.scale for n, t in h.items()}, batch_dims=1)
