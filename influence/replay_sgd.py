"""Method 3 through an SGD run (Train.py's): the exact metagradient by reverse mode through every step."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from influence.losses import SampleLoss, nll_sample_loss, weighted_batch_loss
from influence.mlp import MlpHvp, mlp_check, mlp_layers
from influence.problem import InfluenceProblem
from influence.replay import Replay, SgdRun, step_bar


class SgdReplay(Replay):
    """Method 3: d F(theta_T) / d w for every training point's data weight w_i, exactly, by reverse
    mode through every step of one SGD run (Ilyas & Engstrom 2025, "MAGIC"; Maclaurin et al. 2015).

    The run (torch.optim.SGD, as Train.py trains): with L_s(theta) = sum_{i in B_s} w_i l_i(theta) / |B_s|,

        g_s = grad L_s(theta_s) + lambda theta_s,   b_s = mu b_{s-1} + g_s  (b_{-1} = 0),
        theta_{s+1} = theta_s - eta_s b_s     (eta_s: the run's schedule, SgdRun.lr).

    Walking back from a_T = grad F(theta_T) with v_{T-1} = -eta_{T-1} a_T, each step s = T-1, ..., 0 does

        dF/dw_i   += v_s . grad l_i(theta_s) / |B_s|          for i in B_s,
        a_s        = a_{s+1} + (H_s + lambda I) v_s            (H_s the Hessian of L_s at theta_s),
        v_{s-1}    = mu v_s - eta_{s-1} a_s,

    where a_s = dF/dtheta_s and v_s = dF/db_s. The adjoint is linear in a_T, so k test targets walk
    back together as (k, p) blocks. Both step products come from one forward-over-reverse pass: the
    directional derivative of each point's loss along v (its score) and H_s v. Generic models use
    ``torch.func`` (jvp of grad, vmapped over the k vectors); a ReLU or softplus MLP with NLL uses the
    hand-written R-operator (:class:`MlpHvp`): the score is residual_i . R z_L,i and no per-sample
    gradient is formed. That path is checked against the generic one on the first step it walks.

    Memory: the forward replay keeps (theta, b) every ``checkpoint_interval`` steps; each segment is
    recomputed forward (keeping its theta_s) before it is walked back. Peak: 2p floats per checkpoint
    + interval x p floats + 2kp for the adjoint. The forward replay is torch.optim.SGD on the same
    batches, so it reproduces a run made the same way to the last bit on the same machine.
    """

    def __init__(self, model: nn.Module, sample_loss: SampleLoss, run: SgdRun, x: torch.Tensor | tuple[torch.Tensor, ...],
                 y: torch.Tensor, closed_form: bool | None = None, fold_steps: int = 32) -> None:
        # x: the model's input, or a tuple of its inputs, each indexed by the batch (FFDNet: (noisy, sigma))
        self.model, self.sample_loss, self.run, self.x, self.y = model, sample_loss, run, x, y
        self.inputs = x if isinstance(x, tuple) else (x,)
        self.fold_steps = fold_steps  # MLP path: steps per folded block of the first weight (1 = step by step)
        self._keep(model, [n for n, _ in model.named_parameters()])
        self.buffers = dict(model.named_buffers())
        found = mlp_layers(model) if sample_loss is nll_sample_loss and len(self.inputs) == 1 else None
        self.mlp = None
        if found is not None and closed_form is not False:
            self.mlp = MlpHvp(InfluenceProblem(model, nll_sample_loss, self.names), *found)
        elif closed_form:
            raise ValueError("closed_form=True needs a ReLU or softplus MLP with NLL loss (mlp_layers)")
        self.info: dict = {"path": f"{found[1]}_mlp_closed_form" if self.mlp is not None else "torch_func"}

    # ---- forward: the run itself ------------------------------------------------------------------
    def _start_state(self) -> tuple[torch.Tensor, None]:
        return self._flat(self.initial), None  # (theta, b): no momentum buffer before the first step

    def _steps(self, start: int, stop: int, state: tuple[torch.Tensor, torch.Tensor | None],
               store: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run steps start..stop-1 from flat (theta, b); ``store`` (stop-start, p) receives each
        step's theta_s. Returns the flat (theta, b) after step stop-1."""
        run, (params, buffer) = self.run, state
        leaves = [t.clone().requires_grad_(True) for t in self._split(params)]
        optimizer = run.optimizer(leaves)
        if buffer is not None:
            for leaf, b in zip(leaves, self._split(buffer)):
                optimizer.state[leaf]["momentum_buffer"] = b.clone()
        for step in range(start, stop):
            if store is not None:
                torch.cat([t.detach().reshape(-1) for t in leaves], out=store[step - start])
            idx = run.batch(step)
            losses = self.sample_loss(functional_call(self.model, {**dict(zip(self.names, leaves)), **self.buffers},
                                                      self._inputs(idx)), self.y[idx])
            weights = run.step_weights(step, idx)
            optimizer.param_groups[0]["lr"] = run.lr(step)
            loss = losses.mean() if weights is None else weighted_batch_loss(losses, weights)
            for leaf, g in zip(leaves, torch.autograd.grad(loss, leaves)):
                leaf.grad = g
            optimizer.step()
        buffers = [optimizer.state[leaf].get("momentum_buffer") for leaf in leaves]
        return self._flat(leaves), None if buffers[0] is None else self._flat(buffers)

    def _inputs(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t[idx] for t in self.inputs)

    # ---- backward: the metagradient ---------------------------------------------------------------
    def _products_generic(self, params: list[torch.Tensor], xb: tuple[torch.Tensor, ...], yb: torch.Tensor,
                          wb: torch.Tensor | None, v: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(v . grad l_i for each batch member (k, B), H v without the L2 term, per parameter (k, ...)),
        ``xb`` the batch's model inputs."""
        weights = torch.ones(len(yb), dtype=params[0].dtype, device=yb.device) if wb is None else wb

        def loss_and_samples(p: dict):
            losses = self.sample_loss(functional_call(self.model, {**p, **self.buffers}, xb), yb)
            return weighted_batch_loss(losses, weights), losses
        grad_and_samples = grad(loss_and_samples, has_aux=True)
        primal = self._jvp_primal(params)

        def one(*vector):
            _, (hv, directional) = torch.func.jvp(grad_and_samples, (primal,), (dict(zip(self.names, vector)),))
            return directional, [hv[n] for n in self.names]
        return vmap(one)(*v)

    def _mlp_step(self, params: list[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor | None,
                  rest: dict[str, torch.Tensor], first_pre: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """One step's products for a ReLU MLP by the R-operator, the first weight's tangent given as
        ``first_pre`` = X V_1^T (1, k, B, n1): (directional derivatives (k, B), H v of the other
        parameters, R g_1 (1, k, B, n1), whose product with X is the first weight's block of H v)."""
        mlp = self.mlp
        mlp.set_parameters(dict(zip(self.names, params)))
        flat_x = xb.reshape(len(xb), -1)
        state = mlp.batch_state(flat_x[None], yb[None], None if wb is None else wb[None])
        rg, out, logit_tangent = mlp.apply_with_logits(state, first_pre, {n: t[None] for n, t in rest.items()})
        directional = (state["residual"][:, None] * logit_tangent).sum(-1)[0]   # residual_i . R z_L,i
        return directional, {n: t[0] for n, t in out.items()}, rg

    def _products_mlp(self, params: list[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor,
                      wb: torch.Tensor | None, v: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`_products_generic` for a ReLU MLP by the R-operator (no per-sample gradients)."""
        tangents = dict(zip(self.names, v))
        first = self.mlp.weight_names[0]
        flat_x = xb.reshape(len(xb), -1)
        first_pre = (tangents[first] @ flat_x.T).transpose(1, 2)[None]          # (1, k, B, n1)
        directional, out, rg = self._mlp_step(params, xb, yb, wb,
                                              {n: t for n, t in tangents.items() if n != first}, first_pre)
        out[first] = rg[0].transpose(-1, -2) @ flat_x                           # (k, n1, d)
        return directional, [out[n] for n in self.names]

    def _walk_folded(self, steps: list[int], store: torch.Tensor, offset: int, a: list[torch.Tensor],
                     v: list[torch.Tensor], scores: torch.Tensor) -> None:
        """Walk back ``steps`` (in walk order) with the first weight's blocks A, V of a, v folded.

        H_s's first-weight block is U_s X_s (X_s the step's batch, U_s = R g_1^T): a rank-B update. From
        the block's start (A_0, V_0), every later A_m, V_m is r_m A_0 + s_m V_0 + sum_{j<m} e_mj U_j X_j
        (and p, q, c for V), with scalar coefficients from the recursion a += (H + lambda) v,
        v = mu v - eta a. So the product X_m V_m^T a step needs is p_m (X_m A_0^T) + q_m (X_m V_0^T) +
        sum_j c_mj (X_m X_j^T) U_j^T: two large products per block and small Gram terms, and A, V are
        written once per block (two large products) instead of four passes per step."""
        run, mom, wd = self.run, self.run.momentum, self.run.weight_decay
        first = self.mlp.weight_names[0]
        i_first = self.names.index(first)
        big_a, big_v = a[i_first], v[i_first]                                  # (k, n1, d)
        batches = [run.batch(step) for step in steps]
        sizes = [len(idx) for idx in batches]
        ends = [0, *np.cumsum(sizes).tolist()]
        xs = self.x[torch.cat(batches)].reshape(ends[-1], -1)                  # (C, d)
        from_a, from_v = big_a @ xs.T, big_v @ xs.T                            # (k, n1, C)
        gram = xs @ xs.T
        updates = xs.new_zeros(*big_a.shape[:2], ends[-1])                     # U_j side by side
        size_t = torch.tensor(sizes, device=xs.device)
        r, s, p, q = 1.0, 0.0, 0.0, 1.0
        e, c = [0.0] * len(steps), [0.0] * len(steps)
        rest = [i for i in range(len(self.names)) if i != i_first]

        def per_column(coefficients: list[float]) -> torch.Tensor:
            return torch.repeat_interleave(torch.tensor(coefficients, dtype=xs.dtype, device=xs.device),
                                           size_t[:len(coefficients)])
        for m, (step, idx) in enumerate(zip(steps, batches)):
            cols = slice(ends[m], ends[m + 1])
            pre = from_a[:, :, cols] * p + from_v[:, :, cols] * q               # V_m X_m^T: (k, n1, B)
            if m:
                pre = pre + (updates[:, :, :ends[m]] * per_column(c[:m])) @ gram[:ends[m], cols]
            params = self._split(store[step - offset])
            directional, hv, rg = self._mlp_step(params, self.x[idx], self.y[idx], run.step_weights(step, idx),
                                                 {self.names[i]: v[i] for i in rest}, pre.transpose(1, 2)[None])
            updates[:, :, cols] = rg[0].transpose(1, 2)
            scores.index_add_(1, idx, directional.to(torch.float64) / len(idx))
            lr = run.lr(step - 1)  # v_{s-1} = mu v_s - eta_{s-1} a_s
            for i in rest:
                a[i].add_(hv[self.names[i]]).add_(v[i], alpha=wd)
                v[i].mul_(mom).add_(a[i], alpha=-lr)
            r, s = r + wd * p, s + wd * q
            for j in range(m):
                e[j] += wd * c[j]
            e[m] = 1.0
            p, q = mom * p - lr * r, mom * q - lr * s
            for j in range(m + 1):
                c[j] = mom * c[j] - lr * e[j]
        new_a = (updates * per_column(e)) @ xs
        new_v = (updates * per_column(c)) @ xs
        new_a.add_(big_a, alpha=r).add_(big_v, alpha=s)
        new_v.add_(big_a, alpha=p).add_(big_v, alpha=q)
        big_a.copy_(new_a)
        big_v.copy_(new_v)

    def _check_closed_form(self, params, xb, yb, wb, v) -> None:
        """The hand-written products against torch.func on one step; on a mismatch use torch.func."""
        few = [t[:2] for t in v]
        d_hand, hv_hand = self._products_mlp(params, xb, yb, wb, few)
        d_ref, hv_ref = self._products_generic(params, (xb,), yb, wb, few)
        error, warning = mlp_check([d_hand, *hv_hand], [d_ref, *hv_ref],
                                   "the hand-written MLP products differ from torch.func", "torch.func")
        self.info["closed_form_check_relative_error"] = error
        if warning is not None:
            self.info["closed_form_check"] = warning
            self.info["path"] = "torch_func"
            self.mlp = None

    def metagradient(self, target_grads: torch.Tensor, progress: Callable | None = None) -> torch.Tensor:
        """dF_t/dw_i (k, n) float64 for k targets whose gradients at the final weights are the rows of
        ``target_grads`` (k, p), in ``model.named_parameters()`` order. Needs :meth:`forward` first.
        With an attribution window (``run.window_start`` > 0) the walk stops at the window's first
        step: the weights act nowhere before it, so the earlier steps add nothing to dF/dw."""
        if not self.checkpoints:
            raise RuntimeError("SgdReplay.metagradient: run forward() first (it keeps the checkpoints)")
        run, total = self.run, self.run.num_steps
        mom, wd = run.momentum, run.weight_decay
        a = [t.clone() for t in self._split(target_grads.detach().to(self.initial[0].dtype))]
        v = [t * -run.lr(total - 1) for t in a]
        scores = torch.zeros(len(target_grads), run.n, dtype=torch.float64, device=target_grads.device)
        store = torch.empty(self.interval, self.num_params, dtype=self.initial[0].dtype, device=self.y.device)
        checked = self.mlp is None
        bar = step_bar(progress, total - run.window_start, "replay backward")
        for start in sorted(self.checkpoints, reverse=True):
            stop = min(start + self.interval, total)
            if stop <= run.window_start:
                break
            self._steps(start, stop, self.checkpoints[start], store=store)
            walk = list(reversed(range(max(start, run.window_start), stop)))
            if not checked:
                step = walk[0]
                idx = run.batch(step)
                self._check_closed_form(self._split(store[step - start]), self.x[idx], self.y[idx],
                                        run.step_weights(step, idx), v)
                checked = True
            if self.mlp is not None and self.fold_steps > 1:
                for b in range(0, len(walk), self.fold_steps):
                    self._walk_folded(walk[b:b + self.fold_steps], store, start, a, v, scores)
                bar.update(len(walk))
                continue
            for step in walk:
                params = self._split(store[step - start])
                idx = run.batch(step)
                yb, wb = self.y[idx], run.step_weights(step, idx)
                if self.mlp is not None:
                    directional, hv = self._products_mlp(params, self.x[idx], yb, wb, v)
                else:
                    directional, hv = self._products_generic(params, self._inputs(idx), yb, wb, v)
                scores.index_add_(1, idx, directional.to(torch.float64) / len(idx))
                lr = run.lr(step - 1)
                for a_p, v_p, hv_p in zip(a, v, hv):  # a_s = a_{s+1} + (H_s + lambda) v_s; v_{s-1} = mu v_s - eta_{s-1} a_s
                    a_p.add_(hv_p).add_(v_p, alpha=wd)
                    v_p.mul_(mom).add_(a_p, alpha=-lr)
            bar.update(len(walk))
        bar.close()
        return scores
