"""Method 1 (the report's): gradient-norm vectors of every training point, scored against a test
point's activations, score(t, i) = sum over layers l of a_l(t) . G_l[i]."""
from __future__ import annotations

import torch


def batch_row_norms(weight_grad: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 norm (over the input axis) of a Linear weight gradient: one value per output.

    The report's ``batch`` mode gives this norm of the batch-mean gradient to every batch member.
    """
    return weight_grad.norm(dim=1)


def per_sample_row_norms(output_grad: torch.Tensor, layer_input: torch.Tensor) -> torch.Tensor:
    """Exact per-example row norms of a Linear layer's weight gradient, shape (B, out).

    Row j of example b's weight gradient is ``delta[b, j] * input[b]``, so its norm is
    ``|delta[b, j]| * ||input[b]||``: no per-example gradient is materialised. ``output_grad`` is
    the gradient of each example's own loss at the layer output (delta).
    """
    return output_grad.abs() * layer_input.norm(dim=1, keepdim=True)


def conv_per_sample_channel_norms(per_sample_weight_grad: torch.Tensor) -> torch.Tensor:
    """Per-example conv gradient norms as Method 1 uses them: (B, out, in, kh, kw) -> (B, out).

    The L2 norm over input channels for each output channel and kernel tap, summed over the taps.
    """
    return per_sample_weight_grad.norm(dim=2).sum(dim=(-2, -1))


def method1_scores(activations: dict[str, torch.Tensor], grad_norms: dict[str, torch.Tensor]
                   ) -> torch.Tensor:
    """Score of every training point for every test point: sum over layers of a_l . G_l[i].

    ``activations[l]`` is (k, d_l) for k test points, ``grad_norms[l]`` is (n, d_l); the result is
    (k, n), one matrix product per layer.
    """
    scores = None
    for layer, act in activations.items():
        g = grad_norms[layer]
        part = act.to(g.dtype) @ g.T
        scores = part if scores is None else scores + part
    if scores is None:
        raise ValueError("method1_scores needs at least one layer")
    return scores


def normalize_rows(grad_norms: torch.Tensor) -> torch.Tensor:
    """Method 1 "normalized" mode: each training point's vector divided by its sum (L1)."""
    return grad_norms / grad_norms.sum(dim=1, keepdim=True).clamp_min(1e-30)


def outliers(grad_norms: torch.Tensor, limit: float) -> torch.Tensor:
    """Method 1 "remove_out" mode: training points whose total gradient norm exceeds ``limit``."""
    return grad_norms.sum(dim=1) > limit
