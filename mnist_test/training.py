"""Training the MNIST MLP (the original recipe, seeded) with Method-1 gradient-norm accumulation.

Used by Train.py and the studies that retrain models. Data order comes from a seeded generator, so a
model is fully defined by (seed, data, settings).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import utils_if
import utils_option as opt
from mnist_test.datasets import MnistData
from mnist_test.model import LAYER_MODULES, mnist_model


def new_model(seed: int, device: torch.device) -> torch.nn.Module:
    """A freshly initialised MLP; the initial weights depend only on ``seed``."""
    torch.manual_seed(seed)
    return mnist_model().to(device)


def train_model(data: MnistData, cfg: dict, seed: int, device: torch.device,
                grad_mode: str | None = None, layers: tuple[str, ...] = ("fc1", "fc2", "fc3"),
                skip_first_epoch: bool = True, show_progress: bool = True, desc: str = "train"):
    """Train a fresh seeded MLP on ``data`` with NLL + SGD(lr, momentum, weight_decay).

    With ``grad_mode`` ("batch" or "per_sample") also accumulate, per training item, the row norms
    of each chosen layer's weight gradient (one value per output neuron), in float64:
    - batch: the norms of the batch-mean gradient, added to every item of the batch (the report);
    - per_sample: the exact norms of each item's own loss gradient, |delta_j| * ||input||.
    Weight decay is not part of the gradient (SGD adds it inside ``step``), as in the original.
    Returns (model, {layer: (n, out) float64 tensor} or None).
    """
    model = new_model(seed, device)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=cfg["learning_rate"], momentum=cfg["momentum"],
                                weight_decay=cfg["weight_decay"])
    generator = torch.Generator(device="cpu").manual_seed(seed)
    n, batch = len(data), cfg["batch_size"]
    weights = {name: model.get_submodule(LAYER_MODULES[name]).weight for name in layers}
    norms = {name: torch.zeros(n, w.shape[0], dtype=torch.float64, device=device)
             for name, w in weights.items()} if grad_mode else None
    steps_per_epoch = (n + batch - 1) // batch
    bar = opt.progress(total=cfg["epoch"] * steps_per_epoch, desc=desc, unit="step",
                       disable=not show_progress)
    for epoch in range(cfg["epoch"]):
        order = torch.randperm(n, generator=generator).to(device)
        record = grad_mode is not None and (epoch >= 1 or not skip_first_epoch)
        running = torch.zeros((), device=device)
        for step, start in enumerate(range(0, n, batch)):
            idx = order[start:start + batch]
            x, y = data.images[idx], data.labels[idx]
            if record and grad_mode == "per_sample":
                out, layer_io = model.forward_with_layers(x)
                loss = F.nll_loss(out, y)
                outputs = [layer_io[name][1] for name in layers]
                grads = torch.autograd.grad(loss, params + outputs)
                deltas = grads[len(params):]
                for name, delta in zip(layers, deltas):
                    # delta is d(batch-mean loss)/dz; times the batch size = each item's own delta
                    row = utils_if.per_sample_row_norms(delta * len(idx), layer_io[name][0].detach())
                    norms[name].index_add_(0, idx, row.to(torch.float64))
            else:
                loss = F.nll_loss(model(x), y)
                grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads[:len(params)]):
                p.grad = g
            if record and grad_mode == "batch":
                for name, w in weights.items():
                    row = utils_if.batch_row_norms(w.grad).to(torch.float64)
                    norms[name].index_add_(0, idx, row.expand(len(idx), -1))
            optimizer.step()
            running += loss.detach()
            if (step + 1) % 500 == 0 or start + batch >= n:
                bar.update(step + 1 - (bar.n - epoch * steps_per_epoch))
                bar.set_postfix(epoch=epoch + 1, loss=f"{running.item() / (step + 1):.4f}")
    bar.close()
    model.eval()
    return model, norms


def train_group(data: MnistData, jobs: list[dict], cfg: dict, device: torch.device,
                show_progress: bool = True, desc: str = "train group") -> list[dict]:
    """Train many independent MLPs at once (vmap over stacked parameters), each exactly as
    :func:`train_model` would train it alone: its own seed (init and data order), its own labels
    (``job["labels"]``, (n,) for all of ``data``, or None) and its own kept items
    (``job["keep"]``, original positions, or None for all).

    Models whose epoch is shorter (removals) skip the missing steps, and SGD with momentum and
    weight decay is applied per model with a mask, so every model follows its own trajectory.
    Returns one ``state_dict`` per job (on the CPU).
    """
    from torch.func import functional_call, grad, stack_module_state, vmap

    k_models, batch = len(jobs), cfg["batch_size"]
    models = [new_model(job["seed"], device) for job in jobs]
    params, _ = stack_module_state(models)
    template = mnist_model().to("meta")
    names = list(params)
    momentum_buf = {n: torch.zeros_like(p) for n, p in params.items()}
    kept = [torch.arange(len(data), device=device) if job.get("keep") is None
            else torch.as_tensor(job["keep"], device=device) for job in jobs]
    labels = torch.stack([data.labels if job.get("labels") is None else
                          torch.as_tensor(job["labels"], device=device) for job in jobs])
    sizes = [len(k) for k in kept]
    generators = [torch.Generator(device="cpu").manual_seed(job["seed"]) for job in jobs]

    def loss_fn(p, x, y, w):
        out = functional_call(template, p, (x,))
        nll = -out.gather(1, y[:, None]).squeeze(1)
        return (nll * w).sum() / w.sum().clamp_min(1.0)

    grads_fn = vmap(grad(loss_fn))
    max_steps = max((n + batch - 1) // batch for n in sizes)
    bar = opt.progress(total=cfg["epoch"] * max_steps, desc=desc, unit="step", disable=not show_progress)
    rows = torch.arange(k_models, device=device)[:, None]
    lr, mom, wd = cfg["learning_rate"], cfg["momentum"], cfg["weight_decay"]
    for epoch in range(cfg["epoch"]):
        # per model: its items in its own seeded order, padded to the longest epoch
        order = torch.zeros(k_models, max_steps * batch, dtype=torch.long, device=device)
        valid = torch.zeros(k_models, max_steps * batch, device=device)
        for m in range(k_models):
            perm = torch.randperm(sizes[m], generator=generators[m]).to(device)
            order[m, :sizes[m]] = kept[m][perm]
            valid[m, :sizes[m]] = 1.0
        for step in range(max_steps):
            cols = slice(step * batch, (step + 1) * batch)
            idx, w = order[:, cols], valid[:, cols]
            active = w.sum(1) > 0                                          # (K,)
            g = grads_fn(params, data.images[idx], labels[rows, idx], w)
            for n in names:
                d_p = g[n] + wd * params[n]
                buf = torch.where(_expand(active, d_p), mom * momentum_buf[n] + d_p, momentum_buf[n])
                momentum_buf[n] = buf
                params[n] = torch.where(_expand(active, d_p), params[n] - lr * buf, params[n])
            if step % 200 == 0 or step == max_steps - 1:
                bar.update(step + 1 - (bar.n - epoch * max_steps))
    bar.close()
    return [{n: params[n][m].detach().cpu().clone() for n in names} for m in range(k_models)]


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1, *([1] * (like.dim() - 1)))
