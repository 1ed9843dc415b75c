"""FFDNet training (the original recipe: MSE, Adam, orthogonal init) with Method-1 gradient norms."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

import utils_if
import utils_option as opt
from ffdnet_test import metrics
from ffdnet_test.datasets import PatchSet, draw_noise
from ffdnet_test.model import FFDNet
from options.blocks import Ffdnet



@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> None:
    """Re-estimate BatchNorm running statistics as a plain average over ``batches`` of inputs
    ((x, sigma) pairs) with the current weights ("precise BN"); the momentum-0.1 running averages
    lag behind weights that change quickly."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        return
    was_training = model.training
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x, sigma in batches:
        model(x, sigma)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.train(was_training)


def _noisy_batches(clean_all: torch.Tensor, fixed, cfg: Ffdnet, generator: torch.Generator,
                   device: torch.device):
    """``bn_recalibrate_batches`` random training batches (x + noise, sigma), as in training."""
    for _ in range(cfg.bn_recalibrate_batches):
        idx = torch.randint(len(clean_all), (cfg.batch_size,), generator=generator)
        clean = clean_all[idx.to(device)]
        if fixed is not None:
            yield clean + fixed[1][idx].to(device), fixed[0][idx].to(device)
        else:
            sigma, noise = draw_noise(len(idx), tuple(clean.shape[1:]), tuple(cfg.sigma), generator)
            yield clean + noise.to(device), sigma.to(device)


@torch.no_grad()
def validate(model: FFDNet, images: list[torch.Tensor], sigma255: float, seed: int,
             device: torch.device, to_model=lambda x: x) -> float:
    """Mean PSNR (dB) over full images at noise ``sigma255`` (seeded, 8-bit quantised input)."""
    from ffdnet_test.common import noisy_test_image
    was_training = model.training
    model.eval()
    scores = []
    for k, clean in enumerate(images):
        noisy = noisy_test_image(clean, sigma255, seed + k, is_clip=True)
        out = model(to_model(noisy)[None].to(device), torch.tensor([sigma255 / 255.0], device=device))
        scores.append(metrics.psnr(metrics.to_uint8(to_model(out[0].cpu())), metrics.to_uint8(clean)))
    model.train(was_training)
    return float(np.mean(scores))


def train_ffdnet(model: FFDNet, patches: PatchSet, cfg: Ffdnet, device: torch.device,
                 fixed: tuple[torch.Tensor, torch.Tensor] | None = None, grad_mode: str | None = None,
                 layers: tuple[int, ...] = (), val_images: list[torch.Tensor] | None = None,
                 to_model=lambda x: x, on_epoch=None, show_progress: bool = True):
    """Train ``model`` on the patches; return (model, {layer: (P, out) float64 norms} or None,
    history). Noise: ``fixed`` = (sigma, noise) per patch, else a fresh seeded draw every step.

    Method-1 norms of conv layer L (the original's numbering), per patch, per output channel: the
    L2 norm over input channels, summed over the 3x3 taps, summed over all epochs.
    ``batch``: of the batch-mean gradient, given to every patch of the batch (the report's);
    ``per_sample``: of each patch's own share of the gradient (times the batch size, so that it is
    on the scale of a single patch's loss gradient).
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.learning_rate)
    convs = {layer: model.main[model.conv_index(layer)] for layer in layers}
    n, batch = len(patches), cfg.batch_size
    norms = {layer: torch.zeros(n, conv.out_channels, dtype=torch.float64, device=device)
             for layer, conv in convs.items()} if grad_mode else None
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [conv.register_forward_hook(lambda m, i, o, key=layer: captured.__setitem__(key, (i[0], o)))
             for layer, conv in convs.items()] if grad_mode == "per_sample" else []
    clean_all = patches.clean.to(device)
    history = []
    steps = (n + batch - 1) // batch
    bar = opt.progress(total=cfg.epoch * steps, desc="FFDNet train", unit="step", disable=not show_progress)
    model.train()
    try:
        for epoch in range(cfg.epoch):
            if epoch in cfg.lr_decay_epochs:
                for group in optimizer.param_groups:
                    group["lr"] *= 0.1
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for start in range(0, n, batch):
                idx = order[start:start + batch]
                clean = clean_all[idx.to(device)]
                if fixed is not None:
                    sigma, noise = fixed[0][idx].to(device), fixed[1][idx].to(device)
                else:
                    sigma, noise = draw_noise(len(idx), tuple(clean.shape[1:]), tuple(cfg.sigma), generator)
                    sigma, noise = sigma.to(device), noise.to(device)
                loss = nn.functional.mse_loss(model(clean + noise, sigma), clean)
                outputs = [captured[layer][1] for layer in convs] if hooks else []
                grads = torch.autograd.grad(loss, params + outputs)
                for p, g in zip(params, grads):
                    p.grad = g
                if grad_mode == "batch":
                    for layer, conv in convs.items():
                        row = utils_if.conv_per_sample_channel_norms(conv.weight.grad[None])[0]
                        norms[layer].index_add_(0, idx.to(device),
                                                row.double().expand(len(idx), -1))
                elif grad_mode == "per_sample":
                    for (layer, conv), delta in zip(convs.items(), grads[len(params):]):
                        share = utils_if.conv_sample_weight_grads(captured[layer][0].detach(),
                                                                  delta * len(idx), conv)
                        norms[layer].index_add_(0, idx.to(device),
                                                utils_if.conv_per_sample_channel_norms(share).double())
                optimizer.step()
                total += loss.item() * len(idx)
                bar.update(1)
                if start // batch % 50 == 0:  # epoch, running loss and the last validation PSNR, as it goes
                    bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epoch}", loss=f"{total / (start + len(idx)):.5f}",
                                    psnr=f"{history[-1]['val_psnr']:.2f}" if history and "val_psnr" in history[-1]
                                    else "-", refresh=False)
            if cfg.bn_recalibrate_batches:
                recalibrate_batchnorm(model, _noisy_batches(clean_all, fixed, cfg, generator, device))
            record = {"epoch": epoch + 1, "train_loss": total / n}
            if val_images:
                record["val_psnr"] = validate(model, val_images, cfg.val_sigma, cfg.seed, device, to_model)
            history.append(record)
            bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epoch}", loss=f"{record['train_loss']:.5f}",
                            psnr=f"{record.get('val_psnr', float('nan')):.2f}")
            if on_epoch is not None:
                on_epoch(epoch + 1, model, record)
    finally:
        for hook in hooks:
            hook.remove()
        bar.close()
    model.eval()
    return model, norms, history
