"""Method 3 through an Adam run (FFDNet's fine-tuning): the exact metagradient by reverse mode."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from influence.losses import SampleLoss, weighted_batch_loss
from influence.replay import AdamRun, Replay, step_bar


class AdamReplay(Replay):
    """Method 3 through an Adam run (the FFDNet fine-tuning): d F(theta_T) / d w_i for every training
    point's data weight, exactly, by reverse mode through every step (Ilyas & Engstrom 2025 do Adam too).

    The run (torch.optim.Adam, step t = 1..T, g_t = grad L_t(theta_{t-1}), L_t = sum_{i in B_t} w_i l_i / |B|):

        m_t = b1 m_{t-1} + (1 - b1) g_t,    v_t = b2 v_{t-1} + (1 - b2) g_t^2,
        theta_t = theta_{t-1} - c1_t m_t / d_t,   d_t = sqrt(v_t) c2_t + eps
                                                  (eps_root: d_t = sqrt(c2_t^2 v_t + eps_root) + eps),
        c1_t = lr_t / (1 - b1^t),   c2_t = 1 / sqrt(1 - b2^t)   (lr_t: the run's schedule, AdamRun.lr).

    Walking back from A = grad F(theta_T), M = V = 0 (the adjoints of theta_t, m_t, v_t), each step does

        M += -A c1_t / d_t,     V += A c1_t c2_t m_t / (2 d_t^2 sqrt(v_t))     (0 where v_t = 0;
                                eps_root: V += A c1_t c2_t^2 m_t / (2 d_t^2 sqrt(c2_t^2 v_t + eps_root))),
        G  = (1 - b1) M + 2 (1 - b2) g_t V                                      (= dF/dg_t),
        dF/dw_i += G . grad l_i(theta_{t-1}) / |B|  for i in B_t,
        A += H_t G,   M *= b1,   V *= b2,

    H_t the Hessian of L_t at theta_{t-1}. Both products come from one jvp of grad (torch.func, vmapped
    over the k targets), with the per-sample losses as aux: no per-sample gradient is formed, for any
    model (Conv2d included). ``inputs`` are the model's inputs, each indexed by the batch (FFDNet:
    (noisy, sigma)); ``targets`` the loss's. Memory (:meth:`state_floats`): (theta, m, v) every
    ``checkpoint_interval`` steps and, per step of one segment, theta, m, v and the gradient (4p
    floats), plus 3kp for the adjoints.
    """

    def __init__(self, model: nn.Module, sample_loss: SampleLoss, run: AdamRun, inputs: tuple[torch.Tensor, ...],
                 targets: torch.Tensor) -> None:
        self.model, self.sample_loss, self.run, self.inputs, self.targets = model, sample_loss, run, inputs, targets
        self._keep(model, [n for n, p in model.named_parameters() if p.requires_grad])
        self.frozen = {**{n: p.detach() for n, p in model.named_parameters() if n not in self.names},
                       **dict(model.named_buffers())}
        self.info: dict = {"path": "torch_func"}

    def _batch(self, step: int):
        idx = self.run.batch(step)
        weights = None if self.run.data_weights is None else self.run.data_weights[idx]
        return tuple(t[idx] for t in self.inputs), self.targets[idx], weights

    def _loss(self, params: dict, inputs, target, weights):
        losses = self.sample_loss(functional_call(self.model, {**params, **self.frozen}, inputs), target)
        return (losses.mean() if weights is None else weighted_batch_loss(losses, weights)), losses

    def _steps(self, start: int, stop: int, state: tuple, store: torch.Tensor | None = None) -> tuple:
        """Adam steps start..stop-1 (0-based) from flat (theta, m, v); ``store`` (stop-start, 4, p) gets
        each step's (theta before, m after, v after, the batch gradient). torch.optim.Adam itself, so the
        replay of a run made the same way reproduces it to the bit."""
        theta, m, v = state
        leaves = [t.clone().requires_grad_(True) for t in self._split(theta)]
        optimizer = self.run.optimizer(leaves)
        if start:
            for leaf, mi, vi in zip(leaves, self._split(m), self._split(v)):
                optimizer.state[leaf].update(step=torch.tensor(float(start)), exp_avg=mi.clone(), exp_avg_sq=vi.clone())
        for step in range(start, stop):
            optimizer.param_groups[0]["lr"] = self.run.lr(step)
            before = self._flat(leaves) if store is not None else None
            loss, _ = self._loss(dict(zip(self.names, leaves)), *self._batch(step))
            grads = torch.autograd.grad(loss, leaves)
            for leaf, g in zip(leaves, grads):
                leaf.grad = g
            optimizer.step()
            if store is not None:
                store[step - start, 0] = before
                store[step - start, 1:3] = torch.stack(self._moments(optimizer, leaves))
                store[step - start, 3] = self._flat(list(grads))
        return (self._flat(leaves), *self._moments(optimizer, leaves))

    def _moments(self, optimizer: torch.optim.Optimizer, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Adam's (m, v) of ``leaves``, flat."""
        return tuple(self._flat([optimizer.state[p][key] for p in leaves]) for key in ("exp_avg", "exp_avg_sq"))

    def _start_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        theta = self._flat(self.initial)
        return theta, torch.zeros_like(theta), torch.zeros_like(theta)  # (theta, m, v)

    def _products(self, theta: torch.Tensor, g: torch.Tensor, step: int, m_adj: torch.Tensor, v_adj: torch.Tensor):
        """G = dF/dg_t (k, p) from the adjoints of m_t and v_t and the step's gradient g, then
        (per-sample directional derivatives G . grad l_i (k, B), H_t G (k, p)) at step ``step``: one
        forward-over-reverse pass per target, the k targets vmapped."""
        (b1, b2) = self.run.betas
        inputs, target, weights = self._batch(step)
        primal = self._jvp_primal(self._split(theta))
        grad_and_samples = grad(lambda p: self._loss(p, inputs, target, weights), has_aux=True)
        tangents = (1 - b1) * m_adj + 2 * (1 - b2) * g * v_adj

        def one(vector):
            _, (hv, directional) = torch.func.jvp(grad_and_samples, (primal,), (dict(zip(self.names, self._split(vector))),))
            return directional, self._flat_batched(hv)
        return vmap(one)(tangents)

    def _flat_batched(self, tensors: dict) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def state_floats(self, targets: int) -> int:
        """Floats the walk back holds for ``targets`` targets (after :meth:`forward`): the checkpoints,
        one segment's stored steps, the three adjoints and the scores (activations come on top)."""
        return (3 * len(self.checkpoints) + 4 * self.interval + 3 * targets) * self.num_params \
            + targets * len(self.targets)

    def metagradient(self, target_grads: torch.Tensor, progress: Callable | None = None) -> torch.Tensor:
        """dF_t/dw_i (k, n) float64 for k targets whose gradients at the final weights are the rows of
        ``target_grads`` (k, p) over the trainable parameters. Needs :meth:`forward` first."""
        if not self.checkpoints:
            raise RuntimeError("AdamReplay.metagradient: run forward() first (it keeps the checkpoints)")
        run, total = self.run, self.run.num_steps
        (b1, b2), eps, eps_root = run.betas, run.eps, run.eps_root
        dtype = self.initial[0].dtype
        a = target_grads.detach().to(dtype).clone()
        m_adj, v_adj = torch.zeros_like(a), torch.zeros_like(a)
        n = len(self.targets)
        scores = torch.zeros(len(a), n, dtype=torch.float64, device=a.device)
        store = torch.empty(self.interval, 4, self.num_params, dtype=dtype, device=a.device)
        bar = step_bar(progress, total, "replay backward")
        for start in sorted(self.checkpoints, reverse=True):
            stop = min(start + self.interval, total)
            self._steps(start, stop, self.checkpoints[start], store=store)
            for step in reversed(range(start, stop)):
                theta, m, v, g = store[step - start]
                t = step + 1
                c1, c2 = run.lr(step) / (1 - b1 ** t), 1.0 / math.sqrt(1 - b2 ** t)
                if eps_root:  # d = sqrt(c2^2 v + eps_root) + eps, dd/dv = c2^2 / (2 sqrt(...)): smooth at v = 0
                    root = (v * c2 ** 2 + eps_root).sqrt()
                    d = root + eps
                    m_adj.add_(a * (-c1 / d))
                    v_adj.add_(a * (c1 * c2 ** 2 * m / (2 * d * d * root)))
                else:
                    root = v.sqrt()
                    d = root * c2 + eps
                    m_adj.add_(a * (-c1 / d))
                    safe = torch.where(root > 0, root, torch.ones_like(root))
                    v_adj.add_(a * torch.where(root > 0, c1 * c2 * m / (2 * d * d * safe), torch.zeros_like(root)))
                directional, hv = self._products(theta, g, step, m_adj, v_adj)
                idx = run.batch(step)
                scores.index_add_(1, idx, directional.to(torch.float64) / len(idx))
                a.add_(hv)
                m_adj.mul_(b1)
                v_adj.mul_(b2)
            bar.update(stop - start)
        bar.close()
        return scores
