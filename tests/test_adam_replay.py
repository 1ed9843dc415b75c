"""Method 3 through Adam (AdamReplay, the FFDNet fine-tuning's optimiser) on a tiny conv net in float64:
against autograd through the unrolled run written out here (create_graph) and against central finite
differences of the real run (torch.optim.Adam) in each data weight; every checkpoint interval alike."""
import torch
from torch import nn

import utils_if as U
from conftest import central_differences


class TinyConv(nn.Module):  # two conv layers, two inputs (as FFDNet: image and noise level)
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x, sigma):
        return x - self.b(torch.tanh(self.a(x) + sigma[:, None, None, None]))


def setup(n: int = 10, steps: int = 12, batch: int = 3, weights=None, lr: float = 0.01):
    g = torch.Generator().manual_seed(4)
    clean = torch.rand(n, 1, 5, 5, generator=g, dtype=torch.float64)
    sigma = torch.rand(n, generator=g, dtype=torch.float64) * 0.2
    noisy = clean + sigma[:, None, None, None] * torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64)
    orders = torch.stack([torch.randperm(n, generator=g)[:batch] for _ in range(steps)])
    return (noisy, sigma), clean, U.AdamRun(lr, orders, data_weights=weights)


def mse(output, target):
    return (output - target).pow(2).flatten(1).mean(1)


def window_loss(model, params, x_t, s_t, c_t):
    out = torch.func.functional_call(model, params, (x_t, s_t))
    return torch.stack([mse(out, c_t)[0], (out - c_t)[0, 0, 1:4, 1:4].pow(2).mean()])  # whole image, one window


def replay(model, inputs, clean, run, test, interval=0):
    r = U.AdamReplay(model, mse, run, inputs, clean)
    final = r.forward(interval)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in final.items()}
    targets = window_loss(model, params, *test)
    grads = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(f, list(params.values()),
                                                                               retain_graph=True)]) for f in targets])
    return r.metagradient(grads), r


def unrolled(model, inputs, clean, run, test):
    w = torch.ones(len(clean), dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in model.named_parameters()]
    theta = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    (b1, b2), eps, lr = run.betas, run.eps, run.learning_rate
    for step in range(run.num_steps):
        idx = run.batch(step)
        out = torch.func.functional_call(model, dict(zip(names, theta)), tuple(t[idx] for t in inputs))
        loss = (mse(out, clean[idx]) * w[idx]).sum() / len(idx)
        g = torch.autograd.grad(loss, theta, create_graph=True)
        t = step + 1
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        theta = [th - lr / (1 - b1 ** t) * mi / ((vi / (1 - b2 ** t) + run.eps_root).sqrt() + eps)
                 for th, mi, vi in zip(theta, m, v)]
    targets = window_loss(model, dict(zip(names, theta)), *test)
    return torch.stack([torch.autograd.grad(f, w, retain_graph=True)[0] for f in targets])


def test_adam_replay_equals_unrolled_autograd_and_every_interval():
    model = TinyConv().double()
    inputs, clean, run = setup()
    test = (inputs[0][:1] + 0.05, inputs[1][:1], clean[:1])
    reference = unrolled(model, inputs, clean, run, test)
    mine, r = replay(model, inputs, clean, run, test)
    assert reference.abs().max() > 1e-4
    assert (mine - reference).abs().max() / reference.abs().max() < 1e-10
    for interval in (1, 5, 100):
        assert torch.allclose(replay(model, inputs, clean, run, test, interval)[0], mine, rtol=0, atol=1e-14)


def test_adam_replay_equals_finite_differences_of_the_run():
    model = TinyConv().double()
    inputs, clean, run = setup()
    test = (inputs[0][:1] + 0.05, inputs[1][:1], clean[:1])
    mine, _ = replay(model, inputs, clean, run, test)

    def targets_at(w):
        _, c, moved_run = setup(weights=w)
        return window_loss(model, U.AdamReplay(model, mse, moved_run, inputs, c).forward(4), *test).detach()
    fd = central_differences(targets_at, len(clean))
    for i in range(len(clean)):
        assert torch.allclose(mine[:, i], fd[:, i], rtol=1e-4, atol=1e-4 * mine.abs().max().item()), i


# ---- Adam with epsilon inside the square root (ffdnet.explain.finetune.eps_root) -----------------
def test_eps_root_adam_replay_equals_unrolled_autograd_and_finite_differences():
    model = TinyConv().double()
    inputs, clean, run = setup()
    run.eps_root = 1e-6
    test = (inputs[0][:1] + 0.05, inputs[1][:1], clean[:1])
    mine, _ = replay(model, inputs, clean, run, test, interval=5)
    reference = unrolled(model, inputs, clean, run, test)
    assert reference.abs().max() > 1e-4
    assert (mine - reference).abs().max() / reference.abs().max() < 1e-10
    plain, _ = replay(model, inputs, clean, setup()[2], test)
    assert (mine - plain).abs().max() > 1e-3 * plain.abs().max()  # another run, another derivative

    def targets_at(w):
        _, c, moved = setup(weights=w)
        moved.eps_root = 1e-6
        return window_loss(model, U.AdamReplay(model, mse, moved, inputs, c).forward(4), *test).detach()
    fd = central_differences(targets_at, len(clean))
    assert (mine - fd).abs().max() / fd.abs().max() < 1e-4


def test_eps_root_zero_is_torch_adam_and_the_fine_tuning_is_the_replayed_run():
    """expTest's fine-tuning (explain.finetune) with eps_root is, to the bit, the run AdamReplay replays."""
    from ffdnet_test import explain
    inputs, clean, run = setup()
    assert isinstance(run.optimizer(list(TinyConv().parameters())), torch.optim.Adam)
    run.eps_root = 1e-6
    tuned = explain.finetune(TinyConv().double(), inputs[0], clean, inputs[1], run)
    replayed = U.AdamReplay(TinyConv().double(), U.mse_sample_loss, run, inputs, clean).forward(5)
    for name, value in tuned.named_parameters():
        assert torch.equal(replayed[name], value.detach()), name
