"""TRAK and Arnoldi influence against explicit computations on tiny models (float64): the Kronecker
projection against a dense projection of explicit per-sample gradients, TRAK with an unprojected
(square) feature map against the closed-form linearised datamodel, Lanczos against a dense
eigendecomposition, Arnoldi with the full rank against the exact damped solve."""
import pytest
import torch
from torch import nn

import utils_if as U


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.LogSoftmax(dim=1)).double()


def data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def problem(model, l2: float = 0.0) -> U.InfluenceProblem:
    return U.InfluenceProblem(model, U.nll_sample_loss, U.select_parameters(model), l2_reg=l2)


def test_trak_margin_is_log_odds_of_the_label():
    logp = torch.log_softmax(torch.randn(4, 3, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 2, 1, 1])
    p = logp.exp().gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(U.trak_margin(logp, y), torch.log(p / (1 - p)))


@pytest.mark.parametrize("proj_dim", [7, 20, 10_000])
def test_kronecker_projection_equals_dense_projection_of_explicit_gradients(proj_dim):
    model = tiny()
    prob = problem(model)
    x, y = data(30, 1)
    projection = U.KroneckerProjection(prob, proj_dim, seed=3)
    explicit = prob.sample_grads(x, y, loss=U.trak_margin)                 # (n, p) margin gradients
    dense = projection.dense(prob)                                           # (D, p)
    assert dense.shape == (projection.dim, prob.num_params)
    assert (projection.dim == prob.num_params) == (proj_dim >= prob.num_params)
    assert torch.allclose(projection.features(prob, x, y, chunk_size=7), explicit @ dense.T, atol=1e-12)


def test_trak_with_a_square_projection_is_the_closed_form_linearised_datamodel():
    model = tiny()
    prob = problem(model)
    x, y = data(200, 1)
    x_t, y_t = data(4, 2)
    scores, info = U.trak_scores(prob, x_t, y_t, x, y, proj_dim=10_000, ridge=0.0)
    assert info["proj_dim"] == prob.num_params
    g = prob.sample_grads(x, y, loss=U.trak_margin)
    g_t = prob.sample_grads(x_t, y_t, loss=U.trak_margin)
    p = model(x).exp().gather(1, y[:, None]).squeeze(1).detach()
    closed = g_t @ torch.linalg.solve(g.T @ g, g.T) * (1 - p)[None, :]
    assert torch.allclose(scores, closed, rtol=1e-7, atol=1e-9 * closed.abs().max().item())
    projected, _ = U.trak_scores(prob, x_t, y_t, x, y, proj_dim=20, ridge=0.0)
    assert not torch.allclose(projected, closed, atol=1e-3)  # a real projection changes the scores


def test_lanczos_equals_the_dense_eigendecomposition_and_arnoldi_the_exact_solve():
    model = tiny()
    prob = problem(model, l2=0.01)
    x, y = data(80, 1)
    hessian = prob.dense_hessian(x, y).double()
    exact_values, exact_vectors = torch.linalg.eigh(hessian)
    values, vectors = U.lanczos_eigenpairs(lambda r: prob.hvp_full(x, y, r), prob.num_params, prob.num_params)
    assert torch.allclose(values, exact_values, atol=1e-8)
    top = torch.argsort(exact_values.abs(), descending=True)[:3]
    mine = torch.argsort(values.abs(), descending=True)[:3]
    overlap = (vectors[:, mine] * exact_vectors[:, top]).sum(0).abs()
    assert torch.allclose(overlap, torch.ones(3, dtype=torch.float64), atol=1e-6)
    v = prob.sample_grads(*data(3, 2))
    full, info = U.arnoldi_inverse_hvp(prob, v, x, y, rank=prob.num_params, iterations=prob.num_params, damp=1.0)
    solve = torch.linalg.solve(hessian + torch.eye(prob.num_params, dtype=torch.float64), v.T).T
    assert torch.allclose(full, solve, atol=1e-8) and info["arnoldi_rank"] == prob.num_params
    few, _ = U.arnoldi_inverse_hvp(prob, v, x, y, rank=3, iterations=prob.num_params, damp=1.0)
    expected = (v @ exact_vectors[:, top]) / (exact_values[top] + 1.0) @ exact_vectors[:, top].T
    assert torch.allclose(few, expected, atol=1e-8)


def test_m2_script_writes_trak_and_arnoldi(tmp_path, mnist_raw):
    from conftest import small_settings
    from mnist_test import Train, m2_Test
    import utils_option as opt
    settings = small_settings(tmp_path)
    Train.main(settings)
    for change in ({"solver": "trak", "proj_dim": 256}, {"solver": "arnoldi", "arnoldi_rank": 5, "arnoldi_iterations": 10}):
        s = opt.with_values(settings, {"mnist": {"method2": change}})
        out = m2_Test.main(s)
        record = opt.read_json(out["if_file"], "m2_Test")
        row = torch.tensor(record["0"]["influence"])
        assert row.shape == (600,) and torch.isfinite(row).all() and row.abs().max() > 0
        assert record["meta"]["solver_info"]["solver"] == change["solver"]
