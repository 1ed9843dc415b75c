"""The layer rules: for each kind of module, how its input a and the gradient delta at its output give
per-sample parameter gradients and the Kronecker view (K-FAC/EK-FAC factors, per-position influence).

A module whose parameters an attribution covers needs a rule here; adding a layer type is one
:class:`LayerRule` subclass and one entry in :data:`RULES`. Every other module asks :func:`layer_rule`.

    Linear:      grad W_b = delta_b a_b^T (rank one),   grad b_b = delta_b
    Conv2d:      grad W_b = sum over output positions t of delta_b,t abar_b,t^T, abar = the unfolded patch
    BatchNorm2d: (eval mode) grad gamma_b = sum_t delta_b,t * (a_b,t - mu) / sqrt(var + eps),  grad beta_b = sum_t delta_b,t
"""
from __future__ import annotations

import torch
from torch import nn


def unfold_patches(layer_input: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The input patch under every output position of ``conv``: (B, in*kh*kw, L), L the output positions."""
    return nn.functional.unfold(layer_input, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                                stride=conv.stride)


def conv_sample_weight_grads(layer_input: torch.Tensor, output_grad: torch.Tensor,
                             conv: nn.Conv2d) -> torch.Tensor:
    """Each sample's share of a conv layer's weight gradient, (B, out, in, kh, kw).

    grad_W = sum over samples b of delta_b (x) unfold(input_b); the b-th term is returned. With no
    coupling between samples (no train-mode BN) it is exactly the gradient of sample b's loss
    term; with train-mode BN it is the standard per-sample decomposition of the batch gradient.
    """
    cols = unfold_patches(layer_input, conv)                                       # (B, in*k*k, L)
    grads = torch.einsum("bol,bkl->bok", output_grad.flatten(2), cols)             # (B, out, in*k*k)
    return grads.reshape(len(layer_input), *conv.weight.shape)


class LayerRule:
    """One kind of module. ``kronecker``: it has a Kronecker view (K-FAC, EK-FAC, per-position maps);
    ``rank_one``: a sample's weight gradient is one outer product (closed-form sweeps, TRAK's projection);
    ``spatial``: the gradient is a sum over an output grid (per-position influence maps)."""
    module_type: type = nn.Module
    kronecker = False
    rank_one = False
    spatial = False

    def owns(self, module: nn.Module) -> bool:
        """Whether this rule covers ``module`` (its closed forms hold for it)."""
        return isinstance(module, self.module_type)

    def weight_grads(self, module: nn.Module, layer_input: torch.Tensor, output_grad: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample weight gradient, the output gradient summed to the bias's shape)."""
        raise NotImplementedError

    def patches(self, module: nn.Module, layer_input: torch.Tensor, output_grad: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The Kronecker view: (inputs (b, L, d), output gradients (b, L, out)) over L positions."""
        raise ValueError(f"{type(module).__name__} has no Kronecker view")


class LinearRule(LayerRule):
    module_type = nn.Linear
    kronecker = True
    rank_one = True

    def weight_grads(self, module, layer_input, output_grad):
        return torch.einsum("bo,bi->boi", output_grad, layer_input), output_grad

    def patches(self, module, layer_input, output_grad):
        return layer_input[:, None], output_grad[:, None]


class Conv2dRule(LayerRule):
    module_type = nn.Conv2d
    kronecker = True
    spatial = True

    def owns(self, module):
        return isinstance(module, nn.Conv2d) and module.groups == 1

    def weight_grads(self, module, layer_input, output_grad):
        return conv_sample_weight_grads(layer_input, output_grad, module), output_grad.sum(dim=(2, 3))

    def patches(self, module, layer_input, output_grad):
        return (unfold_patches(layer_input, module).transpose(1, 2),                # (b, L, in*kh*kw)
                output_grad.flatten(2).transpose(1, 2))                             # (b, L, out)


class BatchNorm2dRule(LayerRule):
    """Eval mode only: an affine map of the input normalised by the running statistics."""
    module_type = nn.BatchNorm2d

    def owns(self, module):
        return isinstance(module, nn.BatchNorm2d) and not module.training and module.track_running_stats

    def weight_grads(self, module, layer_input, output_grad):
        normalised = (layer_input - module.running_mean[None, :, None, None]) / torch.sqrt(
            module.running_var[None, :, None, None] + module.eps)
        return (output_grad * normalised).sum(dim=(2, 3)), output_grad.sum(dim=(2, 3))


RULES: tuple[LayerRule, ...] = (LinearRule(), Conv2dRule(), BatchNorm2dRule())


def layer_rule(module: nn.Module | None) -> LayerRule | None:
    """The rule that covers ``module``, or None."""
    return next((rule for rule in RULES if module is not None and rule.owns(module)), None)


def module_sample_grads(name: str, module: nn.Module, layer_input: torch.Tensor,
                        output_grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """Closed-form per-sample gradients of one module's parameters from its input and the
    gradient of the summed per-sample losses at its output (samples must not interact)."""
    weight, bias = layer_rule(module).weight_grads(module, layer_input, output_grad)
    grads = {f"{name}.weight": weight}
    if getattr(module, "bias", None) is not None:
        grads[f"{name}.bias"] = bias
    return grads


def capturable_owners(problem) -> dict[str, nn.Module] | None:
    """Modules owning the chosen parameters (of an :class:`InfluenceProblem`) if a rule covers every
    one of them (closed-form per-sample gradients), else None."""
    owners: dict[str, nn.Module] = {}
    modules = dict(problem.model.named_modules())
    for name in problem.param_names:
        module_name, _, kind = name.rpartition(".")
        module = modules.get(module_name)
        if layer_rule(module) is None or kind not in ("weight", "bias"):
            return None
        owners[module_name] = module
    return owners


def linear_owners(problem) -> dict[str, nn.Linear] | None:
    """The modules owning the chosen parameters if every one is rank one (Linear), else None."""
    owners = capturable_owners(problem)
    if owners is None or not all(layer_rule(m).rank_one for m in owners.values()):
        return None
    return owners


def kronecker_owners(problem) -> dict[str, nn.Module]:
    """The modules with a Kronecker view owning the chosen parameters (each with its weight chosen),
    or a ValueError naming the parameter that another kind of module owns."""
    owners = capturable_owners(problem) or {}
    modules = dict(problem.model.named_modules())
    for name in problem.param_names:
        module_name = name.rpartition(".")[0]
        rule = layer_rule(modules.get(module_name))
        if rule is None or not rule.kronecker or module_name not in owners:
            raise ValueError(f"kfac/ekfac cover nn.Linear and nn.Conv2d parameters only; {name} belongs to "
                             f"{type(modules.get(module_name)).__name__}: leave it out of params")
    for module_name in owners:
        if f"{module_name}.weight" not in problem.params:
            raise ValueError(f"kfac/ekfac take a layer's weight with its bias; {module_name}.weight is not chosen")
    return owners
