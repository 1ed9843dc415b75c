"""All attribution math: Method 1 (gradient norms x activations) and Method 2 (influence functions).

Method 2 follows Koh & Liang (2017). For a model trained to minimise
``R(theta) = mean_i loss(z_i) + l2_reg/2 * ||theta||^2`` with Hessian ``H``, the influence of training
point z on test point t is reported as

    influence(t, z) = grad L(t)^T  H^-1  grad L(z)

Sign convention (the report's): **positive = z helped** — removing z would *raise* the test loss —
and ``influence / n_train`` is the predicted change of the test loss when z is removed. (This is
``-I_up,loss`` in Koh & Liang's notation.) "helpful" lists the most positive, "harmful" the most
negative.

Every HVP is an exact Hessian-vector product of the *training* objective (double backward, or
forward-over-reverse with ``torch.func``), with the vectors detached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

SIGN_CONVENTION = ("influence[t][i] = grad L(test t)^T H^-1 grad L(train i); positive = training "
                   "point i helped (removing it would raise the test loss); influence / n_train = "
                   "predicted change of the test loss when point i is removed")

SampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (output, target) -> (B,) losses


# ============================================================================================
# Method 1: gradient-norm vectors and activation scores
# ============================================================================================
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


def conv_sample_weight_grads(layer_input: torch.Tensor, output_grad: torch.Tensor,
                             conv: nn.Conv2d) -> torch.Tensor:
    """Each sample's share of a conv layer's weight gradient, (B, out, in, kh, kw).

    grad_W = sum over samples b of delta_b (x) unfold(input_b); the b-th term is returned. With no
    coupling between samples (no train-mode BN) it is exactly the gradient of sample b's loss
    term; with train-mode BN it is the standard per-sample decomposition of the batch gradient.
    """
    cols = nn.functional.unfold(layer_input, conv.kernel_size, dilation=conv.dilation,
                                padding=conv.padding, stride=conv.stride)         # (B, in*k*k, L)
    grads = torch.einsum("bol,bkl->bok", output_grad.flatten(2), cols)             # (B, out, in*k*k)
    return grads.reshape(len(layer_input), *conv.weight.shape)


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


def top_indices(values: np.ndarray | torch.Tensor, k: int, largest: bool = True) -> list[int]:
    """Indices of the k largest (or smallest) values; ties keep ascending index order."""
    v = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    order = np.argsort(-v if largest else v, kind="stable")
    return order[:k].tolist()


# ============================================================================================
# Method 2: the influence problem (model + loss + chosen parameters)
# ============================================================================================
def top_k_overlap(a: Iterable[int], b: Iterable[int], k: int) -> int:
    """How many items the first k of two rankings (index lists, best first) share."""
    return len(set(list(a)[:k]) & set(list(b)[:k]))


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
    def _output(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**self.frozen, **params}, (x,))

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
            return loss(self._output(params, xi.unsqueeze(0)), yi.unsqueeze(0)).squeeze(0)
        per_sample = vmap(grad(single), in_dims=(None, 0, 0))
        out = [self.flatten(per_sample(self.params, x[s:s + chunk_size], y[s:s + chunk_size]), 1)
               for s in range(0, len(x), chunk_size)]
        return torch.cat(out)

    def _hooked_sample_grads(self, owners: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                             loss: SampleLoss) -> torch.Tensor:
        """Per-sample gradients from each owning module's input and output gradient (no vmap)."""
        captured, deltas = _capture(self, owners, x, y, loss)
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
            loss = self.sample_loss(self._output(leaves, x), y).mean()
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
        r x k products; the MLP's own path, :class:`ReluMlpHvp` with the first layer folded, 4.2 ms.)"""
        out = torch.empty_like(vectors) if out is None else out
        for r in range(len(xs)):
            self.hvp(xs[r], ys[r], vectors[r], out=out[r])
        return out

    def hvp_full(self, x: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor,
                 chunk_size: int = 10000, batched: bool | None = None) -> torch.Tensor:
        """H v of the objective over all of (x, y), in chunks (bounded memory), exact."""
        total = torch.zeros_like(vectors)
        n = len(x)
        for s in range(0, n, chunk_size):
            xb, yb = x[s:s + chunk_size], y[s:s + chunk_size]
            total += self.hvp(xb, yb, vectors, batched=batched) * (len(xb) / n)
        return total  # l2_reg*v is added in every chunk; the weights sum to 1, so it counts once

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


# ============================================================================================
# inverse-HVP solvers: all take (k, p) right-hand sides and solve them in one pass
# ============================================================================================
KRONECKER_SOLVERS = ("kfac", "ekfac", "kfac_factored")  # the solvers KroneckerCurvature serves


class LissaDiverged(RuntimeError):
    """LiSSA's recursion blew up: the Hessian has eigenvalues above 2*scale."""


@dataclass
class SolverSettings:
    solver: str = "lissa"            # lissa | cg | exact | kfac | ekfac | kfac_factored | arnoldi | identity (| trak)
    damp: float = 0.01
    scale: float = 100.0
    recursion_depth: int = 1000      # LiSSA t (method2.training_points)
    repeats: int = 5                 # LiSSA r (method2.recursion_nums)
    hvp_batch_size: int = 8          # LiSSA batch per step (1 if stochastic)
    cg_tol: float = 1e-6
    cg_max_iter: int = 200
    hessian_points: int = 0          # cg/exact: training points in H (0 = all)
    exact_max_params: int = 5000
    chunk_size: int = 10000
    seed: int = 0
    fisher: str = "true"             # kfac/ekfac: true (labels sampled from the model) | empirical
    kfac_damp_factor: float = 0.1    # kfac/ekfac: lambda per layer = factor * mean eigenvalue
    factor_file: str = ""            # kfac/ekfac: read/write the factors here ("" = recompute)
    arnoldi_rank: int = 50           # arnoldi: eigenpairs kept
    arnoldi_iterations: int = 100    # arnoldi: Lanczos steps (full-data HVPs)
    proj_dim: int = 2048             # trak: projected gradient dimension
    progress: Callable | None = None  # a tqdm-like factory for the long passes (None = silent)
    save: Callable[[str, object], object] | None = None  # writes the factor file (path, state); None = torch.save

    @property
    def effective_damping(self) -> float | str:
        """The lambda in (H + lambda I)^-1 that the chosen solver converges to (kfac/ekfac: a
        per-layer value, reported in the solver info; identity: none)."""
        if self.solver in ("kfac", "ekfac"):
            return f"{self.kfac_damp_factor:g} x mean eigenvalue per layer"
        if self.solver == "kfac_factored":
            return f"{self.kfac_damp_factor:g} x mean eigenvalue per layer, split over the two factors"
        if self.solver in ("identity", "trak"):
            return 0.0
        return self.damp * self.scale if self.solver == "lissa" else self.damp


LISSA_SETTLED = 0.05  # LiSSA counts as converged when its estimate moved < 5% over the last 10% of steps
LISSA_FOLD_SAMPLES = 256  # folded LiSSA: training points per block (measured best of 128/256/512 on the MLP)


def lissa(problem: InfluenceProblem, vectors: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
          cfg: SolverSettings, show_progress: bool = True, info: dict | None = None,
          fold: bool = True) -> torch.Tensor:
    """LiSSA estimate of H^-1 v for (k, p) vectors (Agarwal et al. 2017; Koh & Liang 2017).

    h_0 = v;  h_j = v + (1 - damp) h_{j-1} - H_j h_{j-1} / scale,  j = 1..t, each H_j on a fresh
    uniformly drawn batch of ``hvp_batch_size`` training points; the estimate is h_t / scale,
    averaged over ``repeats`` independent chains (run side by side). Its fixed point is
    (H + damp*scale*I)^-1 v, so the damping it applies is damp*scale. The recursion converges when
    every Hessian eigenvalue lies in (-damp*scale, (2 - damp)*scale); a blow-up stops it with
    :class:`LissaDiverged`. Convergence: ``info`` (if given) receives the relative change of the
    estimate's norm over the last 10% of the steps (``lissa_last_change``) and ``converged`` =
    that change < 5%.

    A ReLU or softplus MLP with NLL loss (:func:`mlp_layers`) runs the same recursion on the same batches
    with hand-written batched HVPs and its first weight block folded over many steps
    (:func:`_lissa_relu_mlp`; about 4x faster, and few large operations rather than thousands of
    small ones, which matters on a busy machine). Before it runs, its HVP is checked against autograd
    on the first batch; ``fold=False`` (or a failed check, reported in ``info``) uses the
    step-by-step autograd loop. ``info["lissa_path"]`` says which ran.
    """
    bar = cfg.progress(total=cfg.recursion_depth, desc="LiSSA", unit="step", leave=False) \
        if cfg.progress and show_progress else None
    try:
        mlp = _checked_relu_mlp(problem, vectors, x, y, cfg, info) if fold else None
        if info is not None:
            info["lissa_path"] = "relu_mlp" if mlp is not None else "autograd"
        if mlp is not None:
            return _lissa_relu_mlp(problem, mlp, vectors, x, y, cfg, bar, info)
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        v = vectors.detach()
        h = v.unsqueeze(0).repeat(cfg.repeats, 1, 1)                      # (r, k, p)
        v_norm = v.norm(dim=1).clamp_min(1e-30)                            # (k,)
        n = len(x)
        hv = torch.empty_like(h)                                           # reused every step
        checkpoint = max(int(0.9 * cfg.recursion_depth), 1)
        earlier = None
        for j in range(1, cfg.recursion_depth + 1):
            if j == checkpoint:
                earlier = h.mean(dim=0).norm(dim=1)                       # (k,) norm of the estimate
            idx = torch.randint(n, (cfg.repeats, cfg.hvp_batch_size), generator=generator).to(x.device)
            problem.hvp_per_batch(x[idx], y[idx], h, out=hv)
            h.mul_(1.0 - cfg.damp).add_(v).sub_(hv, alpha=1.0 / cfg.scale)  # in place: h is big
            _check_diverged(h.norm(dim=2) / v_norm, j, cfg)                 # ||h|| / ||v||, (r, k)
            if bar is not None:
                bar.update(1)
        _settled(info, earlier, h.mean(dim=0).norm(dim=1), cfg)
        return (h / cfg.scale).mean(dim=0)
    finally:
        if bar is not None:
            bar.close()


def _check_diverged(ratio: torch.Tensor, step: int, cfg: SolverSettings) -> None:
    """Raise :class:`LissaDiverged` when ||h|| / ||v|| after ``step`` steps is not finite or above
    100 x min(step + 1, 1/damp) (a converging recursion stays below min(step + 1, 1/damp))."""
    bound = 100.0 * min(step + 1, 1.0 / cfg.damp if cfg.damp > 0 else math.inf)
    if torch.isfinite(ratio).all() and ratio.max() <= bound:
        return
    raise LissaDiverged(
        f"LiSSA diverged at step {step} (||h||/||v|| = {ratio.max().item():.3g} > {bound:.3g}): "
        f"a Hessian eigenvalue lies outside (-damp*scale, (2-damp)*scale) = "
        f"({-cfg.damp * cfg.scale:g}, {(2 - cfg.damp) * cfg.scale:g}); raise the scale "
        f"(now {cfg.scale:g}) for large eigenvalues, or damp for negative curvature")


def _settled(info: dict | None, earlier: torch.Tensor | None, final: torch.Tensor, cfg: SolverSettings) -> None:
    """Record how much LiSSA's estimate still moved over its last 10% of steps."""
    if info is None or earlier is None:
        return
    change = ((final - earlier).abs() / final.clamp_min(1e-30)).max().item()
    info.update(lissa_last_change=round(change, 5), converged=change < LISSA_SETTLED)
    if change >= LISSA_SETTLED:
        info["warning"] = (f"LiSSA did not settle: its estimate still changed by {change:.1%} over the last "
                           f"10% of the {cfg.recursion_depth} steps (raise training_points, or damp)")


def _checked_relu_mlp(problem: InfluenceProblem, vectors: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      cfg: SolverSettings, info: dict | None) -> "ReluMlpHvp | None":
    """The hand-written MLP HVP for this problem, if its shape is a ReLU or softplus MLP with NLL loss
    and its product matches autograd's on one batch (else None, with a warning in ``info``)."""
    found = mlp_layers(problem.model) if problem.sample_loss is nll_sample_loss else None
    if found is None:
        return None
    mlp = ReluMlpHvp(problem, *found)
    xb, yb, vb = x[:cfg.hvp_batch_size], y[:cfg.hvp_batch_size], vectors[:2].detach()
    by_hand = mlp.hvp(problem, xb, yb, vb) + problem.l2_reg * vb
    reference = problem.hvp(xb, yb, vb)
    error = ((by_hand - reference).norm() / reference.norm().clamp_min(1e-30)).item()
    if error > 1e-3:
        if info is not None:
            info["lissa_mlp_check"] = (f"the hand-written MLP HVP differs from autograd by {error:.2g} "
                                       f"(relative): the model is not the ReLU MLP its modules suggest; "
                                       f"used the step-by-step autograd loop")
        return None
    return mlp


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


class ReluMlpHvp:
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


def _block_lengths(depth: int, block: int, boundary: int) -> list[int]:
    """Split steps 1..depth into blocks of at most ``block`` steps, one ending at ``boundary``."""
    ends = sorted({*range(block, depth, block), depth, *([boundary] if 0 < boundary < depth else [])})
    return [e - s for s, e in zip([0, *ends[:-1]], ends)]


def _lissa_relu_mlp(problem: InfluenceProblem, mlp: ReluMlpHvp, vectors: torch.Tensor, x: torch.Tensor,
                    y: torch.Tensor, cfg: SolverSettings, bar, info: dict | None) -> torch.Tensor:
    """:func:`lissa`'s recursion for a ReLU MLP with the first weight block folded over steps.

    The first weight W_1 holds most parameters, and H_j's W_1 block is R_j^T X_j (X_j the step's batch):
    a rank-B update. Unrolled from a block's start j0, with beta = 1 - damp - l2_reg/scale,

        h_{j0+m} = beta^m h_{j0} + c_m v - (1/scale) sum_{i<m} beta^{m-1-i} R_i^T X_i,   c_m = sum_{i<m} beta^i

    so the product X' h_{j0+m}^T a step needs is beta^m (X' h_{j0}^T) + c_m (X' v^T) minus Gram terms
    (X' X_i^T) R_i, all from products computed once per block; h itself is written once per block.
    The same batches as the step-by-step loop (same generator), so the same estimate up to rounding.
    """
    r, k, batch = cfg.repeats, len(vectors), cfg.hvp_batch_size
    first = mlp.weight_names[0] if mlp.weight_names[0] in mlp.selected else None
    flat_x = x.reshape(len(x), -1)
    v = problem.unflatten(vectors.detach())
    h = {name: t.unsqueeze(0).repeat(r, *([1] * t.dim())) for name, t in v.items()}  # (r, k, ...)
    rest = [name for name in problem.param_names if name != first]
    beta = 1.0 - cfg.damp - problem.l2_reg / cfg.scale
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    v_norm = vectors.norm(dim=1).clamp_min(1e-30)
    checkpoint = max(int(0.9 * cfg.recursion_depth), 1)

    def estimate_norms() -> torch.Tensor:  # (k,) norm of the estimate averaged over the repeats
        return torch.sqrt(sum(t.mean(0).reshape(k, -1).pow(2).sum(1) for t in h.values()))

    earlier = estimate_norms() if checkpoint == 1 else None
    done = 0
    for length in _block_lengths(cfg.recursion_depth, max(1, LISSA_FOLD_SAMPLES // batch), checkpoint - 1):
        idx = torch.stack([torch.randint(len(x), (r, batch), generator=generator) for _ in range(length)],
                          dim=1).to(x.device)                                     # (r, K, B)
        xb, yb = flat_x[idx.reshape(r, -1)], y[idx]                             # (r, KB, d), (r, K, B)
        if first is not None:
            n1, d = h[first].shape[2:]
            # X' h_{j0}^T and X' v^T for every batch of the block, laid out (r, K, B, k, n1)
            from_start = (xb @ h[first].reshape(r, k * n1, d).transpose(1, 2)).reshape(r, length, batch, k, n1)
            from_v = (xb @ v[first].reshape(k * n1, d).T).reshape(r, length, batch, k, n1)
            gram = xb @ xb.transpose(1, 2)                                       # (r, KB, KB)
            updates = xb.new_zeros(r, k, length * batch, n1)                     # R_i side by side
            # beta^(K-1-i) per column of batch i; its last m batches are the weights step m needs
            weights = (beta ** torch.arange(length - 1, -1, -1, dtype=xb.dtype, device=xb.device)
                       ).repeat_interleave(batch)
        coef_v, decay = 0.0, 1.0                                                 # c_m, beta^m
        for m in range(length):
            cols = slice(m * batch, (m + 1) * batch)
            state = mlp.batch_state(xb[:, cols], yb[:, m])
            first_pre = None
            if first is not None:                                                # X_m h^T: (r, k, B, n1)
                first_pre = (decay * from_start[:, m] + coef_v * from_v[:, m]).transpose(1, 2)
                if m:
                    first_pre = first_pre - ((gram[:, cols, :m * batch] * weights[(length - m) * batch:])[:, None]
                                             @ updates[:, :, :m * batch]) / cfg.scale
            rg, hv = mlp.apply(state, first_pre, {n: h[n] for n in rest})
            if first is not None:
                updates[:, :, cols] = rg
            for name in rest:  # h = v + (1 - damp) h - (H h + l2 h) / scale
                h[name] = v[name] + beta * h[name] - hv[name] / cfg.scale
            coef_v, decay = coef_v + decay, decay * beta
        if first is not None:
            scaled = (updates * weights[:, None]).transpose(2, 3).reshape(r, k * n1, -1)
            h[first].reshape(r, k * n1, d).baddbmm_(scaled, xb, beta=decay, alpha=-1.0 / cfg.scale)
            h[first].add_(v[first], alpha=coef_v)
        done += length
        if bar is not None:
            bar.update(length)
        _check_diverged(torch.sqrt(sum(t.reshape(r, k, -1).pow(2).sum(2) for t in h.values())) / v_norm, done, cfg)
        if done == checkpoint - 1:
            earlier = estimate_norms()
    _settled(info, earlier, estimate_norms(), cfg)
    return problem.flatten({n: t.mean(0) / cfg.scale for n, t in h.items()}, batch_dims=1)


def conjugate_gradient(apply_a: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       tol: float, max_iter: int) -> tuple[torch.Tensor, int, float]:
    """Solve A x = b for (k, p) right-hand sides at once (independent CG per row).

    Returns the solution, the iterations used and the largest relative residual.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    d = r.clone()
    rs = (r * r).sum(dim=1)
    b_norm = b.norm(dim=1).clamp_min(1e-30)
    it = 0
    for it in range(1, max_iter + 1):
        ad = apply_a(d)
        curvature = (d * ad).sum(dim=1)
        alpha = torch.where(curvature > 0, rs / curvature.clamp_min(1e-30), torch.zeros_like(rs))
        x = x + alpha[:, None] * d
        r = r - alpha[:, None] * ad
        rs_new = (r * r).sum(dim=1)
        if (rs_new.sqrt() / b_norm).max() <= tol:
            rs = rs_new
            break
        d = r + (rs_new / rs.clamp_min(1e-30))[:, None] * d
        rs = rs_new
    return x, it, (rs.sqrt() / b_norm).max().item()


def _hessian_subset(x: torch.Tensor, y: torch.Tensor, cfg: SolverSettings):
    if cfg.hessian_points and cfg.hessian_points < len(x):
        g = torch.Generator(device="cpu").manual_seed(cfg.seed)
        idx = torch.randperm(len(x), generator=g)[:cfg.hessian_points].to(x.device)
        return x[idx], y[idx]
    return x, y


def inverse_hvp(problem: InfluenceProblem, vectors: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                cfg: SolverSettings, show_progress: bool = True) -> tuple[torch.Tensor, dict]:
    """s = (H + lambda I)^-1 v for (k, p) vectors with the chosen solver; returns (s, info)."""
    info: dict = {"solver": cfg.solver, "effective_damping": cfg.effective_damping, "converged": True}
    if cfg.solver == "lissa":
        return lissa(problem, vectors, x, y, cfg, show_progress, info), info
    if cfg.solver == "identity":  # no Hessian: influence = gradient dot product
        return vectors.detach().clone(), info
    if cfg.solver in KRONECKER_SOLVERS:
        curvature = kronecker_curvature(problem, x, y, cfg)
        info["factor_file"] = cfg.factor_file
        info.update(curvature.info())
        return curvature.inverse_hvp(vectors), info
    xh, yh = _hessian_subset(x, y, cfg)
    info["hessian_points"] = len(xh)
    if cfg.solver == "arnoldi":
        s, more = arnoldi_inverse_hvp(problem, vectors, xh, yh, cfg.arnoldi_rank, cfg.arnoldi_iterations,
                                      cfg.damp, cfg.chunk_size, cfg.seed)
        info.update(more)
        return s, info
    if cfg.solver == "cg":
        def apply_a(d: torch.Tensor) -> torch.Tensor:
            return problem.hvp_full(xh, yh, d, cfg.chunk_size) + cfg.damp * d
        s, iters, residual = conjugate_gradient(apply_a, vectors.detach(), cfg.cg_tol, cfg.cg_max_iter)
        info.update(cg_iterations=iters, cg_relative_residual=residual, converged=residual <= cfg.cg_tol)
        if residual > cfg.cg_tol:
            info["warning"] = (f"CG did not converge: relative residual {residual:.3g} > cg_tol "
                               f"{cfg.cg_tol:g} after {iters} iterations (negative curvature of a "
                               f"non-convex net: raise damp, or cg_max_iter)")
        return s, info
    if cfg.solver == "exact":
        p = problem.num_params
        if p > cfg.exact_max_params:
            raise ValueError(f"solver 'exact' needs a dense {p} x {p} Hessian, above "
                             f"exact_max_params = {cfg.exact_max_params}: choose fewer params "
                             f"(e.g. [\"main.4\"]) or use 'cg', 'ekfac' or 'lissa'")
        hessian = problem.dense_hessian(xh, yh, cfg.chunk_size).double()
        system = hessian + cfg.damp * torch.eye(p, dtype=torch.float64, device=hessian.device)
        s = torch.linalg.solve(system, vectors.detach().double().T).T.to(vectors.dtype)
        eig = torch.linalg.eigvalsh(hessian)
        info.update(hessian_eig_min=eig[0].item(), hessian_eig_max=eig[-1].item())
        return s, info
    raise ValueError(f"solver {cfg.solver!r}: valid choices are lissa, cg, exact, kfac, "
                     f"ekfac, kfac_factored, arnoldi, identity")


# ============================================================================================
# the sweep: influence of every training point on every test point
# ============================================================================================
def module_sample_grads(name: str, module: nn.Module, layer_input: torch.Tensor,
                        output_grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """Closed-form per-sample gradients of one module's parameters from its input and the
    gradient of the summed per-sample losses at its output (samples must not interact)."""
    if isinstance(module, nn.Linear):
        grads = {f"{name}.weight": torch.einsum("bo,bi->boi", output_grad, layer_input)}
    elif isinstance(module, nn.Conv2d):
        grads = {f"{name}.weight": conv_sample_weight_grads(layer_input, output_grad, module)}
        output_grad = output_grad.sum(dim=(2, 3))
    else:  # BatchNorm2d in eval mode: an affine map of the input normalised by running stats
        normalised = (layer_input - module.running_mean[None, :, None, None]) / torch.sqrt(
            module.running_var[None, :, None, None] + module.eps)
        grads = {f"{name}.weight": (output_grad * normalised).sum(dim=(2, 3))}
        output_grad = output_grad.sum(dim=(2, 3))
    if getattr(module, "bias", None) is not None:
        grads[f"{name}.bias"] = output_grad
    return grads


def capturable_owners(problem: InfluenceProblem) -> dict[str, nn.Module] | None:
    """Modules owning the chosen parameters if all have closed-form per-sample gradients
    (Linear, Conv2d, eval-mode BatchNorm2d with running stats), else None."""
    owners: dict[str, nn.Module] = {}
    modules = dict(problem.model.named_modules())
    for name in problem.param_names:
        module_name, _, kind = name.rpartition(".")
        module = modules.get(module_name)
        ok = isinstance(module, (nn.Linear, nn.Conv2d)) and (not isinstance(module, nn.Conv2d) or module.groups == 1)
        ok = ok or (isinstance(module, nn.BatchNorm2d) and not module.training and module.track_running_stats)
        if not ok or kind not in ("weight", "bias"):
            return None
        owners[module_name] = module
    return owners


def _capture(problem: InfluenceProblem, owners: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
             loss: SampleLoss):
    """One forward/backward of the summed per-sample losses; each owner's (input, output) and
    the loss gradients at its output."""
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [module.register_forward_hook(
        lambda mod, inp, out, key=name: captured.__setitem__(key, (inp[0], out)))
        for name, module in owners.items()]
    try:
        with torch.enable_grad():
            params = {n: p.detach().requires_grad_(True) for n, p in problem.params.items()}
            losses = loss(problem._output(params, x), y)
            deltas = torch.autograd.grad(losses.sum(), [captured[name][1] for name in owners])
    finally:
        for hook in hooks:
            hook.remove()
    return captured, deltas


def _linear_modules_for(problem: InfluenceProblem) -> dict[str, nn.Linear] | None:
    """The Linear modules owning the chosen parameters, or None if another module owns one."""
    owners = capturable_owners(problem)
    if owners is None or not all(isinstance(m, nn.Linear) for m in owners.values()):
        return None
    return owners


def _linear_sweep_chunk(problem: InfluenceProblem, owners: dict[str, nn.Linear],
                        s_dict: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
                        ) -> torch.Tensor:
    """Closed form for Linear layers: <grad_W(z), S_W> = delta^T S_W a, never materialising grads."""
    captured, deltas = _capture(problem, owners, x, y, problem.sample_loss)
    k = next(iter(s_dict.values())).shape[0]
    result = torch.zeros(k, len(x), dtype=x.dtype, device=x.device)
    for (name, _module), delta in zip(owners.items(), deltas):
        a = captured[name][0].detach()
        if f"{name}.weight" in s_dict:
            s_w = s_dict[f"{name}.weight"]                               # (k, out, in)
            projected = a @ s_w.reshape(-1, s_w.shape[-1]).T             # (n, k*out)
            result += (projected.reshape(len(x), k, -1) * delta[:, None, :]).sum(-1).T
        if f"{name}.bias" in s_dict:
            result += s_dict[f"{name}.bias"] @ delta.T                   # (k, n)
    return result


def influence_sweep(problem: InfluenceProblem, s_test: torch.Tensor, x: torch.Tensor,
                    y: torch.Tensor, chunk_size: int = 10000, show_progress: bool = True,
                    use_closed_form: bool = True, progress: Callable | None = None) -> torch.Tensor:
    """influence[t, i] = s_test[t] . grad L(z_i) for every training point, in chunks: (k, n).

    ``s_test`` is (k, p) = H^-1 grad L(test). When every chosen parameter belongs to an nn.Linear
    the closed form is used; otherwise per-sample gradients come chunk by chunk from closed forms
    per module (Conv2d, eval BatchNorm2d) or, for other modules, vmap(grad).
    """
    owners = _linear_modules_for(problem) if use_closed_form else None
    s_test = s_test.detach()
    s_dict = problem.unflatten(s_test)
    out = []
    starts = range(0, len(x), chunk_size)
    bar = progress(starts, desc="influence sweep", unit="chunk", leave=False) if progress and show_progress else starts
    for s in bar:
        xb, yb = x[s:s + chunk_size], y[s:s + chunk_size]
        if owners is not None:
            out.append(_linear_sweep_chunk(problem, owners, s_dict, xb, yb))
        else:
            out.append(s_test @ problem.sample_grads(xb, yb, chunk_size=chunk_size).T)
    return torch.cat(out, dim=1)


def compute_influences(problem: InfluenceProblem, x_test: torch.Tensor, y_test: torch.Tensor,
                       x_train: torch.Tensor, y_train: torch.Tensor, cfg: SolverSettings,
                       show_progress: bool = True, test_loss: SampleLoss | None = None
                       ) -> tuple[torch.Tensor, dict]:
    """influence (k, n_train) of every training point on each of k test points, all at once.

    One (k, p) matrix of test gradients, one inverse-HVP solve for all of them, one chunked sweep.
    ``test_loss`` (default: the training loss) is the loss whose change is predicted, e.g. the
    error at one pixel. Returns the influences and an info dict with solver details and timings.
    """
    import time
    t0 = time.perf_counter()
    test_grads = problem.sample_grads(x_test, y_test, loss=test_loss)
    influence, info = influences_from_test_grads(problem, test_grads, x_train, y_train, cfg, show_progress)
    info["seconds_test_grads"] = round(time.perf_counter() - t0 - info["seconds_s_test"]
                                       - info["seconds_sweep"], 3)
    return influence, info


def influences_from_test_grads(problem: InfluenceProblem, test_grads: torch.Tensor,
                               x_train: torch.Tensor, y_train: torch.Tensor, cfg: SolverSettings,
                               show_progress: bool = True) -> tuple[torch.Tensor, dict]:
    """influence (k, n_train) for k given test-loss gradients (rows may come from different test
    losses): one inverse-HVP solve for all rows, then one chunked sweep."""
    import time
    t1 = time.perf_counter()
    s_test, info = inverse_hvp(problem, test_grads, x_train, y_train, cfg, show_progress)
    t2 = time.perf_counter()
    influence = influence_sweep(problem, s_test, x_train, y_train, cfg.chunk_size, show_progress,
                                progress=cfg.progress)
    t3 = time.perf_counter()
    info.update(num_params=problem.num_params, n_train=len(x_train),
                seconds_s_test=round(t2 - t1, 3), seconds_sweep=round(t3 - t2, 3))
    return influence, info


def conv_position_influence(problem: InfluenceProblem, s_test: torch.Tensor, x: torch.Tensor,
                            y: torch.Tensor) -> torch.Tensor:
    """Where inside each training sample its influence sits: (n, H, W) maps over the conv output
    grid, map[i, h, w] = sum over the chosen conv layers of delta_i[:, h, w]^T (S_W a_bar_i[:, h, w]),
    S_W = the layer's block of ``s_test`` (p,) = H^-1 grad L(test), a_bar the unfolded input patch
    (+1 for the bias) at that output position.

    A conv gradient is a sum over output positions, G = sum_t delta_t a_bar_t^T, so the maps sum
    exactly to s_test . grad L(z_i) over the chosen parameters. Every chosen parameter must belong
    to an nn.Conv2d, and all of them must share one output size (e.g. FFDNet's 'same' 3x3 convs).
    """
    owners = capturable_owners(problem)
    if owners is None or not all(isinstance(m, nn.Conv2d) for m in owners.values()):
        raise ValueError("per-position influence needs every chosen parameter to belong to an nn.Conv2d")
    blocks = problem.unflatten(s_test.detach()[None])
    captured, deltas = _capture(problem, owners, x, y, problem.sample_loss)
    total = None
    for (name, module), delta in zip(owners.items(), deltas):
        a = nn.functional.unfold(captured[name][0].detach(), module.kernel_size, dilation=module.dilation,
                                 padding=module.padding, stride=module.stride)        # (n, in*kh*kw, L)
        projected = blocks[f"{name}.weight"][0].flatten(1) @ a                         # (n, out, L)
        if f"{name}.bias" in blocks:
            projected = projected + blocks[f"{name}.bias"][0][:, None]
        part = (projected * delta.detach().flatten(2)).sum(1).reshape(len(x), *delta.shape[2:])
        if total is not None and part.shape != total.shape:
            raise ValueError(f"per-position influence: {name} has output size {tuple(part.shape[1:])}, "
                             f"other layers {tuple(total.shape[1:])}")
        total = part if total is None else total + part
    return total


# ============================================================================================
# Kronecker-factored curvature (K-FAC, EK-FAC) for Linear and Conv2d layers
# ============================================================================================
def kronecker_owners(problem: "InfluenceProblem") -> dict[str, nn.Module]:
    """The Linear/Conv2d modules owning the chosen parameters (each with its weight chosen), or a
    ValueError naming the parameter that another kind of module owns."""
    owners = capturable_owners(problem) or {}
    modules = dict(problem.model.named_modules())
    for name in problem.param_names:
        module_name = name.rpartition(".")[0]
        if not isinstance(modules.get(module_name), (nn.Linear, nn.Conv2d)) or module_name not in owners:
            raise ValueError(f"kfac/ekfac cover nn.Linear and nn.Conv2d parameters only; {name} belongs to "
                             f"{type(modules.get(module_name)).__name__}: leave it out of params")
    for module_name in owners:
        if f"{module_name}.weight" not in problem.params:
            raise ValueError(f"kfac/ekfac take a layer's weight with its bias; {module_name}.weight is not chosen")
    return owners
class KroneckerCurvature:
    """K-FAC / EK-FAC approximation of the curvature of every chosen ``nn.Linear`` and ``nn.Conv2d``.

    For a Linear layer with homogeneous input a_bar = [a, 1] and output gradient delta, a sample's
    gradient of (weight | bias) is G = delta a_bar^T (out x in+1), whose row-major flattening is
    delta (x) a_bar. The layer's Fisher block E[(delta (x) a_bar)(delta (x) a_bar)^T] is
    approximated (Martens & Grosse 2015; George et al. 2018; Grosse et al. 2023) by

        K-FAC:   S (x) A,  A = E[a_bar a_bar^T],  S = E[delta delta^T]
        EK-FAC:  (Q_S (x) Q_A) diag(Lambda) (Q_S (x) Q_A)^T,  Lambda[i, j] = E[(Q_S^T G Q_A)[i, j]^2]

    with S = Q_S diag(l_S) Q_S^T, A = Q_A diag(l_A) Q_A^T (K-FAC: Lambda = l_S l_A^T). EK-FAC's
    Lambda is the best diagonal in the Kronecker eigenbasis (it equals the diagonal of the exact
    Fisher block in that basis). For a Linear layer G is rank one, so
    Q_S^T G Q_A = (Q_S^T delta)(Q_A^T a_bar)^T and Lambda is one matrix product over the data.

    Conv2d (KFC, Grosse & Martens 2016): a_bar_t is the unfolded input patch at output position
    t (in*kh*kw values, + 1 for the bias), delta_t the output gradient there, and
    G = sum_t delta_t a_bar_t^T. A averages a_bar a_bar^T over samples and positions, S sums
    delta delta^T over positions and averages over samples (so that S (x) A matches E[G G^T] under
    KFC's independence assumptions); EK-FAC's Lambda is computed from the exact per-sample G.
    Other modules (e.g. BatchNorm) are not supported: choose their parameters out.

    Fisher: "true" draws each sample's label from the model's predictive distribution
    (log-probability outputs; seeded), the expectation of which equals the Gauss-Newton matrix of
    the NLL; "empirical" uses the training labels (the only choice for a regression loss such as
    the denoiser's MSE). Damping: each layer solves with (F_layer + (lambda_l + l2_reg) I),
    lambda_l = damp_factor * mean(Lambda_l) (kronfluence's heuristic with factor 0.1); l2_reg is
    the training objective's own L2 term. Cross-layer curvature is ignored (block diagonal).
    K-FAC with ``factored_damping`` solves with (S + gamma_S I) (x) (A + gamma_A I) instead (the
    same lambda split over the factors): a slightly larger damping, but each Linear gradient stays
    rank one after preconditioning, so every train x test pair costs out + d products
    (``factored_pair_scores``).
    """

    def __init__(self, problem: "InfluenceProblem", x: torch.Tensor, y: torch.Tensor, eigen_corrected: bool = True,
                 fisher: str = "true", damp_factor: float = 0.1, chunk_size: int = 10000,
                 seed: int = 0, progress: Callable | None = None, factored_damping: bool = False) -> None:
        owners = kronecker_owners(problem)
        if fisher not in ("true", "empirical"):
            raise ValueError(f"fisher = {fisher!r}: expected 'true' or 'empirical'")
        if factored_damping and eigen_corrected:
            raise ValueError("factored damping is a K-FAC variant: EK-FAC's eigenvalues do not factor")
        self.problem, self.owners = problem, owners
        self.eigen_corrected, self.fisher = eigen_corrected, fisher
        self.has_bias = {name: f"{name}.bias" in problem.params for name in owners}
        generator = torch.Generator(device="cpu").manual_seed(seed)
        labels = []  # the labels of the pass, reused by the EK-FAC pass (same Fisher samples)
        a_cov: dict[str, torch.Tensor] = {}
        s_cov: dict[str, torch.Tensor] = {}
        positions: dict[str, int] = {}
        n = len(x)

        def chunks(desc: str):  # a progress bar when the caller passes a factory (tqdm-like)
            starts = range(0, n, chunk_size)
            return progress(starts, desc=desc, unit="chunk", leave=False) if progress else starts
        for s in chunks("K-FAC factors"):
            xb = x[s:s + chunk_size]
            yb = self._fisher_labels(xb, y[s:s + chunk_size], generator)
            labels.append(yb)
            for name, a_bar, delta in self._io(xb, yb):              # (b, L, d), (b, L, out)
                positions[name] = a_bar.shape[1]
                # products in the inputs' precision (float32 in real runs), sums in float64
                a, d = a_bar.flatten(0, 1), delta.flatten(0, 1)
                a_cov[name] = a_cov.get(name, 0) + (a.T @ a).double()
                s_cov[name] = s_cov.get(name, 0) + (d.T @ d).double()
        self.A = {k: v / (n * positions[k]) for k, v in a_cov.items()}
        self.S = {k: v / n for k, v in s_cov.items()}
        self.QA, self.QS, self.eigenvalues = {}, {}, {}
        for name in owners:
            l_a, self.QA[name] = torch.linalg.eigh(self.A[name])
            l_s, self.QS[name] = torch.linalg.eigh(self.S[name])
            self.eigenvalues[name] = (l_s.clamp_min(0)[:, None] * l_a.clamp_min(0)[None, :])
        if eigen_corrected:
            corrected: dict[str, torch.Tensor] = {}
            for start, yb in zip(chunks("EK-FAC eigenvalues"), labels):
                for name, a_bar, delta in self._io(x[start:start + chunk_size], yb):
                    corrected[name] = corrected.get(name, 0) + self._rotated_sq_sum(name, a_bar, delta)
            self.eigenvalues = {k: v / n for k, v in corrected.items()}
        self._set_damping(damp_factor, factored_damping)

    def _set_damping(self, damp_factor: float, factored: bool) -> None:
        """lambda_l = damp_factor * mean(Lambda_l) + l2_reg per layer; with factored damping it is
        split over the two factors, gamma_S = sqrt(lambda)/pi, gamma_A = sqrt(lambda)*pi with
        pi^2 = mean(l_A) / mean(l_S) (Martens & Grosse 2015, sec. 6.3), so that gamma_S gamma_A = lambda."""
        self.damp_factor, self.factored_damping = damp_factor, factored
        self.damping = {name: damp_factor * lam.mean().item() + self.problem.l2_reg
                        for name, lam in self.eigenvalues.items()}
        self.factor_damping: dict[str, tuple[float, float]] = {}
        self._inverse: dict[str, torch.Tensor] = {}  # the damped inverse in the eigenbasis, per layer
        self.factor_inverses: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # factored: (S+gS)^-1, (A+gA)^-1
        for name, lam in self.damping.items():
            if not factored:
                self._inverse[name] = 1.0 / (self.eigenvalues[name] + lam)
                continue
            qa, qs = self.QA[name], self.QS[name]  # eigenvalues of A and S from the stored factors
            l_a = (qa * (self.A[name] @ qa)).sum(0).clamp_min(0)
            l_s = (qs * (self.S[name] @ qs)).sum(0).clamp_min(0)
            pi = math.sqrt(max(l_a.mean().item(), 1e-30) / max(l_s.mean().item(), 1e-30))
            gamma_s, gamma_a = math.sqrt(lam) / pi, math.sqrt(lam) * pi
            self.factor_damping[name] = (gamma_s, gamma_a)
            self._inverse[name] = 1.0 / ((l_s + gamma_s)[:, None] * (l_a + gamma_a)[None, :])
            self.factor_inverses[name] = ((qs / (l_s + gamma_s)) @ qs.T, (qa / (l_a + gamma_a)) @ qa.T)

    def inverse_eigenvalues(self, name: str) -> torch.Tensor:
        """The damped inverse in the Kronecker eigenbasis, (out, d): 1 / (Lambda + lambda), or with
        factored damping 1 / ((l_S + gamma_S)(l_A + gamma_A)^T), the eigenvalues of
        (S + gamma_S I)^-1 (x) (A + gamma_A I)^-1."""
        return self._inverse[name]

    def _rotated(self, name: str, a_bar: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Each sample's gradient in the Kronecker eigenbasis, Q_S^T G Q_A: (b, out, d), in the
        inputs' precision (float32 for real runs: the conv pass is the costly one; float64 in tests)."""
        qs, qa = self.QS[name].to(delta.dtype), self.QA[name].to(a_bar.dtype)
        return torch.einsum("btu,btw->buw", delta @ qs, a_bar @ qa)

    def _rotated_sq_sum(self, name: str, a_bar: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """sum over samples of (Q_S^T G Q_A)^2, (out, d): a matrix product when G is rank one."""
        if a_bar.shape[1] == 1:  # Linear: (Q_S^T delta)(Q_A^T a_bar)^T squared is u^2 (w^2)^T
            u = (delta[:, 0].double() @ self.QS[name]).square()
            w = (a_bar[:, 0].double() @ self.QA[name]).square()
            return u.T @ w
        total = 0
        for s in range(0, len(a_bar), 64):  # bounded memory: 64 x out x d at a time
            total = total + self._rotated(name, a_bar[s:s + 64], delta[s:s + 64]).square().sum(0).double()
        return total

    def _fisher_labels(self, xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.fisher == "empirical":
            return yb
        with torch.no_grad():
            logp = self.problem._output(self.problem.params, xb)
        return torch.multinomial(logp.exp().cpu(), 1, generator=generator).squeeze(1).to(yb.device)

    def _io(self, xb: torch.Tensor, yb: torch.Tensor):
        """(layer, inputs (b, L, d) with a ones column for the bias, output gradients (b, L, out))
        of every layer: L = 1 for Linear, the output positions for Conv2d (unfolded patches)."""
        captured, deltas = _capture(self.problem, self.owners, xb, yb, self.problem.sample_loss)
        for (name, module), delta in zip(self.owners.items(), deltas):
            a = captured[name][0].detach()
            delta = delta.detach()
            if isinstance(module, nn.Conv2d):
                a = nn.functional.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding,
                                         stride=module.stride).transpose(1, 2)      # (b, L, in*kh*kw)
                delta = delta.flatten(2).transpose(1, 2)                            # (b, L, out)
            else:
                a, delta = a[:, None], delta[:, None]
            if self.has_bias[name]:
                a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype, device=a.device)], dim=2)
            yield name, a, delta

    def _layer_blocks(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """(k, p) vectors -> {layer: (k, out, d)} (weight, conv kernels flattened, | bias column)."""
        parts = self.problem.unflatten(flat)
        blocks = {}
        for name in self.owners:
            w = parts[f"{name}.weight"].flatten(2)
            blocks[name] = torch.cat([w, parts[f"{name}.bias"][..., None]], dim=-1) if self.has_bias[name] else w
        return blocks

    def inverse_hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        """(F_hat + lambda I)^-1 v for (k, p) vectors: per layer Q_S [(Q_S^T V Q_A) / (Lambda + lambda)] Q_A^T."""
        # in the vectors' precision: float32 for real runs (fast), float64 in the exactness tests
        blocks = self._layer_blocks(vectors.detach())
        out: dict[str, torch.Tensor] = {}
        for name, v in blocks.items():
            qs, qa = self.QS[name].to(v.dtype), self.QA[name].to(v.dtype)
            scale = self.inverse_eigenvalues(name).to(v.dtype)
            solved = qs @ ((qs.T @ v @ qa) * scale) @ qa.T
            if self.has_bias[name]:
                out[f"{name}.weight"], out[f"{name}.bias"] = solved[..., :-1], solved[..., -1]
            else:
                out[f"{name}.weight"] = solved
        return self.problem.flatten({n: out[n] for n in self.problem.param_names}, 1).to(vectors.dtype)

    def self_influence(self, x: torch.Tensor, y: torch.Tensor, chunk_size: int = 10000) -> torch.Tensor:
        """g_i^T (F_hat + lambda)^-1 g_i for every training point, (n,), with its own label.

        Per Linear layer g = delta a_bar^T is rank one, so in the eigenbasis it is u w^T with
        u = Q_S^T delta, w = Q_A^T a_bar, and the quadratic form is (u^2)^T [1 / (Lambda + lambda)] (w^2):
        one matrix product per chunk, no per-sample gradient.
        """
        out = []
        for s in range(0, len(x), chunk_size):
            total = torch.zeros(len(x[s:s + chunk_size]), dtype=torch.float64, device=x.device)
            for name, a_bar, delta in self._io(x[s:s + chunk_size], y[s:s + chunk_size]):
                inverse = self.inverse_eigenvalues(name)
                if a_bar.shape[1] == 1:  # Linear, rank one
                    u2 = (delta[:, 0].double() @ self.QS[name]).square()
                    w2 = (a_bar[:, 0].double() @ self.QA[name]).square()
                    total += ((u2 @ inverse) * w2).sum(1)
                else:
                    for b in range(0, len(a_bar), 64):
                        rotated = self._rotated(name, a_bar[b:b + 64], delta[b:b + 64]).double()
                        total[b:b + 64] += (rotated.square() * inverse).sum((1, 2))
            out.append(total)
        return torch.cat(out)

    def linear_layer_io(self, x: torch.Tensor, y: torch.Tensor, chunk_size: int = 10000
                        ) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """{layer: (delta (n, out), a_bar (n, d))} of every sample with its own label, or None when a
        layer is not Linear (a conv gradient is a sum over positions, not rank one)."""
        if not all(isinstance(m, nn.Linear) for m in self.owners.values()):
            return None
        parts: dict[str, list] = {name: [] for name in self.owners}
        for s in range(0, len(x), chunk_size):
            for name, a_bar, delta in self._io(x[s:s + chunk_size], y[s:s + chunk_size]):
                parts[name].append((delta[:, 0], a_bar[:, 0]))
        return {name: (torch.cat([d for d, _ in p]), torch.cat([a for _, a in p])) for name, p in parts.items()}

    def factored_pair_scores(self, test_io: dict[str, tuple[torch.Tensor, torch.Tensor]],
                             train_io: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """g_test^T [(S + gamma_S)^-1 (x) (A + gamma_A)^-1] g_train for every pair, (k, n), K-FAC with
        factored damping and Linear layers only.

        A Linear gradient is rank one, g = delta a_bar^T, and the factored inverse keeps it so:
        (S + gamma_S)^-1 delta a_bar^T (A + gamma_A)^-1. A pair's score per layer is therefore
        (delta_t^T (S + gamma_S)^-1 delta_z) (a_bar_t^T (A + gamma_A)^-1 a_bar_z): out + d
        multiply-adds per pair and layer instead of out * d (1,181 instead of 109,386 for the MNIST MLP).
        """
        if not self.factored_damping:
            raise ValueError("rank-one pair scores need factored damping (solver kfac_factored)")
        total = None
        for name, (delta_t, a_t) in test_io.items():
            delta_z, a_z = train_io[name]
            s_inv, a_inv = self.factor_inverses[name]
            part = ((delta_t @ s_inv.to(delta_t.dtype)) @ delta_z.T).mul_((a_t @ a_inv.to(a_t.dtype)) @ a_z.T)
            total = part if total is None else total.add_(part)
        return total

    # ---- the factors on disk: written once, reused by later runs, never used when they do not match
    FACTOR_FIELDS = ("A", "S", "QA", "QS", "eigenvalues")

    @staticmethod
    def fingerprint(problem: "InfluenceProblem", x: torch.Tensor, y: torch.Tensor, eigen_corrected: bool,
                    fisher: str, seed: int) -> str:
        """A hash of everything the factors depend on: the chosen parameters' values, the training
        data, the Fisher kind, EK-FAC or not, and the seed of the sampled labels."""
        import hashlib
        digest = hashlib.sha1()
        for name in problem.param_names:
            digest.update(name.encode())
            digest.update(problem.params[name].detach().cpu().double().numpy().tobytes())
        digest.update(x.detach().cpu().float().numpy().tobytes())
        digest.update(y.detach().cpu().numpy().tobytes())
        digest.update(f"{eigen_corrected}|{fisher}|{seed}".encode())
        return digest.hexdigest()

    @classmethod
    def cached(cls, path: str, problem: "InfluenceProblem", x: torch.Tensor, y: torch.Tensor,
               eigen_corrected: bool = True, fisher: str = "true", damp_factor: float = 0.1,
               chunk_size: int = 10000, seed: int = 0, log: Callable[[str], None] = print,
               progress: Callable | None = None, factored_damping: bool = False,
               save: Callable[[str, object], object] | None = None) -> "KroneckerCurvature":
        """The factors from ``path`` when it holds them for this model, data and settings, else
        computed and written there by ``save`` (the caller's atomic writer; None = torch.save). A
        file that cannot be read or that was made for another model or data raises ValueError
        naming it; the damping is applied afresh."""
        import os
        key = cls.fingerprint(problem, x, y, eigen_corrected, fisher, seed)
        if os.path.isfile(path):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                ok = state.get("fingerprint") == key
            except Exception as err:  # a truncated or foreign file
                raise ValueError(f"factor file {path} is unreadable ({type(err).__name__}): delete it to "
                                 f"rebuild the factors") from None
            if not ok:
                raise ValueError(f"factor file {path} was made for another model, data or settings: "
                                 f"delete it to rebuild the factors")
            curvature = cls.__new__(cls)
            curvature._restore(problem, state, damp_factor, factored_damping)
            log(f"K-FAC factors read from {path}")
            return curvature
        curvature = cls(problem, x, y, eigen_corrected, fisher, damp_factor, chunk_size, seed, progress,
                        factored_damping)
        state = {"fingerprint": key, "eigen_corrected": eigen_corrected, "fisher": fisher,
                 **{f: {k: v.cpu() for k, v in getattr(curvature, f).items()} for f in cls.FACTOR_FIELDS}}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if save is not None:  # the caller's (atomic) writer
            save(path, state)
        else:
            torch.save(state, path)
        log(f"K-FAC factors written to {path}")
        return curvature

    def _restore(self, problem: "InfluenceProblem", state: dict, damp_factor: float, factored: bool) -> None:
        device = next(iter(problem.params.values())).device
        self.problem, self.owners = problem, kronecker_owners(problem)
        self.eigen_corrected, self.fisher = state["eigen_corrected"], state["fisher"]
        if factored and self.eigen_corrected:
            raise ValueError("factored damping is a K-FAC variant: EK-FAC's eigenvalues do not factor")
        self.has_bias = {name: f"{name}.bias" in problem.params for name in self.owners}
        for f in self.FACTOR_FIELDS:
            setattr(self, f, {k: v.to(device) for k, v in state[f].items()})
        self._set_damping(damp_factor, factored)

    def info(self) -> dict:
        extra = {"factor_damping_S_A": {k: [float(f"{g:.6g}") for g in v] for k, v in self.factor_damping.items()}
                 } if self.factored_damping else {}
        return {"fisher": self.fisher, "eigen_corrected": self.eigen_corrected,
                "damp_factor": self.damp_factor, "factored_damping": self.factored_damping, **extra,
                "damping_per_layer": {k: float(f"{v:.6g}") for k, v in self.damping.items()},
                "mean_eigenvalue_per_layer": {k: float(f"{v.mean().item():.6g}")
                                              for k, v in self.eigenvalues.items()}}


def sample_grad_sq_norms(problem: "InfluenceProblem", x: torch.Tensor, y: torch.Tensor,
                         chunk_size: int = 10000) -> torch.Tensor:
    """||grad L(z_i)||^2 over the chosen parameters for every sample, (n,), without the L2 term.

    Linear layers in closed form (||delta a^T||^2 = ||delta||^2 ||a||^2, bias ||delta||^2); other
    modules from per-sample gradients chunk by chunk.
    """
    owners = _linear_modules_for(problem)
    out = []
    for s in range(0, len(x), chunk_size):
        xb, yb = x[s:s + chunk_size], y[s:s + chunk_size]
        if owners is None:
            out.append(problem.sample_grads(xb, yb, chunk_size=chunk_size).square().sum(1))
            continue
        captured, deltas = _capture(problem, owners, xb, yb, problem.sample_loss)
        total = torch.zeros(len(xb), dtype=xb.dtype, device=xb.device)
        for (name, _), delta in zip(owners.items(), deltas):
            d2 = delta.detach().square().sum(1)
            if f"{name}.weight" in problem.params:
                total += d2 * captured[name][0].detach().square().sum(1)
            if f"{name}.bias" in problem.params:
                total += d2
        out.append(total)
    return torch.cat(out)


# ============================================================================================
# ground truth: the linear datamodeling score (LDS)
# ============================================================================================
def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..m-1 along axis 0 of an (m,) or (m, t) array; tied values share their mean rank."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        uniques, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
        first = np.cumsum(counts) - counts
        return (first + (counts - 1) / 2.0)[inverse]
    return np.stack([average_ranks(values[:, j]) for j in range(values.shape[1])], axis=1)


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of each column of a with the same column of b, (m, t) -> (t,).
    Ties get average ranks; a constant column gives NaN."""
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.ndim == 1:
        ra, rb = ra[:, None], rb[:, None]
    ra = ra - ra.mean(0)
    rb = rb - rb.mean(0)
    denominator = np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ra * rb).sum(0) / np.where(denominator > 0, denominator, 1), np.nan)


def datamodel_predictions(attribution: np.ndarray, masks: np.ndarray, n_train: int,
                          base: np.ndarray | None = None, target: str = "loss") -> np.ndarray:
    """Predicted test outputs (m, t) of models trained on m subsets, from attributions (t, n).

    Sign convention (the project's): attribution > 0 = the training point helped its test point,
    so its presence lowers the test loss and raises the margin. For a subset S (mask row):
        loss:   predicted(S) = base - sum_{i in S} attribution_i / n_train
        margin: predicted(S) = base + sum_{i in S} attribution_i / n_train
    ``base`` only shifts each column and leaves the LDS unchanged (default 0).
    """
    summed = masks.astype(np.float64) @ np.asarray(attribution, dtype=np.float64).T / n_train
    sign = -1.0 if target == "loss" else 1.0
    return (0.0 if base is None else base[None, :]) + sign * summed


def lds(attribution: np.ndarray, masks: np.ndarray, measured: np.ndarray, target: str = "loss") -> np.ndarray:
    """Linear datamodeling score per test point (t,): Spearman correlation over the m subsets
    between the predicted (:func:`datamodel_predictions`) and the measured test output (m, t)."""
    predicted = datamodel_predictions(attribution, masks, masks.shape[1], target=target)
    return spearman_columns(predicted, np.asarray(measured, dtype=np.float64))


def bootstrap_mean(values: np.ndarray, draws: int = 1000, level: float = 0.95, seed: int = 0
                   ) -> tuple[float, float, float]:
    """Mean of the finite values and its percentile bootstrap interval (resampling the values)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(draws, len(v)))].mean(1)
    tail = (1.0 - level) / 2.0
    return float(v.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two vectors (NaN when one is constant)."""
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else math.nan


def kronecker_curvature(problem: InfluenceProblem, x: torch.Tensor, y: torch.Tensor, cfg: SolverSettings,
                        log: Callable[[str], None] = lambda _: None) -> "KroneckerCurvature":
    """The K-FAC/EK-FAC curvature a solver setting asks for: read from (or written to)
    ``cfg.factor_file`` when one is set, else computed."""
    options = dict(eigen_corrected=cfg.solver == "ekfac", fisher=cfg.fisher, damp_factor=cfg.kfac_damp_factor,
                   chunk_size=cfg.chunk_size, seed=cfg.seed, progress=cfg.progress,
                   factored_damping=cfg.solver == "kfac_factored")
    if cfg.factor_file:
        return KroneckerCurvature.cached(cfg.factor_file, problem, x, y, **options, log=log, save=cfg.save)
    return KroneckerCurvature(problem, x, y, **options)


def influence_chunks(problem: InfluenceProblem, x_test: torch.Tensor, y_test: torch.Tensor,
                     x_train: torch.Tensor, y_train: torch.Tensor, cfg: SolverSettings, test_chunk: int = 1000,
                     log: Callable[[str], None] = print):
    """Influence of every training point on many test points, streamed: yields (start, (k, n))
    for consecutive chunks of ``test_chunk`` test points, so that 10,000 x 60,000 never has to
    sit in memory. The curvature (K-FAC/EK-FAC factors) is built or read once for all chunks;
    other solvers solve chunk by chunk."""
    if cfg.solver in KRONECKER_SOLVERS:
        curvature = kronecker_curvature(problem, x_train, y_train, cfg, log)
        train_io = curvature.linear_layer_io(x_train, y_train, cfg.chunk_size) if curvature.factored_damping else None
        if train_io is not None:  # rank one: every pair in closed form, no (k, p) vectors at all
            for start in range(0, len(x_test), test_chunk):
                test_io = curvature.linear_layer_io(x_test[start:start + test_chunk], y_test[start:start + test_chunk])
                yield start, curvature.factored_pair_scores(test_io, train_io)
            return
        solve = curvature.inverse_hvp
    elif cfg.solver == "trak":  # not a solve: TRAK's kernel, its training side computed once
        trak = Trak(problem, x_train, y_train, cfg.proj_dim, cfg.seed, chunk_size=cfg.chunk_size)
        for start in range(0, len(x_test), test_chunk):
            yield start, trak.scores(x_test[start:start + test_chunk], y_test[start:start + test_chunk])
        return
    elif cfg.solver == "identity":
        def solve(v: torch.Tensor) -> torch.Tensor:
            return v
    else:
        def solve(v: torch.Tensor) -> torch.Tensor:
            return inverse_hvp(problem, v, x_train, y_train, cfg, show_progress=False)[0]
    for start in range(0, len(x_test), test_chunk):
        grads = problem.sample_grads(x_test[start:start + test_chunk], y_test[start:start + test_chunk])
        yield start, influence_sweep(problem, solve(grads), x_train, y_train, cfg.chunk_size, show_progress=False)


# ============================================================================================
# TracIn: influence accumulated along training (Pruthi et al. 2020, TracInCP)
# ============================================================================================
def tracin(checkpoints: list[tuple[InfluenceProblem, float]], x_test: torch.Tensor, y_test: torch.Tensor,
           x_train: torch.Tensor, y_train: torch.Tensor, chunk_size: int = 10000) -> torch.Tensor:
    """TracInCP(t, z) = sum over checkpoints c of lr_c * grad L(t; theta_c) . grad L(z; theta_c), (k, n).

    Positive = z's gradient steps lowered the test loss (a proponent), the same sign as influence
    here. Each checkpoint costs one closed-form sweep; no per-sample gradient is materialised.
    """
    total = None
    for problem, lr in checkpoints:
        grads = problem.sample_grads(x_test, y_test)
        part = influence_sweep(problem, grads, x_train, y_train, chunk_size, show_progress=False) * lr
        total = part if total is None else total + part
    if total is None:
        raise ValueError("TracIn needs at least one checkpoint")
    return total


def tracin_self_influence(checkpoints: list[tuple[InfluenceProblem, float]], x: torch.Tensor, y: torch.Tensor,
                          chunk_size: int = 10000) -> torch.Tensor:
    """TracIn self-influence sum_c lr_c * ||grad L(z; theta_c)||^2 of every point, (n,)."""
    return sum(sample_grad_sq_norms(problem, x, y, chunk_size) * lr for problem, lr in checkpoints)


# ============================================================================================
# finding flipped labels by ranking training points
# ============================================================================================
def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (higher = more suspicious) for the boolean
    ``positives``: the probability that a random positive outranks a random negative (ties 1/2),
    from average ranks (Mann-Whitney U)."""
    positives = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[positives].sum() - n_pos * (n_pos - 1) / 2.0) / (n_pos * n_neg))


def fraction_found(scores: np.ndarray, positives: np.ndarray, inspected: Iterable[float]) -> list[float]:
    """Fraction of the positives among the top ``f`` fraction of the ranking, for each f."""
    positives = np.asarray(positives, dtype=bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = np.cumsum(positives[order])
    return [float(hits[max(int(round(f * len(order))), 1) - 1] / max(positives.sum(), 1)) for f in inspected]


# ============================================================================================
# TRAK (Park et al. 2023) and Arnoldi influence (Schioppa et al. 2022)
# ============================================================================================
def trak_margin(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """TRAK's model output per sample: f = log(p_y / (1 - p_y)) = log p_y - logsumexp_{c != y} log p_c
    (from log-probabilities; stable where p_y is near 1)."""
    correct = output.gather(1, target[:, None]).squeeze(1)
    others = output.scatter(1, target[:, None], -torch.inf)
    return correct - torch.logsumexp(others, dim=1)


class KroneckerProjection:
    """A seeded random projection of per-sample gradients of Linear layers that never forms them.

    A Linear layer's per-sample gradient of (weight | bias) is the rank-one delta a_bar^T (a_bar = the
    input with a 1 appended for the bias). Projecting it by P_out (x) P_in (P_out: d_out x out, P_in:
    d_in x (in + 1), i.i.d. N(0, 1/d) entries) gives vec(P_out delta (P_in a_bar)^T): d_out * d_in
    numbers from two small products per sample (LoGra's structure). The layers' parts are concatenated;
    ``proj_dim`` is shared over the layers in proportion to their parameter counts, each layer's split
    between d_out and d_in in proportion to its shape, capped at the layer's own (out, in + 1), where
    the projection is square and loses nothing. :meth:`dense` is the same projection as an explicit
    (D, p) matrix in the problem's parameter order (for tests).
    """

    def __init__(self, problem: InfluenceProblem, proj_dim: int, seed: int = 0) -> None:
        owners = capturable_owners(problem)
        if owners is None or not all(isinstance(m, nn.Linear) and m.bias is not None for m in owners.values()) or \
                set(problem.param_names) != {f"{n}.{k}" for n in owners for k in ("weight", "bias")}:
            raise ValueError("TRAK's Kronecker projection needs every chosen parameter to be the weight and "
                             "bias of a Linear layer (method2.params: [] on the MNIST MLP)")
        self.owners = owners
        total = sum(m.weight.numel() + m.bias.numel() for m in owners.values())
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, module in owners.items():
            out, width = module.out_features, module.in_features + 1
            share = max(1.0, proj_dim * out * width / total)
            d_out = int(min(out, max(1, round(math.sqrt(share * out / width)))))
            d_in = int(min(width, max(1, round(share / d_out))))
            dtype, device = module.weight.dtype, module.weight.device
            self.factors[name] = (
                (torch.randn(d_out, out, generator=generator, dtype=torch.float64) / math.sqrt(d_out)).to(dtype).to(device),
                (torch.randn(d_in, width, generator=generator, dtype=torch.float64) / math.sqrt(d_in)).to(dtype).to(device))
        self.dim = sum(po.shape[0] * pi.shape[0] for po, pi in self.factors.values())

    def features(self, problem: InfluenceProblem, x: torch.Tensor, y: torch.Tensor,
                 output: SampleLoss = trak_margin, chunk_size: int = 10000) -> torch.Tensor:
        """(n, D): the projected per-sample gradients of ``output`` (default TRAK's margin)."""
        parts = []
        for s in range(0, len(x), chunk_size):
            captured, deltas = _capture(problem, self.owners, x[s:s + chunk_size], y[s:s + chunk_size], output)
            pieces = []
            for (name, _module), delta in zip(self.owners.items(), deltas):
                a = captured[name][0].detach().reshape(len(delta), -1)
                a_bar = torch.cat([a, a.new_ones(len(a), 1)], dim=1)
                p_out, p_in = self.factors[name]
                pieces.append(((delta @ p_out.T)[:, :, None] * (a_bar @ p_in.T)[:, None, :]).reshape(len(a), -1))
            parts.append(torch.cat(pieces, dim=1))
        return torch.cat(parts)

    def dense(self, problem: InfluenceProblem) -> torch.Tensor:
        """The projection as an explicit (D, p) matrix over ``problem``'s flat parameter vector."""
        blocks = {}
        for name, (p_out, p_in) in self.factors.items():
            full = torch.kron(p_out, p_in).reshape(p_out.shape[0] * p_in.shape[0], p_out.shape[1], p_in.shape[1])
            blocks[f"{name}.weight"] = full[:, :, :-1].reshape(len(full), -1)
            blocks[f"{name}.bias"] = full[:, :, -1]
        rows = []
        for name in self.owners:
            d = blocks[f"{name}.weight"].shape[0]
            row = torch.zeros(d, problem.num_params, dtype=blocks[f"{name}.weight"].dtype,
                              device=blocks[f"{name}.weight"].device)
            start = 0
            for pname, size in zip(problem.param_names, problem.sizes):
                if pname in (f"{name}.weight", f"{name}.bias"):
                    row[:, start:start + size] = blocks[pname]
                start += size
            rows.append(row)
        return torch.cat(rows)


class Trak:
    """TRAK's attribution of one model (Park et al. 2023, Eq. 16 with M = 1):

        tau(t, i) = phi_t^T (Phi^T Phi)^-1 phi_i * (1 - p_i)

    phi = P grad_theta f (f = :func:`trak_margin`, P = :class:`KroneckerProjection`), Phi the (n, D)
    features of the training set, p_i the model's probability of training point i's label. The
    training side (Phi, the kernel's LU factors, 1 - p) is computed once; :meth:`scores` serves any
    number of test chunks. The kernel is factored in float64 with a ridge of ``ridge`` x its mean
    diagonal (0 = none; D > n needs one). Positive = the point raises the test margin (it helped),
    the project's convention; an ensemble is the mean of the models' scores (TRAK averages the
    models' kernel terms, then multiplies by the mean (1 - p))."""

    def __init__(self, problem: InfluenceProblem, x_train: torch.Tensor, y_train: torch.Tensor, proj_dim: int,
                 seed: int = 0, ridge: float = 1e-6, chunk_size: int = 10000) -> None:
        self.problem, self.ridge, self.chunk_size = problem, ridge, chunk_size
        self.projection = KroneckerProjection(problem, proj_dim, seed)
        self.phi = self.projection.features(problem, x_train, y_train, chunk_size=chunk_size).double()
        kernel = self.phi.T @ self.phi
        if ridge:
            kernel.diagonal().add_(ridge * kernel.diagonal().mean())
        self.lu = torch.linalg.lu_factor(kernel)  # LU, not Cholesky: without a ridge the kernel may be singular to rounding
        with torch.no_grad():
            probs = torch.cat([problem._output(problem.params, x_train[s:s + chunk_size]).exp().gather(
                1, y_train[s:s + chunk_size, None]).squeeze(1) for s in range(0, len(x_train), chunk_size)])
        self.weights = 1.0 - probs.double()

    def scores(self, x_test: torch.Tensor, y_test: torch.Tensor) -> torch.Tensor:
        """(k, n) TRAK scores of the training points for k test points."""
        phi_test = self.projection.features(self.problem, x_test, y_test, chunk_size=self.chunk_size).double()
        weighted = torch.linalg.lu_solve(*self.lu, phi_test.T)                    # (D, k)
        return ((weighted.T @ self.phi.T) * self.weights[None, :]).to(x_test.dtype)

    def self_influence(self) -> torch.Tensor:
        """(n,) tau(i, i) = phi_i^T (Phi^T Phi)^-1 phi_i (1 - p_i): each point's leverage, weighted."""
        leverage = torch.cat([(torch.linalg.lu_solve(*self.lu, block.T).T * block).sum(1)
                              for block in self.phi.split(self.chunk_size)])
        return leverage * self.weights

    def info(self) -> dict:
        return {"solver": "trak", "proj_dim": self.projection.dim, "ridge": self.ridge, "effective_damping": 0.0,
                "converged": True}


def trak_scores(problem: InfluenceProblem, x_test: torch.Tensor, y_test: torch.Tensor, x_train: torch.Tensor,
                y_train: torch.Tensor, proj_dim: int, seed: int = 0, ridge: float = 1e-6,
                chunk_size: int = 10000) -> tuple[torch.Tensor, dict]:
    """:class:`Trak`'s scores (k, n) for one set of test points, and its info (with the seconds)."""
    import time
    start = time.perf_counter()
    trak = Trak(problem, x_train, y_train, proj_dim, seed, ridge, chunk_size)
    scores = trak.scores(x_test, y_test)
    return scores, {**trak.info(), "seconds_total": round(time.perf_counter() - start, 3)}


def lanczos_eigenpairs(apply: Callable[[torch.Tensor], torch.Tensor], dim: int, iterations: int, seed: int = 0,
                       dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz pairs of a symmetric operator from ``iterations`` Lanczos steps with full
    re-orthogonalisation (the symmetric case of Arnoldi's iteration): (values (m,), vectors (dim, m)),
    values ascending. ``apply`` maps a (1, dim) row to (1, dim). The extreme eigenvalues converge
    first; with iterations = dim the pairs are the exact eigendecomposition (up to rounding). When the
    Krylov space closes (an invariant subspace: repeated eigenvalues, e.g. dead ReLU units), the
    iteration restarts from a fresh random vector orthogonal to the basis (off-diagonal 0)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def orthogonal(w: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
        for _ in range(2):  # full re-orthogonalisation, twice (Kahan's "twice is enough")
            w = w - stacked.T @ (stacked @ w)
        return w

    q = torch.randn(dim, generator=generator, dtype=torch.float64).to(device)
    basis = [q / q.norm()]
    alphas, betas = [], []
    for j in range(min(iterations, dim)):
        w = apply(basis[j][None].to(dtype))[0].to(torch.float64)
        alphas.append(float(basis[j] @ w))
        stacked = torch.stack(basis)
        w = orthogonal(w, stacked)
        beta = float(w.norm())
        if j + 1 == min(iterations, dim):
            break
        if beta < 1e-10 * max(1.0, max(abs(a) for a in alphas)):  # invariant subspace: restart
            w = orthogonal(torch.randn(dim, generator=generator, dtype=torch.float64).to(device), stacked)
            betas.append(0.0)
            basis.append(w / w.norm())
            continue
        betas.append(beta)
        basis.append(w / beta)
    m = len(alphas)
    tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[:m - 1], dtype=torch.float64)
        tri += torch.diag(off, 1) + torch.diag(off, -1)
    values, small = torch.linalg.eigh(tri)
    return values.to(device), torch.stack(basis[:m]).T @ small.to(device)


def arnoldi_inverse_hvp(problem: InfluenceProblem, vectors: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                        rank: int, iterations: int, damp: float, chunk_size: int = 10000, seed: int = 0
                        ) -> tuple[torch.Tensor, dict]:
    """Arnoldi influence's solve (Schioppa et al. 2022): (H + damp I)^-1 restricted to the top-``rank``
    eigenspace of H (the training objective's Hessian, L2 term included), from Lanczos on exact
    full-data HVPs:

        s = U_r diag(1 / (lambda_j + damp)) U_r^T v

    with (lambda_j, U_r) the ``rank`` Ritz pairs of largest |lambda| out of ``iterations`` steps (the
    paper keeps the dominant eigenvalues). Directions outside the subspace are dropped, not damped.
    Returns (s (k, p), info with the eigenvalues kept)."""
    def apply(row: torch.Tensor) -> torch.Tensor:
        return problem.hvp_full(x, y, row, chunk_size)
    values, vecs = lanczos_eigenpairs(apply, problem.num_params, iterations, seed, device=vectors.device)
    keep = torch.argsort(values.abs(), descending=True)[:rank]
    values, vecs = values[keep], vecs[:, keep]
    coefficients = (vectors.detach().double() @ vecs) / (values + damp)[None, :]
    info = {"arnoldi_rank": len(keep), "arnoldi_iterations": iterations,
            "arnoldi_eig_max": float(values.max()), "arnoldi_eig_min_kept": float(values.abs().min())}
    if bool(((values + damp).abs() < 1e-8).any()):
        info["warning"] = "Arnoldi: a kept eigenvalue is -damp: its direction blows up (raise method2.damp)"
    return (coefficients @ vecs.T).to(vectors.dtype), info


# ============================================================================================
# Method 3: the exact metagradient of one SGD run (replay; MAGIC, Ilyas & Engstrom 2025)
# ============================================================================================
METHOD3_SIGN_CONVENTION = (
    "influence[t][i] = -n_train * dF_t/dw_i, F_t the test target (loss, or minus the margin) after the "
    "last step of the replayed run, w_i training point i's data weight (1 = as trained); positive = "
    "point i helped; influence / n_train = the first-order change of F_t when point i is removed "
    "(w_i = 0, same seed, same order: the single-model counterfactual)")


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


@dataclass
class SgdRun:
    """One SGD run as replay needs it (torch.optim.SGD: momentum, weight decay, no dampening).

    ``orders`` (epochs, n) holds each epoch's permutation of the training points; step s reads the
    s-th slice of ``batch_size`` of its epoch (the last one may be shorter). ``data_weights`` (n,)
    weight each point's loss (None = 1 for all)."""
    learning_rate: float
    momentum: float
    weight_decay: float
    batch_size: int
    orders: torch.Tensor
    data_weights: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.orders.shape[1]

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n // self.batch_size)

    @property
    def num_steps(self) -> int:
        return self.orders.shape[0] * self.steps_per_epoch

    def batch(self, step: int) -> torch.Tensor:
        epoch, position = divmod(step, self.steps_per_epoch)
        return self.orders[epoch, position * self.batch_size:(position + 1) * self.batch_size]


class _Replay:
    """What every Method-3 replay shares: the replayed parameters as flat vectors, and the forward
    replay that keeps the optimiser's state every ``checkpoint_interval`` steps. A subclass sets
    ``run`` (with ``num_steps``), calls :meth:`_keep` with the parameters it replays, and defines
    ``_start_state()`` (the flat state before step 0, parameters first) and
    ``_steps(start, stop, state, store=None)`` (the state after step stop-1)."""

    def _keep(self, model: nn.Module, names: list[str]) -> None:
        named = dict(model.named_parameters())
        self.names = names
        self.initial = [named[n].detach().clone() for n in names]
        self.shapes = [t.shape for t in self.initial]
        self.sizes = [t.numel() for t in self.initial]
        self.checkpoints: dict[int, tuple] = {}
        self.interval = 0

    @property
    def num_params(self) -> int:
        return sum(self.sizes)

    @staticmethod
    def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in tensors])

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        lead = flat.shape[:-1]
        return [piece.reshape(*lead, *shape) for piece, shape in
                zip(torch.split(flat, self.sizes, dim=-1), self.shapes)]

    def _jvp_primal(self, params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights by name as torch.func.jvp primals: copies, never views of the walk's segment
        store, since forward-mode AD gives every view a tangent as large as its base (measured on
        FFDNet: 9.8 GB and 7x slower per step with views)."""
        return {name: p.clone() for name, p in zip(self.names, params)}

    def forward(self, checkpoint_interval: int = 0, progress: Callable | None = None) -> dict[str, torch.Tensor]:
        """Replay the whole run from the model's initial weights, keeping the state every
        ``checkpoint_interval`` steps (0 = about sqrt(T)). Returns the final parameters by name.
        ``progress``: a tqdm-like factory for a bar (None = silent)."""
        total = self.run.num_steps
        self.interval = checkpoint_interval or max(1, int(math.ceil(math.sqrt(total))))
        state = self._start_state()
        self.checkpoints = {}
        bar = _step_bar(progress, total, "replay forward")
        for start in range(0, total, self.interval):
            self.checkpoints[start] = state
            stop = min(start + self.interval, total)
            state = self._steps(start, stop, state)
            bar.update(stop - start)
        bar.close()
        return dict(zip(self.names, self._split(state[0])))


class SgdReplay(_Replay):
    """Method 3: d F(theta_T) / d w for every training point's data weight w_i, exactly, by reverse
    mode through every step of one SGD run (Ilyas & Engstrom 2025, "MAGIC"; Maclaurin et al. 2015).

    The run (torch.optim.SGD, as Train.py trains): with L_s(theta) = sum_{i in B_s} w_i l_i(theta) / |B_s|,

        g_s = grad L_s(theta_s) + lambda theta_s,   b_s = mu b_{s-1} + g_s  (b_{-1} = 0),
        theta_{s+1} = theta_s - eta b_s.

    Walking back from a_T = grad F(theta_T) with v_{T-1} = -eta a_T, each step s = T-1, ..., 0 does

        dF/dw_i   += v_s . grad l_i(theta_s) / |B_s|          for i in B_s,
        a_s        = a_{s+1} + (H_s + lambda I) v_s            (H_s the Hessian of L_s at theta_s),
        v_{s-1}    = mu v_s - eta a_s,

    where a_s = dF/dtheta_s and v_s = dF/db_s. The adjoint is linear in a_T, so k test targets walk
    back together as (k, p) blocks. Both step products come from one forward-over-reverse pass: the
    directional derivative of each point's loss along v (its score) and H_s v. Generic models use
    ``torch.func`` (jvp of grad, vmapped over the k vectors); a ReLU or softplus MLP with NLL uses the
    hand-written R-operator (:class:`ReluMlpHvp`): the score is residual_i . R z_L,i and no per-sample
    gradient is formed. That path is checked against the generic one on the first step it walks.

    Memory: the forward replay keeps (theta, b) every ``checkpoint_interval`` steps; each segment is
    recomputed forward (keeping its theta_s) before it is walked back. Peak: 2p floats per checkpoint
    + interval x p floats + 2kp for the adjoint. The forward replay is torch.optim.SGD on the same
    batches, so it reproduces a run made the same way to the last bit on the same machine.
    """

    def __init__(self, model: nn.Module, sample_loss: SampleLoss, run: SgdRun, x: torch.Tensor,
                 y: torch.Tensor, closed_form: bool | None = None, fold_steps: int = 32) -> None:
        self.model, self.sample_loss, self.run, self.x, self.y = model, sample_loss, run, x, y
        self.fold_steps = fold_steps  # MLP path: steps per folded block of the first weight (1 = step by step)
        self._keep(model, [n for n, _ in model.named_parameters()])
        self.buffers = dict(model.named_buffers())
        found = mlp_layers(model) if sample_loss is nll_sample_loss else None
        self.mlp = None
        if found is not None and closed_form is not False:
            self.mlp = ReluMlpHvp(InfluenceProblem(model, nll_sample_loss, self.names), *found)
        elif closed_form:
            raise ValueError("closed_form=True needs a ReLU or softplus MLP with NLL loss (mlp_layers)")
        self.info: dict = {"path": f"{found[1]}_mlp_closed_form" if self.mlp is not None else "torch_func"}

    # ---- forward: the run itself ------------------------------------------------------------------
    def _weights(self, idx: torch.Tensor) -> torch.Tensor | None:
        return None if self.run.data_weights is None else self.run.data_weights[idx]

    def _start_state(self) -> tuple[torch.Tensor, None]:
        return self._flat(self.initial), None  # (theta, b): no momentum buffer before the first step

    def _steps(self, start: int, stop: int, state: tuple[torch.Tensor, torch.Tensor | None],
               store: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run steps start..stop-1 from flat (theta, b); ``store`` (stop-start, p) receives each
        step's theta_s. Returns the flat (theta, b) after step stop-1."""
        run, (params, buffer) = self.run, state
        leaves = [t.clone().requires_grad_(True) for t in self._split(params)]
        optimizer = torch.optim.SGD(leaves, lr=run.learning_rate, momentum=run.momentum,
                                    weight_decay=run.weight_decay)
        if buffer is not None:
            for leaf, b in zip(leaves, self._split(buffer)):
                optimizer.state[leaf]["momentum_buffer"] = b.clone()
        for step in range(start, stop):
            if store is not None:
                torch.cat([t.detach().reshape(-1) for t in leaves], out=store[step - start])
            idx = run.batch(step)
            losses = self.sample_loss(functional_call(self.model, {**dict(zip(self.names, leaves)), **self.buffers},
                                                      (self.x[idx],)), self.y[idx])
            weights = self._weights(idx)
            loss = losses.mean() if weights is None else weighted_batch_loss(losses, weights)
            for leaf, g in zip(leaves, torch.autograd.grad(loss, leaves)):
                leaf.grad = g
            optimizer.step()
        buffers = [optimizer.state[leaf].get("momentum_buffer") for leaf in leaves]
        return self._flat(leaves), None if buffers[0] is None else self._flat(buffers)

    # ---- backward: the metagradient ---------------------------------------------------------------
    def _products_generic(self, params: list[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor,
                          wb: torch.Tensor | None, v: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(v . grad l_i for each batch member (k, B), H v without the L2 term, per parameter (k, ...))."""
        weights = torch.ones(len(xb), dtype=xb.dtype, device=xb.device) if wb is None else wb

        def loss_and_samples(p: dict):
            losses = self.sample_loss(functional_call(self.model, {**p, **self.buffers}, (xb,)), yb)
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
        run, lr, mom, wd = self.run, self.run.learning_rate, self.run.momentum, self.run.weight_decay
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
            directional, hv, rg = self._mlp_step(params, self.x[idx], self.y[idx], self._weights(idx),
                                                 {self.names[i]: v[i] for i in rest}, pre.transpose(1, 2)[None])
            updates[:, :, cols] = rg[0].transpose(1, 2)
            scores.index_add_(1, idx, directional.to(torch.float64) / len(idx))
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
        d_ref, hv_ref = self._products_generic(params, xb, yb, wb, few)
        error = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item()
                    for a, b in zip([d_hand, *hv_hand], [d_ref, *hv_ref]) if b.norm() > 0)
        self.info["closed_form_check_relative_error"] = error
        if error > 1e-3:
            self.info["closed_form_check"] = (f"the hand-written MLP products differ from torch.func by {error:.2g} "
                                              f"(relative): the model is not the ReLU MLP its modules suggest; "
                                              f"used torch.func")
            self.info["path"] = "torch_func"
            self.mlp = None

    def metagradient(self, target_grads: torch.Tensor, progress: Callable | None = None) -> torch.Tensor:
        """dF_t/dw_i (k, n) float64 for k targets whose gradients at the final weights are the rows of
        ``target_grads`` (k, p), in ``model.named_parameters()`` order. Needs :meth:`forward` first."""
        if not self.checkpoints:
            raise RuntimeError("SgdReplay.metagradient: run forward() first (it keeps the checkpoints)")
        run, total = self.run, self.run.num_steps
        lr, mom, wd = run.learning_rate, run.momentum, run.weight_decay
        a = [t.clone() for t in self._split(target_grads.detach().to(self.initial[0].dtype))]
        v = [t * -lr for t in a]
        scores = torch.zeros(len(target_grads), run.n, dtype=torch.float64, device=target_grads.device)
        store = torch.empty(self.interval, self.num_params, dtype=self.initial[0].dtype, device=self.x.device)
        checked = self.mlp is None
        bar = _step_bar(progress, total, "replay backward")
        for start in sorted(self.checkpoints, reverse=True):
            stop = min(start + self.interval, total)
            self._steps(start, stop, self.checkpoints[start], store=store)
            walk = list(reversed(range(start, stop)))
            if not checked:
                step = walk[0]
                idx = run.batch(step)
                self._check_closed_form(self._split(store[step - start]), self.x[idx], self.y[idx],
                                        self._weights(idx), v)
                checked = True
            if self.mlp is not None and self.fold_steps > 1:
                for b in range(0, len(walk), self.fold_steps):
                    self._walk_folded(walk[b:b + self.fold_steps], store, start, a, v, scores)
                bar.update(stop - start)
                continue
            for step in walk:
                params = self._split(store[step - start])
                idx = run.batch(step)
                xb, yb, wb = self.x[idx], self.y[idx], self._weights(idx)
                products = self._products_mlp if self.mlp is not None else self._products_generic
                directional, hv = products(params, xb, yb, wb, v)
                scores.index_add_(1, idx, directional.to(torch.float64) / len(idx))
                for a_p, v_p, hv_p in zip(a, v, hv):  # a_s = a_{s+1} + (H_s + lambda) v_s; v_{s-1} = mu v_s - eta a_s
                    a_p.add_(hv_p).add_(v_p, alpha=wd)
                    v_p.mul_(mom).add_(a_p, alpha=-lr)
            bar.update(stop - start)
        bar.close()
        return scores


def replay_error(final: dict[str, torch.Tensor], model: nn.Module) -> float:
    """Relative distance ||theta_replayed - theta_model|| / ||theta_model|| over the model's trainable
    parameters: how far a Method-3 replay ended from the run it claims to replay."""
    saved = {n: p for n, p in model.named_parameters() if p.requires_grad}
    diff = sum(float((final[n] - p.detach()).pow(2).sum()) for n, p in saved.items())
    size = sum(float(p.detach().pow(2).sum()) for p in saved.values())
    return (diff / max(size, 1e-30)) ** 0.5


class _NoBar:
    def update(self, _: int) -> None:
        pass

    def close(self) -> None:
        pass


def _step_bar(progress: Callable | None, total: int, desc: str):
    """A bar from the caller's tqdm-like factory, or one that shows nothing."""
    return progress(total=total, desc=desc, unit="step") if progress else _NoBar()


@dataclass
class AdamRun:
    """One Adam run as replay needs it (torch.optim.Adam: no weight decay, no amsgrad): ``orders``
    (steps, batch) holds each step's training points; ``data_weights`` (n,) weight each point's loss
    (None = 1 for all). The batch loss is sum_i w_i l_i / |B|."""
    learning_rate: float
    orders: torch.Tensor
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    data_weights: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        return self.orders.shape[0]

    def batch(self, step: int) -> torch.Tensor:
        return self.orders[step]


class AdamReplay(_Replay):
    """Method 3 through an Adam run (the FFDNet fine-tuning): d F(theta_T) / d w_i for every training
    point's data weight, exactly, by reverse mode through every step (Ilyas & Engstrom 2025 do Adam too).

    The run (torch.optim.Adam, step t = 1..T, g_t = grad L_t(theta_{t-1}), L_t = sum_{i in B_t} w_i l_i / |B|):

        m_t = b1 m_{t-1} + (1 - b1) g_t,    v_t = b2 v_{t-1} + (1 - b2) g_t^2,
        theta_t = theta_{t-1} - c1_t m_t / d_t,   d_t = sqrt(v_t) c2_t + eps,
        c1_t = lr / (1 - b1^t),   c2_t = 1 / sqrt(1 - b2^t).

    Walking back from A = grad F(theta_T), M = V = 0 (the adjoints of theta_t, m_t, v_t), each step does

        M += -A c1_t / d_t,     V += A c1_t c2_t m_t / (2 d_t^2 sqrt(v_t))     (0 where v_t = 0),
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
        optimizer = torch.optim.Adam(leaves, lr=self.run.learning_rate, betas=self.run.betas, eps=self.run.eps)
        if start:
            for leaf, mi, vi in zip(leaves, self._split(m), self._split(v)):
                optimizer.state[leaf].update(step=torch.tensor(float(start)), exp_avg=mi.clone(), exp_avg_sq=vi.clone())
        for step in range(start, stop):
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

    def _moments(self, optimizer: torch.optim.Adam, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
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
        (b1, b2), eps, lr = run.betas, run.eps, run.learning_rate
        dtype = self.initial[0].dtype
        a = target_grads.detach().to(dtype).clone()
        m_adj, v_adj = torch.zeros_like(a), torch.zeros_like(a)
        n = len(self.targets)
        scores = torch.zeros(len(a), n, dtype=torch.float64, device=a.device)
        store = torch.empty(self.interval, 4, self.num_params, dtype=dtype, device=a.device)
        bar = _step_bar(progress, total, "replay backward")
        for start in sorted(self.checkpoints, reverse=True):
            stop = min(start + self.interval, total)
            self._steps(start, stop, self.checkpoints[start], store=store)
            for step in reversed(range(start, stop)):
                theta, m, v, g = store[step - start]
                t = step + 1
                c1, c2 = lr / (1 - b1 ** t), 1.0 / math.sqrt(1 - b2 ** t)
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
