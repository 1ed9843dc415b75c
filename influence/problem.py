"""The influence problem: a trained model, its per-sample loss, the parameters attributions are taken over,
and the exact products every solver builds on (per-sample gradients, Hessian-vector products)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from influence.layers import capturable_owners, module_sample_grads
from influence.losses import SampleLoss, gauss_newton_loss


SIGN_CONVENTION = ("influence[t][i] = grad L(test t)^T H^-1 grad L(train i); positive = training "
                   "point i helped (removing it would raise the test loss); influence / n_train = "
                   "predicted change of the test loss when point i is removed")


def _over_chunks(product, x: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """A per-batch mean-loss product over all of (x, y): the chunks' products weighted by their
    share of the points (bounded memory, exact). A per-chunk l2_reg * v counts once, the weights
    summing to 1."""
    total = torch.zeros_like(vectors)
    n = len(x)
    for s in range(0, n, chunk_size):
        xb, yb = x[s:s + chunk_size], y[s:s + chunk_size]
        total += product(xb, yb) * (len(xb) / n)
    return total


def select_parameters(model: nn.Module, prefixes: Iterable[str] = ()) -> list[str]:
    """Names of the trainable parameters starting with one of ``prefixes`` (empty = all)."""
    prefixes = list(prefixes)
    names = [n for n, p in model.named_parameters() if p.requires_grad and
             (not prefixes or any(n.startswith(pre) for pre in prefixes))]
    if not names:
        valid = [n for n, _ in model.named_parameters()]
        raise ValueError(f"parameter prefixes {prefixes} select no parameter; names are {valid}")
    return names


@dataclass
class InfluenceProblem:
    """A trained model, its per-sample loss and the parameters that influence is taken over.

    Parameters outside ``param_names`` are held fixed. Vectors over the chosen parameters are flat
    (p,) tensors in ``param_names`` order; many vectors at once are (k, p) matrices.
    """
    model: nn.Module
    sample_loss: SampleLoss
    param_names: list[str]
    l2_reg: float = 0.0
    batched_hvp: bool = True  # one vmapped double backward for all vectors; False = one per vector
    params: dict[str, torch.Tensor] = field(init=False)
    frozen: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.model.eval()
        named = dict(self.model.named_parameters())
        self.params = {n: named[n].detach() for n in self.param_names}
        self.frozen = {n: t.detach() for n, t in named.items() if n not in self.params}
        self.frozen.update({n: b for n, b in self.model.named_buffers()})
        self.shapes = [self.params[n].shape for n in self.param_names]
        self.sizes = [self.params[n].numel() for n in self.param_names]

    # ---- flat <-> dict -----------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return sum(self.sizes)

    def flatten(self, tensors: dict[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        lead = next(iter(tensors.values())).shape[:batch_dims]
        return torch.cat([tensors[n].reshape(*lead, -1) for n in self.param_names], dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        lead = flat.shape[:-1]
        pieces = torch.split(flat, self.sizes, dim=-1)
        return {n: piece.reshape(*lead, *shape)
                for n, piece, shape in zip(self.param_names, pieces, self.shapes)}

    # ---- losses --------------------------------------------------------------------------------
    def output(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        """The model's output at ``params`` (the chosen parameters by name; the rest held fixed)."""
        return functional_call(self.model, {**self.frozen, **params}, (x,))

    def capture(self, owners: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, loss: SampleLoss):
        """One forward/backward of the summed per-sample losses: each owner's (input, output) and
        the loss gradients at its output (the inputs every layer rule works from)."""
        captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = [module.register_forward_hook(
            lambda mod, inp, out, key=name: captured.__setitem__(key, (inp[0], out)))
            for name, module in owners.items()]
        try:
            with torch.enable_grad():
                params = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
                losses = loss(self.output(params, x), y)
                deltas = torch.autograd.grad(losses.sum(), [captured[name][1] for name in owners])
        finally:
            for hook in hooks:
                hook.remove()
        return captured, deltas

    # ---- gradients -----------------------------------------------------------------------------
    def sample_grads(self, x: torch.Tensor, y: torch.Tensor, chunk_size: int = 1024,
                     loss: SampleLoss | None = None) -> torch.Tensor:
        """Per-sample loss gradients (n, p), without the L2 term, via vmap(grad). No Python loop
        over samples beyond chunks of ``chunk_size``. ``loss`` replaces the problem's sample loss
        (e.g. a test loss restricted to some pixels)."""
        loss = loss or self.sample_loss
        owners = capturable_owners(self)
        if owners is not None:  # closed forms per module: one ordinary backward per chunk
            return torch.cat([self._hooked_sample_grads(owners, x[s:s + chunk_size], y[s:s + chunk_size], loss)
                              for s in range(0, len(x), chunk_size)])

        def single(params, xi, yi):
            return loss(self.output(params, xi.unsqueeze(0)), yi.unsqueeze(0)).squeeze(0)
        per_sample = vmap(grad(single), in_dims=(None, 0, 0))
        out = [self.flatten(per_sample(self.params, x[s:s + chunk_size], y[s:s + chunk_size]), 1)
               for s in range(0, len(x), chunk_size)]
        return torch.cat(out)

    def _hooked_sample_grads(self, owners: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                             loss: SampleLoss) -> torch.Tensor:
        """Per-sample gradients from each owning module's input and output gradient (no vmap)."""
        captured, deltas = self.capture(owners, x, y, loss)
        per_sample: dict[str, torch.Tensor] = {}
        for (name, module), delta in zip(owners.items(), deltas):
            per_sample.update(module_sample_grads(name, module, captured[name][0].detach(), delta))
        return self.flatten({n: per_sample[n] for n in self.param_names}, batch_dims=1)

    def hvp(self, x: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor,
            out: torch.Tensor | None = None, batched: bool | None = None) -> torch.Tensor:
        """Exact H v of the training objective on batch (x, y), for (k, p) detached vectors.

        Double backward: g = grad of the batch-mean loss (with its graph), then one batched
        backward of g against all k vectors (``is_grads_batched``), or one backward per vector
        when ``batched`` (default: the problem's ``batched_hvp``) is False. The L2 term adds l2_reg * v.
        ``out`` (k, p), if given, receives the result (no fresh large allocation per call).
        """
        vectors = vectors.detach()
        names = self.param_names
        with torch.enable_grad():
            leaves = {n: self.params[n].detach().requires_grad_(True) for n in names}
            loss = self.sample_loss(self.output(leaves, x), y).mean()
            first = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
            tangents = self.unflatten(vectors)
            if self.batched_hvp if batched is None else batched:
                second = torch.autograd.grad(first, list(leaves.values()),
                                             grad_outputs=[tangents[n] for n in names],
                                             is_grads_batched=True, allow_unused=True)
            else:  # conv nets: vmap over the double backward is slow, a loop is not
                rows = [torch.autograd.grad(first, list(leaves.values()),
                                            grad_outputs=[tangents[n][j] for n in names],
                                            retain_graph=True, allow_unused=True)
                        for j in range(len(vectors))]
                second = [None if rows[0][i] is None else torch.stack([r[i] for r in rows])
                          for i in range(len(names))]
        k = vectors.shape[0]
        parts = [torch.zeros(k, size, dtype=vectors.dtype, device=vectors.device)
                 if part is None else part.reshape(k, -1) for part, size in zip(second, self.sizes)]
        hv = torch.cat(parts, dim=1) if out is None else torch.cat(parts, dim=1, out=out)
        return hv.add_(vectors, alpha=self.l2_reg) if self.l2_reg else hv

    def hvp_per_batch(self, xs: torch.Tensor, ys: torch.Tensor, vectors: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        """H_r v_r for r independent batches: xs (r, B, ...), vectors (r, k, p) -> (r, k, p).

        One ``hvp`` per batch: LiSSA's generic path. (Measured on the MLP at LiSSA's report settings,
        1 thread: 12.6 ms per step this way, 27 ms as one vmapped forward-over-reverse call over all
        r x k products; the MLP's own path, :class:`influence.mlp.MlpHvp` with the first layer folded, 4.2 ms.)"""
        out = torch.empty_like(vectors) if out is None else out
        for r in range(len(xs)):
            self.hvp(xs[r], ys[r], vectors[r], out=out[r])
        return out

    def hvp_full(self, x: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor,
                 chunk_size: int = 10000, batched: bool | None = None) -> torch.Tensor:
        """H v of the objective over all of (x, y), in chunks (bounded memory), exact."""
        return _over_chunks(lambda xb, yb: self.hvp(xb, yb, vectors, batched=batched), x, y, vectors, chunk_size)

    def ggnvp(self, x: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Exact G v of the training objective on batch (x, y) for (k, p) detached vectors, G the
        Gauss-Newton matrix (1/B) sum_i J_i^T H_i J_i (J_i the Jacobian of sample i's output in the
        parameters, H_i the Hessian of its loss in that output; for NLL on log-probabilities, at the
        logits: ``losses.gauss_newton_loss``): positive semi-definite for a convex loss, so CG on it
        never meets negative curvature. Per vector: a forward-mode J v, the loss's
        output Hessian on it, and one backward (J^T). The L2 term adds l2_reg * v."""
        from torch.func import jvp, vjp
        vectors = vectors.detach()
        names = self.param_names
        primal = {n: self.params[n] for n in names}

        def f(params):
            return self.output(params, x)

        out, pullback = vjp(f, primal)
        output_loss = gauss_newton_loss(self.sample_loss)  # NLL: the curvature of its log-softmax
        mean_loss = grad(lambda o: output_loss(o, y).mean())
        rows = []
        for v in vectors:
            _, jv = jvp(f, (primal,), (self.unflatten(v),))
            _, hjv = jvp(mean_loss, (out.detach(),), (jv,))
            rows.append(self.flatten(pullback(hjv)[0]))
        gv = torch.stack(rows)
        return gv.add_(vectors, alpha=self.l2_reg) if self.l2_reg else gv

    def ggnvp_full(self, x: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor,
                   chunk_size: int = 10000) -> torch.Tensor:
        """G v over all of (x, y), in chunks (bounded memory), exact."""
        return _over_chunks(lambda xb, yb: self.ggnvp(xb, yb, vectors), x, y, vectors, chunk_size)

    def dense_hessian(self, x: torch.Tensor, y: torch.Tensor, chunk_size: int = 10000,
                      basis_chunk: int = 256) -> torch.Tensor:
        """The dense (p, p) Hessian of the objective over (x, y), built from HVPs of basis vectors."""
        p = self.num_params
        eye = torch.eye(p, dtype=next(iter(self.params.values())).dtype,
                        device=next(iter(self.params.values())).device)
        # one double backward per basis vector: for hundreds of vectors over 10,000-point chunks the
        # vmapped (is_grads_batched) backward is many times slower (measured: 5.3 s against 67 s or
        # more for the MLP's last layer over 60,000 images; 10.6 s as vmapped forward-over-reverse)
        cols = [self.hvp_full(x, y, eye[s:s + basis_chunk], chunk_size, batched=False)
                for s in range(0, p, basis_chunk)]
        hessian = torch.cat(cols)
        return 0.5 * (hessian + hessian.T)
