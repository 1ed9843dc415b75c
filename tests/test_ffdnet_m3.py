"""Method 3 for FFDNet (m3_Test, expTest's fine-tuning) on a tiny FFDNet in float64 (three conv layers,
four channels, eval-mode BatchNorm): the replay reproduces explain.finetune, its metagradient equals
central finite differences of explain.finetune in every patch weight, and its per-patch terms equal
the conv/BatchNorm closed-form per-sample gradients."""
import copy

import torch

import utils_if as U
from conftest import central_differences
from ffdnet_test import attribution, explain
from ffdnet_test.model import FFDNet, PackedInput
from options.blocks import Finetune

SCHEDULE = Finetune(epochs=2, learning_rate=0.01, batch_size=3)  # 4 steps over 6 patches


def tiny_ffdnet() -> FFDNet:
    torch.manual_seed(0)
    model = FFDNet(is_gray=True, layout="bn", num_layers=3, channels=4, residual=True).double().eval()
    bn = model.main[3]
    bn.running_mean.uniform_(-0.2, 0.2)   # statistics held fixed by the fine-tuning, not the defaults
    bn.running_var.uniform_(0.5, 2.0)
    return model


def patches(n: int = 6):
    g = torch.Generator().manual_seed(2)
    clean = torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64)
    sigma = torch.rand(n, generator=g, dtype=torch.float64) * 0.3
    noisy = clean + sigma[:, None, None, None] * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    return noisy, clean, sigma


def probe_image():
    g = torch.Generator().manual_seed(3)
    clean = torch.rand(1, 1, 12, 12, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.1], dtype=torch.float64)
    return clean + 0.1 * torch.randn(clean.shape, generator=g, dtype=torch.float64), sigma, clean


WINDOW = attribution.window_mask((1, 12, 12), [5, 6], 1).double()


def targets(model, noisy, sigma, clean) -> torch.Tensor:
    """(whole-image MSE, the 3x3 window's squared error) of the model: what m3_Test differentiates."""
    out = model(noisy, sigma)
    return torch.stack([U.mse_sample_loss(out, clean)[0], U.masked_mse_sample_loss(WINDOW)(out, clean)[0]])


def assert_metagradient_equals_finite_differences(replay, tuned, base, schedule: Finetune) -> None:
    """The replay's metagradient of :func:`targets` on the probe image, at the fine-tuned weights, equals
    central finite differences of ``explain.finetune`` with ``schedule`` in every patch weight (1e-4)."""
    noisy, clean, sigma = patches()
    problem = U.InfluenceProblem(PackedInput(tuned).eval(), U.mse_sample_loss, ["net." + n for n in replay.names])
    x, y, c = probe_image()
    packed = PackedInput.pack(x, y)
    grads = torch.cat([problem.sample_grads(packed, c), problem.sample_grads(packed, c, loss=U.masked_mse_sample_loss(WINDOW))])
    mine = replay.metagradient(grads)
    assert mine.shape == (2, 6) and mine.abs().max() > 1e-5

    def targets_at(w):
        moved = explain.finetune_run(schedule, len(clean), seed=0, weights=w)
        tuned_w = explain.finetune(copy.deepcopy(base), noisy, clean, sigma, moved)
        with torch.no_grad():
            return targets(tuned_w, x, y, c)
    fd = central_differences(targets_at, len(clean))
    for i in range(len(clean)):
        assert torch.allclose(mine[:, i], fd[:, i], rtol=1e-4, atol=1e-4 * mine.abs().max().item()), i


def test_replay_reproduces_finetune_and_equals_finite_differences_of_it():
    base = tiny_ffdnet()
    noisy, clean, sigma = patches()
    run = explain.finetune_run(SCHEDULE, len(clean), seed=0)
    assert run.num_steps == 4
    replay = U.AdamReplay(copy.deepcopy(base), U.mse_sample_loss, run, (noisy, sigma), clean)
    final = replay.forward(2)
    tuned = explain.finetune(copy.deepcopy(base), noisy, clean, sigma, run)
    assert U.replay_error(final, tuned) < 1e-13  # module training and functional replay agree
    assert_metagradient_equals_finite_differences(replay, tuned, base, SCHEDULE)


def test_per_patch_terms_equal_the_conv_closed_form_per_sample_gradients():
    """AdamReplay gets G . grad l_i for the batch's patches from one jvp (no per-sample gradient); the
    closed forms of utils_if (conv: delta x unfold(input); eval BatchNorm: delta x normalised input)
    give every grad l_i explicitly: the two agree, at a step inside the run, for two adjoint vectors."""
    base = tiny_ffdnet()
    noisy, clean, sigma = patches()
    run = explain.finetune_run(SCHEDULE, len(clean), seed=0)
    replay = U.AdamReplay(copy.deepcopy(base), U.mse_sample_loss, run, (noisy, sigma), clean)
    replay.forward(2)
    store = torch.empty(2, 4, replay.num_params, dtype=torch.float64)
    replay._steps(2, 4, replay.checkpoints[2], store=store)
    theta, _, _, g = store[1]  # step 3: the weights before it and its batch gradient
    g_gen = torch.Generator().manual_seed(5)
    m_adj, v_adj = (torch.randn(2, replay.num_params, generator=g_gen, dtype=torch.float64) for _ in range(2))
    directional, hv = replay._products(theta, g, 3, m_adj, v_adj)
    at_step = copy.deepcopy(base)
    torch.nn.utils.vector_to_parameters(theta, [p for p in at_step.parameters()])
    problem = U.InfluenceProblem(PackedInput(at_step).eval(), U.mse_sample_loss, ["net." + n for n in replay.names])
    assert U.capturable_owners(problem) is not None  # the closed forms, not vmap
    idx = run.batch(3)
    per_sample = problem.sample_grads(PackedInput.pack(noisy[idx], sigma[idx]), clean[idx])   # (B, p)
    (b1, b2) = run.betas
    tangents = (1 - b1) * m_adj + 2 * (1 - b2) * g * v_adj
    assert torch.allclose(directional, tangents @ per_sample.T, rtol=1e-10, atol=1e-12)
    assert torch.allclose(per_sample.mean(0), g, rtol=1e-10, atol=1e-14)  # and they sum to the batch gradient
    assert torch.isfinite(hv).all() and hv.abs().max() > 0


def test_sgd_finetuning_replay_reproduces_it_and_equals_finite_differences():
    """ffdnet.explain.finetune.optimizer = sgd: SGD with momentum on the fine-tuning's per-step batches;
    SgdReplay (the model's two inputs, generic path) ends on the fine-tuned weights and its metagradient
    equals central finite differences of the fine-tuning itself."""
    schedule = Finetune(epochs=2, learning_rate=0.05, batch_size=3, optimizer="sgd", momentum=0.9)
    base = tiny_ffdnet()
    noisy, clean, sigma = patches()
    run = explain.finetune_run(schedule, len(clean), seed=0)
    assert isinstance(run, U.SgdRun) and run.num_steps == 4 and run.n == 6
    replay = explain.method3_replay(base, run, noisy, sigma, clean)
    assert isinstance(replay, U.SgdReplay) and replay.info["path"] == "torch_func"
    final = replay.forward(2)
    tuned = explain.finetune(copy.deepcopy(base), noisy, clean, sigma, run)
    assert U.replay_error(final, tuned) < 1e-13
    adam = explain.finetune(copy.deepcopy(base), noisy, clean, sigma, explain.finetune_run(SCHEDULE, len(clean), seed=0))
    assert U.replay_error(final, adam) > 1e-3  # another optimiser, another network
    assert_metagradient_equals_finite_differences(replay, tuned, base, schedule)
