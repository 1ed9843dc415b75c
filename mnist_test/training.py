"""Training the MNIST MLP (the original recipe, seeded) with Method-1 gradient-norm accumulation.

Used by Train.py and the studies that retrain models. Data order comes from a seeded generator, so a
model is fully defined by (seed, data, settings).
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

import utils_if
import utils_option as opt
from mnist_test.datasets import MnistData
from mnist_test.model import LAYER_MODULES, mnist_model
from options.blocks import Mnist, SmoothnessCheck
from options.recipe import Recipe


def new_model(seed: int, device: torch.device, activation: str = "relu", logit_scale: float = 1.0) -> torch.nn.Module:
    """A freshly initialised MLP; the initial weights depend only on ``seed`` (not on the activation
    or the logit scale)."""
    torch.manual_seed(seed)
    return mnist_model(activation, logit_scale).to(device)


def epoch_orders(n: int, epochs: int, seed: int) -> torch.Tensor:
    """(epochs, n): each epoch's order of the training points, from one CPU generator seeded by
    ``seed`` (one randperm per epoch). Training and Method 3's replay read the order from here."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=generator) for _ in range(epochs)])


def sgd_run(recipe: "Recipe | Mnist | Mapping[str, Any]", n: int, device: torch.device,
            data_weights: torch.Tensor | None = None) -> utils_if.SgdRun:
    """The run :func:`train_model` makes with ``recipe`` on n points, as Method 3 replays it: its seed's
    data order, its learning rates, and the data weights acting in its attribution window."""
    recipe = Recipe.of(recipe)
    return utils_if.SgdRun(recipe.learning_rate, recipe.momentum, recipe.weight_decay, recipe.batch_size,
                           epoch_orders(n, recipe.epoch, recipe.seed).to(device), data_weights,
                           recipe.window_start(n), recipe.lr_schedule)


# what the verdict tells a user whose run is not smooth enough to attribute
SMOOTHNESS_REMEDY = 'train with mnist.recipe "attributable" or softplus (docs/results.md)'


def metasmoothness_said(data: MnistData, x_test: torch.Tensor, y_test: torch.Tensor, cfg: Mnist,
                        device: torch.device) -> dict:
    """:func:`metasmoothness` of the run of the ``mnist`` block, timed, with its one-line verdict printed
    (the question it answers named: the whole run or the attribution window)."""
    with opt.Timer() as timer:
        found = metasmoothness(data, x_test, y_test, cfg, device, cfg.method3)
    found["seconds"] = round(timer.seconds, 2)
    print(utils_if.verdict(found, SMOOTHNESS_REMEDY, question=Recipe.of(cfg).question(len(data)))
          + f" [{found['trainings']} trainings, {timer.seconds:.0f} s]", flush=True)
    return found


REPLAY_RECIPE = ("init: torch.manual_seed(seed); mnist_model(activation, logit_scale). order: epoch_orders(n, epoch, seed) "
                 "(torch.randperm(n) per epoch from a CPU generator seeded by seed). step: torch.optim.SGD "
                 "(lr, momentum, weight_decay) on sum_i w_i NLL_i / |B| over consecutive slices of batch_size; "
                 "lr of step s from lr_schedule (SgdRun.lr)")


def run_metagradient(data: MnistData, recipe: "Recipe | Mnist | Mapping[str, Any]", x_test: torch.Tensor,
                     y_test: torch.Tensor, device: torch.device, data_weights: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, utils_if.SgdRun]:
    """Method 3 for the run of ``recipe`` on ``data`` (with ``data_weights`` in its window): dF_t/dw
    (T, n) float64 of each test loss F_t, the run replayed from its seed (no trained model needed),
    and the run itself."""
    recipe = Recipe.of(recipe)
    run = sgd_run(recipe, len(data), device, data_weights)
    replay = utils_if.SgdReplay(new_model(recipe.seed, device, recipe.activation, recipe.logit_scale),
                                utils_if.nll_sample_loss, run, data.images, data.labels)
    trained = new_model(recipe.seed, device, recipe.activation, recipe.logit_scale)
    trained.load_state_dict(replay.forward(), strict=False)
    grads = utils_if.InfluenceProblem(trained, utils_if.nll_sample_loss, replay.names).sample_grads(x_test, y_test)
    return replay.metagradient(grads), run


def train_model(data: MnistData, recipe: "Recipe | Mnist | Mapping[str, Any]", device: torch.device,
                grad_mode: str | None = None, layers: tuple[str, ...] = ("fc1", "fc2", "fc3"),
                skip_first_epoch: bool = True, show_progress: bool = True, desc: str = "train",
                checkpoint_every: int = 0, on_checkpoint=None, data_weights: torch.Tensor | None = None):
    """Train a fresh MLP seeded by the recipe's seed on ``data`` with NLL + SGD(lr, momentum,
    weight_decay) of ``recipe`` (a :class:`Recipe`, or what :meth:`Recipe.of` reads).

    ``data_weights`` (n,) weight each image's loss: the batch loss is sum_i w_i NLL_i / |B|
    (:func:`utils_if.weighted_batch_loss`; None = the plain mean, the same model as w = 1 bit for
    bit). A point weighted 0 keeps its place in the order: the single-model counterfactual. The
    weights act in the recipe's attribution window (every step when it has none).

    With ``grad_mode`` ("batch" or "per_sample") also accumulate, per training item, the row norms
    of each chosen layer's weight gradient (one value per output neuron), in float64:
    - batch: the norms of the batch-mean gradient, added to every item of the batch (the report);
    - per_sample: the exact norms of each item's own loss gradient, |delta_j| * ||input||.
    Weight decay is not part of the gradient (SGD adds it inside ``step``), as in the original.
    Every ``checkpoint_every`` epochs (0 = never) ``on_checkpoint(epoch, state_dict)`` is called
    (TracIn sums over these checkpoints).
    Returns (model, {layer: (n, out) float64 tensor} or None).
    """
    recipe = Recipe.of(recipe)
    model = new_model(recipe.seed, device, recipe.activation, recipe.logit_scale)
    params = list(model.parameters())
    n, batch = len(data), recipe.batch_size
    run = sgd_run(recipe, n, device, data_weights)  # order, weights, window: as the replay reads them
    optimizer = torch.optim.SGD(params, lr=run.learning_rate, momentum=run.momentum, weight_decay=run.weight_decay)
    weights = {name: model.get_submodule(LAYER_MODULES[name]).weight for name in layers}
    norms = {name: torch.zeros(n, w.shape[0], dtype=torch.float64, device=device)
             for name, w in weights.items()} if grad_mode else None
    steps_per_epoch = (n + batch - 1) // batch
    bar = opt.progress(total=recipe.epoch * steps_per_epoch, desc=desc, unit="step",
                       disable=not show_progress)
    for epoch in range(recipe.epoch):
        record = grad_mode is not None and (epoch >= 1 or not skip_first_epoch)
        running = torch.zeros((), device=device)
        for step, start in enumerate(range(0, n, batch)):
            idx = run.batch(epoch * steps_per_epoch + step)
            x, y = data.images[idx], data.labels[idx]
            w = run.step_weights(epoch * steps_per_epoch + step, idx)
            optimizer.param_groups[0]["lr"] = run.lr(epoch * steps_per_epoch + step)
            if record and grad_mode == "per_sample":
                out, layer_io = model.forward_with_layers(x)
                loss = batch_loss(out, y, w)
                outputs = [layer_io[name][1] for name in layers]
                grads = torch.autograd.grad(loss, params + outputs)
                deltas = grads[len(params):]
                for name, delta in zip(layers, deltas):
                    # delta is d(batch loss)/dz; times |B| / w = each item's own delta (w = 0: none)
                    own = delta * len(idx) if w is None else torch.nan_to_num(delta * len(idx) / w[:, None])
                    row = utils_if.per_sample_row_norms(own, layer_io[name][0].detach())
                    norms[name].index_add_(0, idx, row.to(torch.float64))
            else:
                loss = batch_loss(model(x), y, w)
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
        if checkpoint_every and (epoch + 1) % checkpoint_every == 0 and on_checkpoint is not None:
            on_checkpoint(epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
    bar.close()
    model.eval()
    return model, norms


def batch_loss(log_probs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The training loss of a batch: mean NLL, or with data weights sum_i w_i NLL_i / |B|."""
    if weights is None:
        return F.nll_loss(log_probs, labels)
    return utils_if.weighted_batch_loss(utils_if.nll_sample_loss(log_probs, labels), weights)


def linear_stack(model: nn.Module) -> list[str]:
    """Names of the model's Linear layers in order when it is Linear (act Linear)* then log-softmax,
    act = ReLU or softplus (:func:`utils_if.mlp_layers`): the shapes the grouped trainer computes by hand."""
    if getattr(model, "logit_scale", 1.0) != 1.0:  # the scale is computed by hand below: check the rest
        model = copy.deepcopy(model)
        model.main = model.main[:-1]
    found = utils_if.mlp_layers(model)
    layers = found[0] if found is not None else None
    if layers is None:
        raise ValueError("train_group computes Linear-ReLU stacks with a log-softmax by hand; the MNIST model "
                         "has another shape now: extend train_group or train the models one by one")
    return layers


def train_group(data: MnistData, jobs: list[dict], recipe: "Recipe | Mnist | Mapping[str, Any]", device: torch.device,
                show_progress: bool = True, desc: str = "train group") -> list[dict]:
    """Train many independent MLPs at once with ``recipe``, each exactly as :func:`train_model` trains it alone:
    its own seed (init and data order), its own labels (``job["labels"]``: (n,) for all of
    ``data``, or None), its own kept items (``job["keep"]``: original positions, or None) and its
    own data weights (``job["weights"]``: (n,) for all of ``data``, or None; the batch loss is then
    sum_i w_i NLL_i / |B|, as :func:`batch_loss`, in the recipe's attribution window on all of ``data``).
    All jobs of a group must keep the same number of items (group removals by N).

    The K models run as one batched MLP: forward and backward by hand with ``bmm`` over the
    Linear layers of the model's ``main`` (:func:`utils_if.grouped_gradients`, the hand-written MLP's
    grouped form; the shape is read from the model: Linear layers with ReLU or softplus between them,
    log-softmax and mean NLL at the end; anything else is refused), then SGD with momentum and weight
    decay in place, as ``torch.optim.SGD`` does. Each job's order and learning rates come from its
    :func:`sgd_run`, the one definition Train.py's trainer and Method 3's replay read too; the window's
    first step is the recipe's on all of ``data`` (a job that keeps fewer items keeps their steps).
    Returns one ``state_dict`` per job (on the CPU).
    """
    recipe = Recipe.of(recipe)
    k_models, batch = len(jobs), recipe.batch_size
    kept = [torch.arange(len(data), device=device) if job.get("keep") is None
            else torch.as_tensor(job["keep"], device=device) for job in jobs]
    n = len(kept[0])
    if any(len(k) != n for k in kept):
        raise ValueError("train_group: every job of a group must keep the same number of items")
    labels = torch.stack([data.labels if job.get("labels") is None else
                          torch.as_tensor(job["labels"], device=device) for job in jobs])
    weighted = any(job.get("weights") is not None for job in jobs)
    data_weights = torch.stack([torch.ones(len(data), device=device) if job.get("weights") is None else
                                torch.as_tensor(job["weights"], dtype=torch.float32, device=device)
                                for job in jobs]) if weighted else None
    activation, scale = recipe.activation, recipe.logit_scale
    models = [new_model(job["seed"], device, activation, scale) for job in jobs]
    layers = linear_stack(models[0])
    names = [f"{layer}.{kind}" for layer in layers for kind in ("weight", "bias")]
    params = {name: torch.stack([dict(m.named_parameters())[name].detach() for m in models]).contiguous()
              for name in names}
    buffers = {name: torch.zeros_like(p) for name, p in params.items()}
    # each job's run as train_model and the replay define it: its seed's order (over its kept items), the window
    first_weighted = recipe.window_start(len(data))  # the window's first step on all of data
    runs = [sgd_run(recipe.replace(seed=job["seed"], window=0), n, device) for job in jobs]
    orders = torch.stack([kept[m][run.orders] for m, run in enumerate(runs)])   # (K, epochs, n)
    rows = torch.arange(k_models, device=device)[:, None]
    mom, wd = runs[0].momentum, runs[0].weight_decay
    weights = [params[f"{layer}.weight"] for layer in layers]
    biases = [params[f"{layer}.bias"] for layer in layers]
    steps = (n + batch - 1) // batch
    bar = opt.progress(total=recipe.epoch * steps, desc=desc, unit="step", disable=not show_progress)
    first_step = True
    for epoch in range(recipe.epoch):
        for start in range(0, n, batch):
            step = epoch * steps + start // batch
            in_window, lr = step >= first_weighted, runs[0].lr(step)
            idx = orders[:, epoch, start:start + batch]                           # (K, B)
            sample_weights = data_weights[rows, idx] if data_weights is not None and in_window else None
            grad_w, grad_b = utils_if.grouped_gradients(weights, biases, data.images[idx], labels[rows, idx],
                                                        activation, scale, sample_weights)
            grads = {name: g for i in range(len(layers)) for name, g in
                     ((names[2 * i], grad_w[i]), (names[2 * i + 1], grad_b[i]))}
            for name in names:  # SGD: buf = mom*buf + (g + wd*p); p -= lr*buf
                p, buf, g = params[name], buffers[name], grads[name]
                if first_step:
                    buf.copy_(g).add_(p, alpha=wd)
                else:
                    buf.mul_(mom).add_(g).add_(p, alpha=wd)
                p.sub_(buf, alpha=lr)
            first_step = False
            if (start // batch) % 500 == 0:
                bar.update(start // batch + 1 - (bar.n - epoch * steps))
        bar.update((epoch + 1) * steps - bar.n)
    bar.close()
    return [{name: params[name][m].detach().cpu().clone() for name in names} for m in range(k_models)]


def metasmoothness(data: MnistData, x_test: torch.Tensor, y_test: torch.Tensor, cfg: Mnist, device: torch.device,
                   m3: SmoothnessCheck) -> dict:
    """Is this run smooth in its data weights? The run of the ``mnist`` block (its seed and order) retrained with
    the data weights of :func:`utils_if.weight_sets` (1 + 2 x method3.smoothness_directions trainings,
    side by side in one group), then S_hat and the curvature of the test losses
    (:mod:`influence.smoothness`)."""
    from influence import smoothness

    def train(weight_sets: list[torch.Tensor]):
        jobs = [{"seed": cfg.seed, "weights": w.float()} for w in weight_sets]
        states = train_group(data, jobs, cfg, device, desc="metasmoothness")
        finals = [torch.cat([state[name].reshape(-1) for name in state]) for state in states]
        outputs = []
        for state in states:
            model = new_model(cfg.seed, device, cfg.activation, cfg.logit_scale)
            model.load_state_dict(state)
            with torch.no_grad():
                outputs.append(utils_if.nll_sample_loss(model(x_test), y_test).double().cpu())
        return finals, outputs
    return smoothness.measure(train, len(data), m3.smoothness_directions, m3.smoothness_step, cfg.seed)
