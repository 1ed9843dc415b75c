"""Per-sample losses and model outputs (output, target) -> (B,): what an attribution differentiates."""
from __future__ import annotations

import torch
from typing import Callable


SampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (output, target) -> (B,) losses


def nll_sample_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample negative log-likelihood of log-probabilities (B, C) and labels (B,)."""
    return -output.gather(1, target.reshape(-1, 1).long()).squeeze(1)


def mse_sample_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over all non-batch dimensions."""
    return (output - target).pow(2).flatten(1).mean(dim=1)


def masked_mse_sample_loss(mask: torch.Tensor) -> SampleLoss:
    """Per-sample MSE restricted to the pixels where ``mask`` (broadcast to one sample) is 1."""
    weight = mask / mask.sum()

    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((output - target).pow(2) * weight).flatten(1).sum(dim=1)
    return loss


def trak_margin(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """TRAK's model output per sample: f = log(p_y / (1 - p_y)) = log p_y - logsumexp_{c != y} log p_c
    (from log-probabilities; stable where p_y is near 1)."""
    correct = output.gather(1, target[:, None]).squeeze(1)
    others = output.scatter(1, target[:, None], -torch.inf)
    return correct - torch.logsumexp(others, dim=1)


def weighted_batch_loss(sample_losses: torch.Tensor, sample_weights: torch.Tensor) -> torch.Tensor:
    """The training loss of one batch with data weights: sum_i w_i loss_i / |B|.

    |B| counts every member of the batch, weighted 0 or not, so that w = 1 everywhere is the plain
    mean (the same gradients, bit for bit) and a point weighted 0 keeps its place in the order."""
    return (sample_losses * sample_weights).sum() / len(sample_losses)


def negative_margin_sample_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Minus the margin: the best other class's output minus the correct class's (a loss-like target:
    lower is better, so that Method 3's sign convention is the loss's)."""
    correct = output.gather(1, target.reshape(-1, 1).long()).squeeze(1)
    others = output.scatter(1, target.reshape(-1, 1).long(), -torch.inf)
    return others.max(1).values - correct


def gauss_newton_loss(sample_loss: SampleLoss) -> SampleLoss:
    """The loss whose output Hessian the Gauss-Newton product uses. NLL is linear in the
    log-probabilities, so its own output Hessian is 0 and G would vanish; the curvature sits in the
    log-softmax. Since log_softmax(o) = o for log-probabilities o, NLL(log_softmax(o)) is the same loss
    with the Hessian diag(p) - p p^T: G is then J_z^T (diag(p) - p p^T) J_z at the logits z (the
    log-softmax's Jacobian I - 1 p^T drops out against it). Any other loss is used as it is."""
    if sample_loss is nll_sample_loss:
        return lambda output, target: nll_sample_loss(torch.log_softmax(output, dim=-1), target)
    return sample_loss
