"""The sweep: s_test . grad L(z_i) for every training point, in closed form per layer where the layer allows,
and where inside a training sample its influence sits (per output position of conv layers)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from influence.layers import capturable_owners, layer_rule, linear_owners, unfold_patches
from influence.problem import InfluenceProblem


def _linear_sweep_chunk(problem: InfluenceProblem, owners: dict[str, nn.Linear],
                        s_dict: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
                        ) -> torch.Tensor:
    """Closed form for Linear layers: <grad_W(z), S_W> = delta^T S_W a, never materialising grads."""
    captured, deltas = problem.capture(owners, x, y, problem.sample_loss)
    k = next(iter(s_dict.values())).shape[0]
    result = torch.zeros(k, len(x), dtype=x.dtype, device=x.device)
    for (name, _module), delta in zip(owners.items(), deltas):
        a = captured[name][0].detach()
        if f"{name}.weight" in s_dict:
            s_w = s_dict[f"{name}.weight"]                               # (k, out, in)
            projected = a @ s_w.reshape(-1, s_w.shape[-1]).T             # (n, k*out)
            result += (projected.reshape(len(x), k, -1) * delta[:, None, :]).sum(-1).T
        if f"{name}.bias" in s_dict:
            result += s_dict[f"{name}.bias"] @ delta.T                   # (k, n)
    return result


def influence_sweep(problem: InfluenceProblem, s_test: torch.Tensor, x: torch.Tensor,
                    y: torch.Tensor, chunk_size: int = 10000, show_progress: bool = True,
                    use_closed_form: bool = True, progress: Callable | None = None) -> torch.Tensor:
    """influence[t, i] = s_test[t] . grad L(z_i) for every training point, in chunks: (k, n).

    ``s_test`` is (k, p) = H^-1 grad L(test). When every chosen parameter belongs to an nn.Linear
    the closed form is used; otherwise per-sample gradients come chunk by chunk from closed forms
    per module (Conv2d, eval BatchNorm2d) or, for other modules, vmap(grad).
    """
    owners = linear_owners(problem) if use_closed_form else None
    s_test = s_test.detach()
    s_dict = problem.unflatten(s_test)
    out = []
    starts = range(0, len(x), chunk_size)
    bar = progress(starts, desc="influence sweep", unit="chunk", leave=False) if progress and show_progress else starts
    for s in bar:
        xb, yb = x[s:s + chunk_size], y[s:s + chunk_size]
        if owners is not None:
            out.append(_linear_sweep_chunk(problem, owners, s_dict, xb, yb))
        else:
            out.append(s_test @ problem.sample_grads(xb, yb, chunk_size=chunk_size).T)
    return torch.cat(out, dim=1)


def conv_position_influence(problem: InfluenceProblem, s_test: torch.Tensor, x: torch.Tensor,
                            y: torch.Tensor) -> torch.Tensor:
    """Where inside each training sample its influence sits: (n, H, W) maps over the conv output
    grid, map[i, h, w] = sum over the chosen conv layers of delta_i[:, h, w]^T (S_W a_bar_i[:, h, w]),
    S_W = the layer's block of ``s_test`` (p,) = H^-1 grad L(test), a_bar the unfolded input patch
    (+1 for the bias) at that output position.

    A conv gradient is a sum over output positions, G = sum_t delta_t a_bar_t^T, so the maps sum
    exactly to s_test . grad L(z_i) over the chosen parameters. Every chosen parameter must belong
    to an nn.Conv2d, and all of them must share one output size (e.g. FFDNet's 'same' 3x3 convs).
    """
    owners = capturable_owners(problem)
    if owners is None or not all(layer_rule(m).spatial for m in owners.values()):
        raise ValueError("per-position influence needs every chosen parameter to belong to an nn.Conv2d")
    blocks = problem.unflatten(s_test.detach()[None])
    captured, deltas = problem.capture(owners, x, y, problem.sample_loss)
    total = None
    for (name, module), delta in zip(owners.items(), deltas):
        a = unfold_patches(captured[name][0].detach(), module)                        # (n, in*kh*kw, L)
        projected = blocks[f"{name}.weight"][0].flatten(1) @ a                         # (n, out, L)
        if f"{name}.bias" in blocks:
            projected = projected + blocks[f"{name}.bias"][0][:, None]
        part = (projected * delta.detach().flatten(2)).sum(1).reshape(len(x), *delta.shape[2:])
        if total is not None and part.shape != total.shape:
            raise ValueError(f"per-position influence: {name} has output size {tuple(part.shape[1:])}, "
                             f"other layers {tuple(total.shape[1:])}")
        total = part if total is None else total + part
    return total
