"""GGN-CG (issue 37's better curvature): the Gauss-Newton product against the dense Gauss-Newton
matrix built from Jacobians, for cross-entropy (a classifier) and the squared error (a denoiser), and
the solver's s_test against a dense solve of (G + damp I)."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import utils_if as U


def tiny(out_dim: int, log_probabilities: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(5, 4), nn.Softplus(), nn.Linear(4, out_dim)] + ([nn.LogSoftmax(dim=1)] if log_probabilities else [])
    return nn.Sequential(*layers).double()


def dense_ggn(problem: U.InfluenceProblem, x: torch.Tensor, y: torch.Tensor, at_logits: bool) -> torch.Tensor:
    """(1/n) sum_i J_i^T H_i J_i from each sample's output Jacobian and its loss's output Hessian; for
    the classifier at the logits (the net without its LogSoftmax), H_i = diag(p) - p p^T."""
    params = {n: problem.params[n] for n in problem.param_names}
    total = torch.zeros(problem.num_params, problem.num_params, dtype=torch.float64)
    for xi, yi in zip(x, y):
        net = problem.model[:-1] if at_logits else problem.model  # the logits share the parameters' names

        def out(p):
            return functional_call(net, {**problem.frozen, **p}, (xi[None],))[0]
        jac = problem.flatten(jacrev(out)(params), batch_dims=1)  # (C, p)
        if at_logits:
            prob = torch.softmax(out(params).detach(), 0)
            h_out = torch.diag(prob) - torch.outer(prob, prob)
        else:
            h_out = hessian(lambda o: problem.sample_loss(o[None], yi[None])[0])(out(params).detach())
        total += jac.T @ h_out @ jac
    return total / len(x)


@pytest.mark.parametrize("kind", ["cross_entropy", "squared_error"])
def test_ggn_product_and_solve_equal_the_dense_gauss_newton(kind):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    if kind == "cross_entropy":  # the MNIST MLP's shape: log-probabilities and NLL
        model, y, loss = tiny(3, log_probabilities=True), torch.randint(0, 3, (12,), generator=g), U.nll_sample_loss
    else:
        model, y, loss = tiny(2), torch.randn(12, 2, generator=g, dtype=torch.float64), U.mse_sample_loss
    problem = U.InfluenceProblem(model, loss, [n for n, _ in model.named_parameters()], l2_reg=0.01)
    dense = dense_ggn(problem, x, y, at_logits=kind == "cross_entropy") + 0.01 * torch.eye(problem.num_params, dtype=torch.float64)
    vectors = torch.randn(3, problem.num_params, generator=g, dtype=torch.float64)
    assert torch.allclose(problem.ggnvp_full(x, y, vectors, chunk_size=5), vectors @ dense.T, atol=1e-10)
    assert torch.linalg.eigvalsh(dense).min() > 0  # positive definite: what lets CG converge
    cfg = U.solver_config("ggn_cg", damp=0.001, cg_tol=1e-12, cg_max_iter=200)
    solver = U.solver_for("ggn_cg")
    info: dict = {}
    s_test = solver.inverse_hvp(problem, vectors, x, y, cfg, info, show_progress=False)
    expected = torch.linalg.solve(dense + 0.001 * torch.eye(problem.num_params, dtype=torch.float64), vectors.T).T
    assert info["converged"] and torch.allclose(s_test, expected, rtol=1e-7, atol=1e-9)
    # and it is not the Hessian: for a nonlinear net they differ
    hessian_dense = problem.dense_hessian(x, y)
    assert (hessian_dense - dense).abs().max() > 1e-3
