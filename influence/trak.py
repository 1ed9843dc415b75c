"""TRAK (Park et al. 2023): projected gradients of the margin and the kernel of the training set."""
from __future__ import annotations

import math

import torch

from influence.layers import linear_owners
from influence.losses import SampleLoss, trak_margin
from influence.problem import InfluenceProblem


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
        owners = linear_owners(problem)
        if owners is None or not all(m.bias is not None for m in owners.values()) or \
                set(problem.param_names) != {f"{n}.{k}" for n in owners for k in ("weight", "bias")}:
            raise ValueError("TRAK's Kronecker projection needs every chosen parameter to be the weight and "
                             "bias of a Linear layer (e.g. every parameter of an MLP)")
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
            captured, deltas = problem.capture(self.owners, x[s:s + chunk_size], y[s:s + chunk_size], output)
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
            probs = torch.cat([problem.output(problem.params, x_train[s:s + chunk_size]).exp().gather(
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
        return {"proj_dim": self.projection.dim, "ridge": self.ridge, "effective_damping": 0.0,
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
