"""K-FAC / EK-FAC against brute-force covariances and dense matrices built from the factors; the
identity (gradient dot product) solver, CG's non-convergence flag, and the LDS math by hand."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import utils_if as U


class SmallMLP(nn.Module):
    """7 -> 5 (ReLU) -> 4 log-softmax: two Linear layers, 64 parameters."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(7, 5)
        self.fc2 = nn.Linear(5, 4)

    def forward(self, x):
        return torch.log_softmax(self.fc2(torch.relu(self.fc1(x))), dim=1)


@pytest.fixture(scope="module")
def problem_data():
    torch.manual_seed(0)
    net = SmallMLP().double()
    x = torch.randn(90, 7, dtype=torch.float64)
    y = torch.randint(0, 4, (90,))
    problem = U.InfluenceProblem(net, U.nll_sample_loss, U.select_parameters(net), l2_reg=0.01)
    return net, problem, x, y


def per_sample_layer_io(net, x, y):
    """Brute force, one sample at a time: (a_bar, delta, flat grad of (W|b)) per layer."""
    out = {"fc1": [], "fc2": []}
    for i in range(len(x)):
        xi = x[i:i + 1]
        h = net.fc1(xi)
        z1 = h.detach().requires_grad_(True)
        z2 = net.fc2(torch.relu(z1))
        z2l = z2.detach().requires_grad_(True)
        loss = -torch.log_softmax(z2l, 1)[0, y[i]]
        d2, = torch.autograd.grad(loss, z2l)
        d1, = torch.autograd.grad(z2, z1, d2)
        for name, a, d in (("fc1", xi, d1), ("fc2", torch.relu(h), d2)):
            a_bar = torch.cat([a.detach()[0], torch.ones(1, dtype=a.dtype)])
            out[name].append((a_bar, d[0].detach(), torch.outer(d[0].detach(), a_bar).reshape(-1)))
    return out


def test_kfac_factors_equal_brute_force_covariances(problem_data):
    net, problem, x, y = problem_data
    curv = U.KroneckerCurvature(problem, x, y, eigen_corrected=False, fisher="empirical", chunk_size=32)
    io = per_sample_layer_io(net, x, y)
    for name in ("fc1", "fc2"):
        a = torch.stack([r[0] for r in io[name]])
        d = torch.stack([r[1] for r in io[name]])
        assert torch.allclose(curv.A[name], a.T @ a / len(x), atol=1e-12)
        assert torch.allclose(curv.S[name], d.T @ d / len(x), atol=1e-12)
        # K-FAC eigenvalues are the products of the factors' eigenvalues
        expected = torch.linalg.eigvalsh(curv.S[name])[:, None] * torch.linalg.eigvalsh(curv.A[name])[None, :]
        assert torch.allclose(curv.eigenvalues[name], expected.clamp_min(0), atol=1e-12)


def test_ekfac_eigenvalues_are_the_exact_fisher_diagonal_in_the_kronecker_basis(problem_data):
    net, problem, x, y = problem_data
    curv = U.KroneckerCurvature(problem, x, y, eigen_corrected=True, fisher="empirical", chunk_size=32)
    io = per_sample_layer_io(net, x, y)
    for name in ("fc1", "fc2"):
        grads = torch.stack([r[2] for r in io[name]])                     # (n, out*(in+1))
        fisher = grads.T @ grads / len(x)                                 # exact empirical block
        basis = torch.kron(curv.QS[name], curv.QA[name])
        diagonal = torch.diagonal(basis.T @ fisher @ basis)
        assert torch.allclose(curv.eigenvalues[name].reshape(-1), diagonal, rtol=1e-9, atol=1e-14)


def test_single_sample_kfac_block_is_the_exact_fisher_block(problem_data):
    """With one sample, S (x) A = (delta delta^T) (x) (a a^T) = g g^T exactly."""
    net, problem, x, y = problem_data
    curv = U.KroneckerCurvature(problem, x[:1], y[:1], eigen_corrected=False, fisher="empirical")
    g = per_sample_layer_io(net, x[:1], y[:1])["fc2"][0][2]
    assert torch.allclose(torch.kron(curv.S["fc2"], curv.A["fc2"]), torch.outer(g, g), atol=1e-12)


def dense_from_factors(curv, problem):
    """The block-diagonal (EK-)FAC matrix + damping, built explicitly, in the problem's order."""
    p = problem.num_params
    dense = torch.zeros(p, p, dtype=torch.float64)
    offsets, start = {}, 0
    for name, size in zip(problem.param_names, problem.sizes):
        offsets[name] = start
        start += size
    for layer in curv.owners:
        basis = torch.kron(curv.QS[layer], curv.QA[layer])
        block = basis @ torch.diag(curv.eigenvalues[layer].reshape(-1)) @ basis.T
        block += curv.damping[layer] * torch.eye(len(block), dtype=torch.float64)
        out, cols = curv.eigenvalues[layer].shape
        # block index o*cols + j: weight (o, j) for j < d (conv kernels flattened), bias o for j = d
        index = []
        for o in range(out):
            for j in range(cols):
                index.append(offsets[f"{layer}.weight"] + o * (cols - 1) + j if j < cols - 1
                             else offsets[f"{layer}.bias"] + o)
        index = torch.tensor(index)
        dense[index[:, None], index[None, :]] = block
    return dense


@pytest.mark.parametrize("corrected,fisher", [(True, "true"), (False, "empirical"), (True, "empirical")])
def test_inverse_hvp_equals_dense_solve_of_the_same_matrix(problem_data, corrected, fisher):
    net, problem, x, y = problem_data
    curv = U.KroneckerCurvature(problem, x, y, eigen_corrected=corrected, fisher=fisher,
                                damp_factor=0.1, chunk_size=40, seed=3)
    v = torch.randn(3, problem.num_params, dtype=torch.float64)
    dense = dense_from_factors(curv, problem)
    expected = torch.linalg.solve(dense, v.T).T
    got = curv.inverse_hvp(v)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    # damping: the heuristic 0.1 x mean eigenvalue, plus the objective's L2 term
    for layer, lam in curv.eigenvalues.items():
        assert curv.damping[layer] == pytest.approx(0.1 * lam.mean().item() + 0.01)


def test_true_fisher_labels_are_seeded_and_differ_from_empirical(problem_data):
    net, problem, x, y = problem_data
    a = U.KroneckerCurvature(problem, x, y, fisher="true", seed=5)
    b = U.KroneckerCurvature(problem, x, y, fisher="true", seed=5)
    c = U.KroneckerCurvature(problem, x, y, fisher="empirical")
    assert torch.equal(a.S["fc2"], b.S["fc2"])
    assert not torch.allclose(a.S["fc2"], c.S["fc2"], atol=1e-3)


def test_identity_solver_is_the_gradient_dot_product_and_norms_are_exact(problem_data):
    net, problem, x, y = problem_data
    grads = problem.sample_grads(x, y)
    influence, info = U.compute_influences(problem, x[:4], y[:4], x, y, U.solver_config("identity"),
                                           show_progress=False)
    assert torch.allclose(influence, grads[:4] @ grads.T, atol=1e-10)
    assert torch.allclose(U.sample_grad_sq_norms(problem, x, y, chunk_size=17), grads.square().sum(1), atol=1e-12)
    ekfac, info = U.compute_influences(problem, x[:4], y[:4], x, y, U.solver_config("ekfac"),
                                       show_progress=False)
    assert info["eigen_corrected"] and set(info["damping_per_layer"]) == {"fc1", "fc2"}
    curv = U.KroneckerCurvature(problem, x, y, seed=0, chunk_size=10000)
    assert torch.allclose(ekfac, curv.inverse_hvp(grads[:4]) @ grads.T, atol=1e-10)


def test_kfac_refuses_batchnorm_parameters():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3), nn.LogSoftmax(1)).eval()
    problem = U.InfluenceProblem(net, U.nll_sample_loss, U.select_parameters(net))
    with pytest.raises(ValueError, match="1.weight belongs to BatchNorm2d: leave it out of params"):
        U.KroneckerCurvature(problem, torch.randn(4, 1, 4, 4), torch.zeros(4, dtype=torch.long))
    chosen = U.InfluenceProblem(net, U.nll_sample_loss, U.select_parameters(net, ["0.", "3."]))
    U.KroneckerCurvature(chosen, torch.randn(4, 1, 4, 4), torch.zeros(4, dtype=torch.long))  # BN held fixed


class TinyConvNet(nn.Module):
    """1x5x5 -> conv 3x3 (2 ch, padding 1) -> ReLU -> conv 2x2 stride 2 (3 ch) -> linear 3*2*2 -> 4."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 3, padding=1)
        self.c2 = nn.Conv2d(2, 3, 2, stride=2)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        h = self.c2(torch.relu(self.c1(x)))
        return torch.log_softmax(self.fc(torch.relu(h).flatten(1)), dim=1)


@pytest.fixture(scope="module")
def conv_problem():
    torch.manual_seed(1)
    net = TinyConvNet().double()
    x = torch.randn(30, 1, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (30,))
    return net, U.InfluenceProblem(net, U.nll_sample_loss, U.select_parameters(net), l2_reg=0.0), x, y


def test_conv_factors_equal_a_loop_over_positions(conv_problem):
    net, problem, x, y = conv_problem
    curv = U.KroneckerCurvature(problem, x, y, eigen_corrected=False, fisher="empirical", chunk_size=7)
    a_sum, s_sum, count = torch.zeros(3 * 3 * 1 + 1, 3 * 3 * 1 + 1, dtype=torch.float64), \
        torch.zeros(2, 2, dtype=torch.float64), 0
    for i in range(len(x)):  # brute force: every output position of c1 by hand
        z1 = net.c1(x[i:i + 1])
        z1l = z1.detach().requires_grad_(True)
        loss = -torch.log_softmax(net.fc(torch.relu(net.c2(torch.relu(z1l))).flatten(1)), 1)[0, y[i]]
        delta, = torch.autograd.grad(loss, z1l)
        padded = nn.functional.pad(x[i, 0], (1, 1, 1, 1))
        for r in range(5):
            for c in range(5):
                a_bar = torch.cat([padded[r:r + 3, c:c + 3].reshape(-1), torch.ones(1, dtype=torch.float64)])
                a_sum += torch.outer(a_bar, a_bar)
                s_sum += torch.outer(delta[0, :, r, c], delta[0, :, r, c])
                count += 1
    assert torch.allclose(curv.A["c1"], a_sum / count, atol=1e-12)
    assert torch.allclose(curv.S["c1"], s_sum / len(x), atol=1e-12)


def test_conv_ekfac_is_the_exact_fisher_diagonal_and_solves_exactly(conv_problem):
    net, problem, x, y = conv_problem
    curv = U.KroneckerCurvature(problem, x, y, eigen_corrected=True, fisher="empirical", chunk_size=11)
    grads = problem.sample_grads(x, y).double()
    dense = dense_from_factors(curv, problem)
    start = 0
    for name, size in zip(problem.param_names, problem.sizes):
        if name.endswith(".weight"):
            layer = name.rpartition(".")[0]
            out = curv.eigenvalues[layer].shape[0]
            w = grads[:, start:start + size].reshape(len(x), out, -1)
            b = grads[:, start + size:start + size + out]
            g = torch.cat([w, b[..., None]], dim=2).reshape(len(x), -1)      # (n, out*(d+1)) row-major
            basis = torch.kron(curv.QS[layer], curv.QA[layer])
            diagonal = torch.diagonal(basis.T @ (g.T @ g / len(x)) @ basis)
            assert torch.allclose(curv.eigenvalues[layer].reshape(-1), diagonal, rtol=1e-8, atol=1e-14), layer
        start += size
    v = torch.randn(2, problem.num_params, dtype=torch.float64)
    expected = torch.linalg.solve(dense, v.T).T
    assert ((curv.inverse_hvp(v) - expected).norm() / expected.norm()).item() < 1e-5
    self_expected = (grads * torch.linalg.solve(dense, grads.T).T).sum(1)
    assert torch.allclose(curv.self_influence(x, y, chunk_size=8), self_expected, rtol=1e-7)


def test_cg_that_stops_early_is_flagged(problem_data):
    net, problem, x, y = problem_data
    cfg = U.solver_config("cg", damp=0.0, cg_tol=1e-12, cg_max_iter=2)
    _, info = U.inverse_hvp(problem, torch.randn(2, problem.num_params, dtype=torch.float64), x, y, cfg)
    assert info["converged"] is False and "did not converge" in info["warning"]
    cfg = U.solver_config("cg", damp=1.0, cg_tol=1e-8, cg_max_iter=500)
    _, info = U.inverse_hvp(problem, torch.randn(2, problem.num_params, dtype=torch.float64), x, y, cfg)
    assert info["converged"] is True and "warning" not in info


# ---- the linear datamodeling score -------------------------------------------------------------
def test_average_ranks_and_spearman_by_hand():
    assert U.average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([10.0, 20.0, 20.0, 5.0])
    # ranks a: 0 1 2 3 ; ranks b: 1 2.5 2.5 0 -> centred a: -1.5 -.5 .5 1.5, b: -.5 1 1 -1.5
    num = (-1.5 * -0.5) + (-0.5 * 1) + (0.5 * 1) + (1.5 * -1.5)
    den = math.sqrt(5.0 * (0.25 + 1 + 1 + 2.25))
    assert U.spearman_columns(a, b)[0] == pytest.approx(num / den)
    assert np.isnan(U.spearman_columns(a, np.ones(4))[0])


def test_lds_sign_and_hand_computation():
    # 3 training points, 2 test points, 4 subsets
    masks = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0, 0]], dtype=bool)
    attribution = np.array([[3.0, 1.0, -2.0],     # test 0: point 0 helps most, point 2 harms
                            [0.0, 0.0, 1.0]])      # test 1: only point 2 helps
    predicted = U.datamodel_predictions(attribution, masks, 3)
    assert np.allclose(predicted[:, 0], -np.array([4.0, 1.0, -1.0, 3.0]) / 3)
    # a measured loss that falls when helpful points are present scores +1 ...
    measured = np.array([[0.1, 5.0], [0.7, 4.0], [0.9, 3.0], [0.2, 5.0]])
    scores = U.lds(attribution, masks, measured)
    assert scores[0] == pytest.approx(1.0)
    # ... test 1: predicted -1/3 * [0,1,1,0] (ties), measured [5,4,3,5]: by hand
    pr = U.average_ranks(np.array([0.0, -1.0, -1.0, 0.0]))       # [2.5, .5, .5, 2.5]
    mr = U.average_ranks(np.array([5.0, 4.0, 3.0, 5.0]))         # [2.5, 1, 0, 2.5]
    assert scores[1] == pytest.approx(np.corrcoef(pr, mr)[0, 1])
    # the opposite sign scores -1; the margin rises with helpful points
    assert U.lds(-attribution, masks, measured)[0] == pytest.approx(-1.0)
    assert U.lds(attribution, masks, -measured, target="margin")[0] == pytest.approx(1.0)


def test_bootstrap_interval_contains_the_mean_and_is_seeded():
    values = np.array([0.1, 0.4, 0.3, np.nan, 0.2, 0.5])
    mean, low, high = U.bootstrap_mean(values, draws=500, seed=1)
    assert mean == pytest.approx(0.3) and low < mean < high
    assert (mean, low, high) == U.bootstrap_mean(values, draws=500, seed=1)
    assert U.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 7])[0, 1])


def test_factor_file_is_reused_and_a_mismatch_is_refused(problem_data, tmp_path):
    net, problem, x, y = problem_data
    path = str(tmp_path / "factors.pt")
    first = U.KroneckerCurvature.cached(path, problem, x, y, seed=2, log=lambda _: None)
    again = U.KroneckerCurvature.cached(path, problem, x, y, seed=2, damp_factor=0.5, log=lambda _: None)
    v = torch.randn(2, problem.num_params, dtype=torch.float64)
    direct = U.KroneckerCurvature(problem, x, y, seed=2, damp_factor=0.5)
    assert torch.allclose(again.inverse_hvp(v), direct.inverse_hvp(v), atol=1e-12)  # read, damped afresh
    assert not torch.allclose(first.inverse_hvp(v), again.inverse_hvp(v))
    with pytest.raises(ValueError, match="another model, data or settings"):
        U.KroneckerCurvature.cached(path, problem, x[:50], y[:50], seed=2)   # other data
    with pytest.raises(ValueError, match="another model, data or settings"):
        U.KroneckerCurvature.cached(path, problem, x, y, seed=2, fisher="empirical")
    with open(path, "wb") as f:
        f.write(b"truncated")
    with pytest.raises(ValueError, match="unreadable.*delete it"):
        U.KroneckerCurvature.cached(path, problem, x, y, seed=2)


def test_self_influence_and_streamed_chunks_match_the_dense_computation(problem_data):
    net, problem, x, y = problem_data
    curv = U.KroneckerCurvature(problem, x, y, seed=1)
    grads = problem.sample_grads(x, y)
    dense = dense_from_factors(curv, problem)
    expected = (grads * torch.linalg.solve(dense, grads.T).T).sum(1)
    assert torch.allclose(curv.self_influence(x, y, chunk_size=13), expected, rtol=1e-7)
    cfg = U.solver_config("ekfac", seed=1, chunk_size=40)
    whole, _ = U.compute_influences(problem, x[:10], y[:10], x, y, cfg, show_progress=False)
    parts = dict(U.influence_chunks(problem, x[:10], y[:10], x, y, cfg, test_chunk=4))
    assert sorted(parts) == [0, 4, 8]
    assert torch.allclose(torch.cat([parts[k] for k in (0, 4, 8)]), whole, atol=1e-10)


def test_tracin_equals_a_brute_force_loop_over_checkpoints_and_points(problem_data):
    net, problem, x, y = problem_data
    checkpoints = []
    for c, lr in enumerate((0.5, 0.25, 0.1)):
        torch.manual_seed(10 + c)
        other = SmallMLP().double()
        checkpoints.append((U.InfluenceProblem(other, U.nll_sample_loss, U.select_parameters(other)), lr))
    got = U.tracin(checkpoints, x[:3], y[:3], x[:20], y[:20], chunk_size=7)
    expected = torch.zeros(3, 20, dtype=torch.float64)
    self_expected = torch.zeros(20, dtype=torch.float64)
    for cp, lr in checkpoints:
        def grad_of(i, xs, ys):
            cp.model.zero_grad()
            loss = -cp.model(xs[i:i + 1])[0, ys[i]]
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(cp.model.parameters()))])
        train_grads = [grad_of(i, x, y) for i in range(20)]
        for t in range(3):
            g_t = grad_of(t, x, y)
            for i in range(20):
                expected[t, i] += lr * (g_t @ train_grads[i])
        for i in range(20):
            self_expected[i] += lr * (train_grads[i] @ train_grads[i])
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.allclose(U.tracin_self_influence(checkpoints, x[:20], y[:20], chunk_size=6), self_expected, atol=1e-12)


def test_roc_auc_and_fraction_found_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.5])
    positives = np.array([True, False, True, False, False, True])
    # pairs (pos, neg): 0.9 beats 3; 0.7 beats 0.6, 0.5 -> 2 of 3; 0.5 ties 0.5 (1/2), loses to 0.8, 0.6
    assert U.roc_auc(scores, positives) == pytest.approx((3 + 2 + 0.5) / 9)
    assert U.roc_auc(-np.arange(4.0), np.array([True, True, False, False])) == pytest.approx(1.0)
    assert U.fraction_found(scores, positives, [1 / 6, 0.5, 1.0]) == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_lissa_that_has_not_settled_is_flagged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.LogSoftmax(1)).double()
    x, y = torch.randn(200, 5, dtype=torch.float64), torch.randint(0, 3, (200,))
    problem = U.InfluenceProblem(net, U.nll_sample_loss, U.select_parameters(net), l2_reg=0.01)
    v = torch.randn(2, problem.num_params, dtype=torch.float64)
    shallow = U.solver_config("lissa", damp=0.1, scale=10, recursion_depth=5, repeats=2, hvp_batch_size=50)
    _, info = U.inverse_hvp(problem, v, x, y, shallow, show_progress=False)
    assert info["converged"] is False and info["lissa_last_change"] > 0.2 and "did not settle" in info["warning"]
    deep = U.solver_config("lissa", damp=0.1, scale=10, recursion_depth=2000, repeats=2, hvp_batch_size=50)
    _, info = U.inverse_hvp(problem, v, x, y, deep, show_progress=False)
    assert info["converged"] is True and info["lissa_last_change"] < 0.05


def test_factored_damping_solves_the_kronecker_product_of_damped_factors(problem_data):
    """kfac_factored = [(S + gamma_S I) (x) (A + gamma_A I)]^-1 with gamma_S gamma_A = lambda, built
    densely; its rank-one all-pairs path equals inverse HVP + sweep for every pair."""
    net, problem, x, y = problem_data
    curv = U.KroneckerCurvature(problem, x, y, eigen_corrected=False, fisher="true", seed=4, factored_damping=True)
    v = torch.randn(3, problem.num_params, dtype=torch.float64)
    dense = torch.zeros(problem.num_params, problem.num_params, dtype=torch.float64)
    offset = 0
    for layer in ("fc1", "fc2"):  # weight block then bias: permute the Kronecker index (o, j) into it
        gamma_s, gamma_a = curv.factor_damping[layer]
        assert gamma_s * gamma_a == pytest.approx(curv.damping[layer])
        l_a, l_s = torch.linalg.eigvalsh(curv.A[layer]), torch.linalg.eigvalsh(curv.S[layer])
        assert gamma_a / gamma_s == pytest.approx(l_a.clamp_min(0).mean().item() / l_s.clamp_min(0).mean().item())
        block = torch.kron(curv.S[layer] + gamma_s * torch.eye(len(l_s), dtype=torch.float64),
                           curv.A[layer] + gamma_a * torch.eye(len(l_a), dtype=torch.float64))
        out, cols = len(l_s), len(l_a)
        index = torch.tensor([offset + o * (cols - 1) + j if j < cols - 1 else offset + out * (cols - 1) + o
                              for o in range(out) for j in range(cols)])
        dense[index[:, None], index[None, :]] = block
        offset += out * cols
    expected = torch.linalg.solve(dense, v.T).T
    assert ((curv.inverse_hvp(v) - expected).norm() / expected.norm()).item() < 1e-10
    cfg = U.solver_config("kfac_factored", seed=4, chunk_size=40)
    through_vectors = U.influence_sweep(problem, U.inverse_hvp(problem, problem.sample_grads(x[:9], y[:9]), x, y,
                                                               cfg, show_progress=False)[0], x, y, show_progress=False)
    chunks = dict(U.influence_chunks(problem, x[:9], y[:9], x, y, cfg, test_chunk=4))
    rank_one = torch.cat([chunks[k] for k in (0, 4, 8)])
    assert torch.allclose(rank_one, through_vectors, rtol=1e-9, atol=1e-12)
    # the self-influence is the diagonal of the same matrix
    train_pairs = dict(U.influence_chunks(problem, x, y, x, y, cfg, test_chunk=90))[0]
    assert torch.allclose(curv.self_influence(x, y), torch.diagonal(train_pairs), rtol=1e-9)
    with pytest.raises(ValueError, match="EK-FAC"):
        U.KroneckerCurvature(problem, x, y, eigen_corrected=True, factored_damping=True)


def test_per_position_influence_maps_sum_to_the_influence_and_match_a_loop(conv_problem):
    net, _, x, y = conv_problem
    problem = U.InfluenceProblem(net, U.nll_sample_loss, U.select_parameters(net, ["c1"]))
    s_test = torch.randn(problem.num_params, dtype=torch.float64)
    maps = U.conv_position_influence(problem, s_test, x, y)
    assert maps.shape == (30, 5, 5)
    expected = problem.sample_grads(x, y) @ s_test
    assert torch.allclose(maps.sum((1, 2)), expected, rtol=1e-10, atol=1e-12)
    # one position by hand: delta there . (S_W patch + S_b)
    i, r, c = 3, 2, 4
    z1 = net.c1(x[i:i + 1]).detach().requires_grad_(True)
    loss = -torch.log_softmax(net.fc(torch.relu(net.c2(torch.relu(z1))).flatten(1)), 1)[0, y[i]]
    delta, = torch.autograd.grad(loss, z1)
    s_w, s_b = s_test[:18].reshape(2, 9), s_test[18:]
    patch = nn.functional.pad(x[i, 0], (1, 1, 1, 1))[r:r + 3, c:c + 3].reshape(-1)
    assert maps[i, r, c].item() == pytest.approx((delta[0, :, r, c] @ (s_w @ patch + s_b)).item(), rel=1e-10)
    with pytest.raises(ValueError, match="output size"):   # c1 (5x5) and c2 (2x2) cannot share a map
        U.conv_position_influence(U.InfluenceProblem(net, U.nll_sample_loss, U.select_parameters(net, ["c1", "c2"])),
                                  torch.randn(18 + 2 + 24 + 3, dtype=torch.float64), x, y)


def test_factors_fitted_on_a_subsample_are_those_of_that_subsample(problem_data):
    """kfac/ekfac fit_points: the factors and eigenvalues are the ones fitted on that many seeded training
    points, the influence sweep still covers every point, and the file part names the subsample."""
    _, problem, x, y = problem_data
    cfg = U.solver_config("ekfac", fit_points=30, seed=3, fisher="empirical")
    fitted = U.kronecker_curvature(problem, x, y, cfg)
    xs, ys = U.hessian_subset(x, y, 30, 3)
    alone = U.KroneckerCurvature(problem, xs, ys, eigen_corrected=True, fisher="empirical", seed=3)
    full = U.KroneckerCurvature(problem, x, y, eigen_corrected=True, fisher="empirical", seed=3)
    for name in alone.eigenvalues:
        assert torch.equal(fitted.eigenvalues[name], alone.eigenvalues[name])
        assert not torch.allclose(fitted.eigenvalues[name], full.eigenvalues[name])
    scores, _ = U.compute_influences(problem, x[:2], y[:2], x, y, cfg, show_progress=False)
    assert scores.shape == (2, 90)
    assert U.solver_for("ekfac").file_part(cfg) == "empiricaldf0.1fp30"
