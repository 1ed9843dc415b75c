"""The one hand-written MLP: forward, backward and exact Hessian-vector products of a ReLU or softplus MLP
with NLL loss by the R-operator, used by LiSSA, Method 3's SgdReplay and checked against autograd; and
the same forward and backward for K models at once (:func:`grouped_gradients`), the grouped trainer's step."""
from __future__ import annotations

import torch
from torch import nn

from influence.problem import InfluenceProblem


def _softplus_slope(z: torch.Tensor) -> torch.Tensor:
    return torch.where(z > 20.0, torch.ones_like(z), torch.sigmoid(z))  # F.softplus is z itself above 20


def _softplus_curvature(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return torch.where(z > 20.0, torch.zeros_like(z), s * (1.0 - s))


# activation -> (module, function, slope a'(z), curvature a''(z) or None where it is 0 almost everywhere)
MLP_ACTIVATIONS = {"relu": (nn.ReLU, torch.relu, lambda z: (z > 0).to(z.dtype), None),
                   "softplus": (nn.Softplus, nn.functional.softplus, _softplus_slope, _softplus_curvature)}


def mlp_layers(model: nn.Module) -> tuple[list[str], str] | None:
    """(names of the Linear modules, activation) of an MLP with log-probability output, or None.

    Recognised from the model's leaf modules in registration order: Linear (act Linear)* LogSoftmax,
    act one ReLU or default softplus (beta 1, threshold 20) throughout, the first Linear reading the
    flattened input. Registration order need not be the forward's order, so whoever uses this shape
    checks a product against autograd first (``lissa`` and ``SgdReplay`` do)."""
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    kinds = [type(m) for _, m in leaves]
    n_linear = len(kinds) // 2
    for activation, (module, *_rest) in MLP_ACTIVATIONS.items():
        expected = [nn.Linear if i % 2 == 0 else module for i in range(2 * n_linear - 1)] + [nn.LogSoftmax]
        default = all(m.beta == 1 and m.threshold == 20 for _, m in leaves if isinstance(m, nn.Softplus))
        if n_linear >= 1 and kinds == expected and default:
            return [name for name, m in leaves if isinstance(m, nn.Linear)], activation
    return None


def relu_mlp_layers(model: nn.Module) -> list[str] | None:
    """Names of the Linear modules of a ReLU MLP with log-probability output (:func:`mlp_layers`), or None."""
    found = mlp_layers(model)
    return found[0] if found is not None and found[1] == "relu" else None


class MlpHvp:
    """Exact Hessian-vector products of the batch-mean NLL of a ReLU (or softplus) MLP, by hand, for
    many batches and many vectors in one set of batched matmuls (Pearlmutter's R-operator).

    With a_0 = x, z_l = a_{l-1} W_l^T + b_l, a_l = act(z_l), log-softmax on z_L and g_l = dLoss/dz_l,
    a tangent (V_l, c_l) gives

        R z_l = R a_{l-1} W_l^T + a_{l-1} V_l^T + c_l,    R a_l = R z_l * act'(z_l)   (R a_0 = 0)
        R g_L = (p * R z_L - p (p . R z_L)) / B           (p = softmax(z_L), B = batch size)
        R g_{l-1} = (R g_l W_l + g_l V_l) * act'(z_{l-1}) + (g_l W_l) * act''(z_{l-1}) * R z_{l-1}
        [H v]_{W_l} = R g_l^T a_{l-1} + g_l^T R a_{l-1},  [H v]_{b_l} = sum over the batch of R g_l

    (act' = [z > 0] and act'' = 0 almost everywhere for ReLU; act' = sigmoid, act'' = sigmoid (1 - sigmoid)
    for softplus). The first layer's weight is left to the
    caller: :meth:`apply` takes ``x V_1^T`` as ``first_pre`` and returns ``R g_1``, whose product with
    the batch, ``R g_1^T x``, is the W_1 block. LiSSA folds that block over many steps into a few large
    matmuls (:func:`_lissa_relu_mlp`). The L2 term is not included.
    """

    def __init__(self, problem: InfluenceProblem, layer_names: list[str], activation: str = "relu") -> None:
        _, self.act, self.slope, self.curvature = MLP_ACTIVATIONS[activation]
        self.weight_names = [f"{n}.weight" for n in layer_names]
        self.bias_names = [f"{n}.bias" for n in layer_names]
        self.set_parameters({**problem.params, **problem.frozen})
        self.selected = set(problem.param_names)

    def set_parameters(self, params: dict[str, torch.Tensor]) -> None:
        """Take the weights and biases from ``params`` (Method 3 moves them along a training run)."""
        self.weights = [params[n] for n in self.weight_names]
        self.biases = [params[n] for n in self.bias_names]

    def batch_state(self, x: torch.Tensor, y: torch.Tensor, sample_weights: torch.Tensor | None = None) -> dict:
        """Forward and backward of r batches at once: x (r, B, d), y (r, B). With ``sample_weights``
        (r, B) the loss is the data-weighted sum / B (Method 3's training loss), else the mean."""
        a, z = [x], []
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            z.append(nn.functional.linear(a[-1], w, b))
            if i < len(self.weights) - 1:
                a.append(self.act(z[-1]))
        probs = torch.softmax(z[-1], dim=-1)
        residual = probs - nn.functional.one_hot(y.long(), probs.shape[-1]).to(probs.dtype)  # d loss_i / d z_L
        scale = (x.new_full(y.shape, 1.0) if sample_weights is None else sample_weights.to(x.dtype))[..., None] / x.shape[1]
        g = [residual * scale]
        slopes = [self.slope(zi) for zi in z[:-1]]
        bends: list[torch.Tensor | None] = [None] * len(slopes)                # (g_l W_l) * act''(z_{l-1})
        for i in reversed(range(1, len(self.weights))):
            back = g[0] @ self.weights[i]
            if self.curvature is not None:
                bends[i - 1] = back * self.curvature(z[i - 1])
            g.insert(0, back * slopes[i - 1])
        return {"a": a, "masks": slopes, "bends": bends, "probs": probs, "g": g,
                "residual": residual, "scale": scale}

    def apply(self, state: dict, first_pre: torch.Tensor | None, tangents: dict[str, torch.Tensor]
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Tangents (r, k, *shape) for the chosen parameters except the first weight, and its
        contribution ``first_pre`` = x V_1^T (r, k, B, n_1) -> (R g_1 (r, k, B, n_1), the other
        chosen parameters' blocks of H v, each (r, k, *shape))."""
        rg, out, _ = self.apply_with_logits(state, first_pre, tangents)
        return rg, out

    def apply_with_logits(self, state: dict, first_pre: torch.Tensor | None, tangents: dict[str, torch.Tensor]
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`apply`, plus R z_L (r, k, B, C): the tangent of the logits, whose product with
        each sample's residual p - onehot is that sample's directional derivative v . grad loss_i."""
        a, masks, g = state["a"], state["masks"], state["g"]
        bias0 = tangents.get(self.bias_names[0])
        rz = first_pre if first_pre is not None else torch.zeros(
            *next(iter(tangents.values())).shape[:2], *a[0].shape[1:2], self.weights[0].shape[0],
            dtype=a[0].dtype, device=a[0].device)
        if bias0 is not None:
            rz = rz + bias0[:, :, None, :]
        ra, rzs = [None], []
        for i in range(1, len(self.weights)):
            rzs.append(rz)
            ra.append(rz * masks[i - 1][:, None])
            rz = ra[i] @ self.weights[i].T
            if self.weight_names[i] in tangents:
                rz = rz + a[i][:, None] @ tangents[self.weight_names[i]].transpose(-1, -2)
            if self.bias_names[i] in tangents:
                rz = rz + tangents[self.bias_names[i]][:, :, None, :]
        p = state["probs"][:, None]
        logit_tangent = rz
        rg = (p * rz - p * (p * rz).sum(-1, keepdim=True)) * state["scale"][:, None]
        out: dict[str, torch.Tensor] = {}
        for i in reversed(range(len(self.weights))):
            if i and self.weight_names[i] in self.selected:
                out[self.weight_names[i]] = (rg.transpose(-1, -2) @ a[i][:, None]
                                             + g[i][:, None].transpose(-1, -2) @ ra[i])
            if self.bias_names[i] in self.selected:
                out[self.bias_names[i]] = rg.sum(-2)
            if i:
                back = rg @ self.weights[i]
                if self.weight_names[i] in tangents:
                    back = back + g[i][:, None] @ tangents[self.weight_names[i]]
                rg = back * masks[i - 1][:, None]
                if state["bends"][i - 1] is not None:
                    rg = rg + state["bends"][i - 1][:, None] * rzs[i - 1]
        return rg, out, logit_tangent

    def hvp(self, problem: InfluenceProblem, x: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """H v of one batch (x, y) for (k, p) flat vectors of ``problem``, unfolded (the first
        weight's block as x V_1^T in and R g_1^T x out); without the L2 term."""
        v = problem.unflatten(vectors.detach())
        first = self.weight_names[0]
        flat = x.reshape(1, len(x), -1)
        first_pre = flat[:, None] @ v[first][None].transpose(-1, -2) if first in v else None
        rg, out = self.apply(self.batch_state(flat, y[None]), first_pre,
                             {n: t[None] for n, t in v.items() if n != first})
        if first in v:
            out[first] = rg.transpose(-1, -2) @ flat[:, None]
        return problem.flatten({n: t[0] for n, t in out.items()}, batch_dims=1)


def grouped_gradients(weights: list[torch.Tensor], biases: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                      activation: str, logit_scale: float = 1.0, sample_weights: torch.Tensor | None = None
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The gradients of K MLPs' batch losses at once, by hand: weights[l] (K, n_l, n_{l-1}), biases[l]
    (K, n_l), x (K, B, d), y (K, B) -> ([dW_l (K, n_l, n_{l-1})], [db_l (K, n_l)]).

    With a_0 = x, z_l = a_{l-1} W_l^T + b_l, a_l = act(z_l), logits c z_L and the loss mean NLL (or,
    with ``sample_weights`` (K, B), sum_i w_i NLL_i / B): g_L = c (softmax(c z_L) - onehot(y)) w / B,
    g_{l-1} = (g_l W_l) * act'(z_{l-1}), dW_l = g_l^T a_{l-1}, db_l = sum over the batch of g_l, the
    notation of :class:`MlpHvp` (act' from :data:`MLP_ACTIVATIONS`, as its products use)."""
    _, act, slope, _ = MLP_ACTIVATIONS[activation]
    h, inputs, outputs = x, [], []
    for i, (w, b) in enumerate(zip(weights, biases)):
        inputs.append(h)
        z = torch.baddbmm(b[:, None, :], h, w.transpose(1, 2))
        outputs.append(z)
        h = act(z) if i < len(weights) - 1 else z
    if logit_scale != 1.0:
        h = h * logit_scale                                                   # logits = c z_L
    delta = torch.softmax(h, dim=2)                                           # d(mean NLL)/d logits
    delta.scatter_add_(2, y[..., None], torch.full_like(y[..., None], -1.0, dtype=delta.dtype))
    if logit_scale != 1.0:
        delta.mul_(logit_scale)                                               # d/d z_L = c d/d logits
    if sample_weights is not None:
        delta.mul_(sample_weights[..., None])
    delta.div_(x.shape[1])
    grad_w: list[torch.Tensor] = [None] * len(weights)  # type: ignore[list-item]
    grad_b: list[torch.Tensor] = [None] * len(weights)  # type: ignore[list-item]
    for i in reversed(range(len(weights))):
        grad_w[i] = torch.bmm(delta.transpose(1, 2), inputs[i])
        grad_b[i] = delta.sum(1)
        if i:
            delta = torch.bmm(delta, weights[i]).mul_(slope(outputs[i - 1]))
    return grad_w, grad_b


MLP_CHECK_TOLERANCE = 1e-3  # the hand-written products must match autograd to this relative error


def mlp_check(hand: list[torch.Tensor], reference: list[torch.Tensor], lead: str, fallback: str
              ) -> tuple[float, str | None]:
    """The hand-written MLP's products against autograd's on the same inputs: (the largest relative
    error, a one-line warning when it is above :data:`MLP_CHECK_TOLERANCE`, else None). ``lead`` names
    what was compared ("the hand-written MLP HVP differs from autograd"), ``fallback`` what runs instead.
    A pair whose reference is zero counts by the hand-written product's own size."""
    error = max(((a - b).norm() / b.norm()).item() if b.norm() > 0 else a.norm().item() * 1e30
                for a, b in zip(hand, reference))
    if error <= MLP_CHECK_TOLERANCE:
        return error, None
    return error, (f"{lead} by {error:.2g} (relative): the model is not the ReLU MLP its modules suggest; "
                   f"used {fallback}")
