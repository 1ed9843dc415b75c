"""Influence engine against exact computations on a model small enough for a dense Hessian."""
import numpy as np
import pytest
import torch
from torch import nn

import utils_if as U


class TinyNet(nn.Module):
    """MNIST pooled to 7x7 -> 6 tanh units -> 10 classes: 370 parameters."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(4)
        self.fc1 = nn.Linear(49, 6)
        self.fc2 = nn.Linear(6, 10)

    def forward(self, x):
        h = self.pool(x.reshape(-1, 1, 28, 28)).flatten(1)
        return torch.log_softmax(self.fc2(torch.tanh(self.fc1(h))), dim=1)


L2 = 0.01


@pytest.fixture(scope="module")
def trained(mnist_train):
    torch.manual_seed(0)
    x, y = mnist_train.images[:300].double(), mnist_train.labels[:300]
    net = TinyNet().double()
    optim = torch.optim.LBFGS(net.parameters(), max_iter=500, tolerance_grad=1e-10,
                              line_search_fn="strong_wolfe")

    def closure():
        optim.zero_grad()
        loss = U.nll_sample_loss(net(x), y).mean() + 0.5 * L2 * sum((p * p).sum() for p in net.parameters())
        loss.backward()
        return loss
    optim.step(closure)
    x_test, y_test = mnist_train.images[50000:50004].double(), mnist_train.labels[50000:50004]
    return net, x, y, x_test, y_test


def dense_reference(net, x, y, x_test, y_test, damp):
    """Independent: flat-parameter objective, torch.autograd.functional.hessian, direct solve."""
    shapes = [p.shape for p in net.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def unflat(flat):
        out, s = [], 0
        for shape in shapes:
            n = int(np.prod(shape))
            out.append(flat[s:s + n].reshape(shape))
            s += n
        return out

    def forward(flat, xs):
        w1, b1, w2, b2 = unflat(flat)
        h = nn.functional.avg_pool2d(xs.reshape(-1, 1, 28, 28), 4).flatten(1)
        return torch.log_softmax(torch.tanh(h @ w1.T + b1) @ w2.T + b2, dim=1)

    def objective(flat):
        logp = forward(flat, x)
        return -logp[torch.arange(len(y)), y].mean() + 0.5 * L2 * (flat * flat).sum()

    hessian = torch.autograd.functional.hessian(objective, flat0)

    def sample_grad(xs, ys):
        rows = []
        for i in range(len(ys)):
            f = flat0.clone().requires_grad_(True)
            loss = -forward(f, xs[i:i + 1])[0, ys[i]]
            rows.append(torch.autograd.grad(loss, f)[0])
        return torch.stack(rows)

    g_test, g_train = sample_grad(x_test, y_test), sample_grad(x, y)
    s = torch.linalg.solve(hessian + damp * torch.eye(len(flat0), dtype=flat0.dtype), g_test.T).T
    return s @ g_train.T, hessian


def problem_for(net):
    return U.InfluenceProblem(net, U.nll_sample_loss, U.select_parameters(net), l2_reg=L2)


def pearson(a, b):
    return np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]


def test_hvp_and_dense_hessian_are_exact(trained):
    net, x, y, x_test, y_test = trained
    problem = problem_for(net)
    assert problem.num_params == 370
    _, hessian = dense_reference(net, x, y, x_test, y_test, 0.0)
    ours = problem.dense_hessian(x, y, chunk_size=128)
    assert torch.allclose(ours, hessian, rtol=1e-8, atol=1e-10)
    v = torch.randn(3, 370, dtype=torch.float64)
    assert torch.allclose(problem.hvp_full(x, y, v, chunk_size=77), v @ hessian, atol=1e-10)


def test_exact_solver_matches_dense_reference(trained):
    net, x, y, x_test, y_test = trained
    reference, _ = dense_reference(net, x, y, x_test, y_test, damp=0.001)
    cfg = U.solver_config("exact", damp=0.001, chunk_size=128)
    influence, info = U.compute_influences(problem_for(net), x_test, y_test, x, y, cfg, False)
    rel = ((influence - reference).norm() / reference.norm()).item()
    assert rel < 1e-4, rel
    assert info["hessian_eig_min"] > 0  # trained to a minimum with L2: positive definite


def test_cg_matches_exact(trained):
    net, x, y, x_test, y_test = trained
    problem = problem_for(net)
    exact, _ = U.compute_influences(problem, x_test, y_test, x, y,
                                    U.solver_config("exact", damp=0.001), False)
    cg, info = U.compute_influences(problem, x_test, y_test, x, y,
                                    U.solver_config("cg", damp=0.001, cg_tol=1e-8,
                                                     cg_max_iter=500), False)
    assert pearson(cg, exact) > 0.999
    assert info["cg_relative_residual"] < 1e-6


def test_lissa_matches_exact(trained):
    net, x, y, x_test, y_test = trained
    problem = problem_for(net)
    scale = 20.0  # batch-of-32 Hessians here have top eigenvalues up to ~17 (< 2*scale)
    # LiSSA with (damp, scale) solves (H + damp*scale*I): compare with exact at that damping
    exact, _ = U.compute_influences(problem, x_test, y_test, x, y,
                                    U.solver_config("exact", damp=0.1), False)
    cfg = U.solver_config("lissa", damp=0.1 / scale, scale=scale, recursion_depth=1500,
                           repeats=4, hvp_batch_size=32, seed=1)
    assert U.solver_for("lissa").effective_damping(cfg) == pytest.approx(0.1)
    lissa, _ = U.compute_influences(problem, x_test, y_test, x, y, cfg, False)
    r = pearson(lissa, exact)
    assert r > 0.95, r


class ReluMlp(nn.Module):
    def __init__(self, hidden=(12, 7), activation=nn.ReLU):
        super().__init__()
        sizes = (20, *hidden, 4)
        layers = []
        for i in range(len(sizes) - 1):
            layers += [nn.Linear(sizes[i], sizes[i + 1]), activation()]
        self.main = nn.Sequential(*layers[:-1])
        self.log_softmax = nn.LogSoftmax(dim=1)

    def forward(self, x):
        return self.log_softmax(self.main(x))


class ReluModulesTanhForward(ReluMlp):
    """Registers Linear ReLU Linear ReLU Linear LogSoftmax but computes tanh: the shape check alone
    would accept it, the HVP check must not."""

    def forward(self, x):
        h = x
        for i, module in enumerate(self.main):
            h = torch.tanh(h) if isinstance(module, nn.ReLU) else module(h)
        return self.log_softmax(h)


@pytest.mark.parametrize("prefixes", [[], ["main.2."], ["main.0.bias", "main.4."], ["main.0.weight"]])
@pytest.mark.parametrize("batch", [1, 8, 50])
def test_folded_lissa_equals_the_step_by_step_loop(prefixes, batch):
    """Hand-written MLP HVPs with the first weight folded over blocks of steps: the same recursion on
    the same batches as the autograd loop, for any choice of parameters and batch size."""
    torch.manual_seed(0)
    net = ReluMlp().double()
    x, y = torch.randn(300, 20, dtype=torch.float64), torch.randint(0, 4, (300,))
    problem = U.InfluenceProblem(net, U.nll_sample_loss, U.select_parameters(net, prefixes), l2_reg=0.01)
    v = torch.randn(3, problem.num_params, dtype=torch.float64)
    cfg = U.solver_config("lissa", damp=0.01, scale=10, recursion_depth=137, repeats=2, hvp_batch_size=batch)
    folded_info, loop_info = {}, {}
    folded = U.lissa(problem, v, x, y, cfg, False, folded_info)
    loop = U.lissa(problem, v, x, y, cfg, False, loop_info, fold=False)
    assert folded_info["lissa_path"] == "folded_mlp" and loop_info["lissa_path"] == "autograd"
    assert ((folded - loop).norm() / loop.norm()).item() < 1e-12
    assert folded_info["lissa_last_change"] == loop_info["lissa_last_change"]


def test_relu_mlp_hvp_equals_the_dense_hessian():
    torch.manual_seed(1)
    net = ReluMlp(hidden=(5,)).double()
    x, y = torch.randn(9, 20, dtype=torch.float64), torch.randint(0, 4, (9,))
    problem = U.InfluenceProblem(net, U.nll_sample_loss, U.select_parameters(net))
    mlp = U.MlpHvp(problem, U.relu_mlp_layers(net))
    hessian = problem.dense_hessian(x, y)
    v = torch.randn(2, problem.num_params, dtype=torch.float64)
    assert torch.allclose(mlp.hvp(problem, x, y, v), v @ hessian, rtol=0, atol=1e-12)


def test_lissa_checks_the_mlp_shape_against_autograd():
    torch.manual_seed(0)
    x, y = torch.randn(100, 20, dtype=torch.float64), torch.randint(0, 4, (100,))
    cfg = U.solver_config("lissa", damp=0.01, scale=10, recursion_depth=20, repeats=1, hvp_batch_size=8)
    impostor = ReluModulesTanhForward().double()
    assert U.relu_mlp_layers(impostor) == ["main.0", "main.2", "main.4"]
    problem = U.InfluenceProblem(impostor, U.nll_sample_loss, U.select_parameters(impostor))
    v = torch.randn(2, problem.num_params, dtype=torch.float64)
    info = {}
    result = U.lissa(problem, v, x, y, cfg, False, info)
    assert info["lissa_path"] == "autograd" and "differs from autograd" in info["lissa_mlp_check"]
    assert torch.equal(result, U.lissa(problem, v, x, y, cfg, False, fold=False))
    assert U.relu_mlp_layers(ReluMlp(activation=nn.Tanh)) is None


def test_lissa_divergence_names_scale(trained):
    net, x, y, x_test, y_test = trained
    cfg = U.solver_config("lissa", damp=0.01, scale=2.0, recursion_depth=200, repeats=1,
                           hvp_batch_size=8)
    with pytest.raises(U.LissaDiverged, match="raise the scale"):
        U.compute_influences(problem_for(net), x_test, y_test, x, y, cfg, False)


def test_exact_refuses_large_parameter_sets(trained):
    net, x, y, x_test, y_test = trained
    cfg = U.solver_config("exact", exact_max_params=100)
    with pytest.raises(ValueError, match="exact_max_params"):
        U.compute_influences(problem_for(net), x_test, y_test, x, y, cfg, False)


def test_closed_form_sweep_equals_vmap_grads_and_subset(trained):
    net, x, y, x_test, y_test = trained
    for prefixes in ([], ["fc2"], ["fc1.weight"]):
        problem = U.InfluenceProblem(net, U.nll_sample_loss, U.select_parameters(net, prefixes))
        s = torch.randn(2, problem.num_params, dtype=torch.float64)
        fast = U.influence_sweep(problem, s, x, y, chunk_size=64, show_progress=False)
        slow = U.influence_sweep(problem, s, x, y, chunk_size=64, show_progress=False,
                                 use_closed_form=False)
        loop = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            U.nll_sample_loss(net(x[i:i + 1]), y[i:i + 1]).sum(),
            [dict(net.named_parameters())[n] for n in problem.param_names])]) for i in range(20)])
        assert torch.allclose(fast, slow, atol=1e-10)
        assert torch.allclose(fast[:, :20], s @ loop.T, atol=1e-10)


def test_sign_convention_predicts_removal(trained):
    """Removing the most helpful point raises the test loss, the most harmful lowers it."""
    net, x, y, x_test, y_test = trained
    problem = problem_for(net)
    influence, _ = U.compute_influences(problem, x_test[:1], y_test[:1], x, y,
                                        U.solver_config("exact", damp=0.0), False)
    base = U.nll_sample_loss(net(x_test[:1]), y_test[:1]).item()
    for idx in (int(influence[0].argmax()), int(influence[0].argmin())):
        keep = torch.ones(len(x), dtype=torch.bool)
        keep[idx] = False
        retrained = TinyNet().double()
        retrained.load_state_dict(net.state_dict())
        optim = torch.optim.LBFGS(retrained.parameters(), max_iter=500, tolerance_grad=1e-12,
                                  line_search_fn="strong_wolfe")

        def closure():
            optim.zero_grad()
            loss = U.nll_sample_loss(retrained(x[keep]), y[keep]).mean() + \
                0.5 * L2 * sum((p * p).sum() for p in retrained.parameters())
            loss.backward()
            return loss
        optim.step(closure)
        change = U.nll_sample_loss(retrained(x_test[:1]), y_test[:1]).item() - base
        predicted = influence[0, idx].item() / len(x)
        assert np.sign(change) == np.sign(predicted)
        # first order: extreme points of a non-convex net are underestimated, but within 2x
        assert 0.5 < change / predicted < 2.0, (change, predicted)
