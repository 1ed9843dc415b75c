"""Kronecker-factored curvature (K-FAC, EK-FAC, K-FAC with factored damping) for Linear and Conv2d layers."""
from __future__ import annotations

import math
from typing import Callable

import torch

from influence.layers import kronecker_owners, layer_rule
from influence.problem import InfluenceProblem


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
            logp = self.problem.output(self.problem.params, xb)
        return torch.multinomial(logp.exp().cpu(), 1, generator=generator).squeeze(1).to(yb.device)

    def _io(self, xb: torch.Tensor, yb: torch.Tensor):
        """(layer, inputs (b, L, d) with a ones column for the bias, output gradients (b, L, out))
        of every layer: L = 1 for Linear, the output positions for Conv2d (unfolded patches)."""
        captured, deltas = self.problem.capture(self.owners, xb, yb, self.problem.sample_loss)
        for (name, module), delta in zip(self.owners.items(), deltas):
            a, delta = layer_rule(module).patches(module, captured[name][0].detach(), delta.detach())
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
        if not all(layer_rule(m).rank_one for m in self.owners.values()):
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
