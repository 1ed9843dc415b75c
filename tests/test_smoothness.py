"""Metasmoothness (influence/smoothness.py): 1 for a run that is linear in its data weights, clearly
below 1 for a run with a kink, and, on real MNIST, the report's ReLU recipe against softplus."""
import torch

import utils_if
from influence import smoothness


def _one_sgd_step_of_a_linear_model(weights: torch.Tensor) -> torch.Tensor:
    """theta_1 = theta_0 - lr * sum_i w_i grad l_i(theta_0) / n: linear in the data weights w."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=generator, dtype=torch.float64)
    y = torch.randn(30, generator=generator, dtype=torch.float64)
    theta0 = torch.randn(5, generator=generator, dtype=torch.float64)
    residual = x @ theta0 - y
    return theta0 - 0.1 * ((weights * residual)[:, None] * x).sum(0) / len(x)


def _two_steps_of_an_l1_model(weights: torch.Tensor) -> torch.Tensor:
    """Two gradient steps on sum_i w_i |x_i . theta - y_i|: the second step's gradient flips sign
    where a residual crosses zero (a kink in the data weights)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(30, 5, generator=generator, dtype=torch.float64)
    y = torch.randn(30, generator=generator, dtype=torch.float64) * 0.01
    theta = torch.zeros(5, dtype=torch.float64)
    for _ in range(2):
        theta = theta - 0.3 * ((weights * torch.sign(x @ theta - y))[:, None] * x).sum(0) / len(x)
    return theta


def _check(run, h):
    directions = [smoothness.random_direction(30, 10, seed) for seed in range(4)]
    finals = [run(w) for w in smoothness.weight_sets(directions, h)]
    return smoothness.metasmoothness(finals, h)


def test_a_run_linear_in_its_data_weights_has_metasmoothness_one():
    result = _check(_one_sgd_step_of_a_linear_model, h=0.3)
    assert result["trainings"] == 9 and abs(result["s_hat"] - 1.0) < 1e-9
    assert all(abs(s - 1.0) < 1e-9 for s in result["s_hat_each"])


def test_a_run_with_a_kink_is_clearly_below_one():
    result = _check(_two_steps_of_an_l1_model, h=0.5)
    assert result["s_hat"] < 0.8, result


def test_pure_noise_is_negative_and_the_curvature_of_a_quadratic_is_exact():
    generator = torch.Generator().manual_seed(3)
    finals = [torch.randn(20000, generator=generator, dtype=torch.float64) for _ in range(3)]
    assert -0.5 < smoothness.metasmoothness(finals, 0.1)["s_hat"] < -0.2  # d1, d2 share a point: anti-correlated
    h = 0.2
    f = [torch.tensor([3.0 * (step * h) ** 2 + step * h], dtype=torch.float64) for step in (0, 1, 2)]  # f(h) = 3 h^2 + h: S = 6
    result = smoothness.metasmoothness([torch.zeros(1), torch.ones(1), 2 * torch.ones(1)], h, f)
    assert abs(result["curvature"] - 6.0) < 1e-9 and result["s_hat"] == 1.0
    assert "can be expected" in utils_if.verdict(0.99) and "cannot be vouched for" in utils_if.verdict(0.5)
    assert "0.0-0.92" in utils_if.verdict(0.5) and "attributable" in utils_if.verdict(0.5)
    assert "eps_root" in utils_if.verdict(0.5, "fine-tune with eps_root") and "0.89-0.99" in utils_if.verdict(0.99)


def test_m3_test_measures_it_the_reports_recipe_is_not_smooth_and_softplus_is(tmp_path, mnist_raw):
    from mnist_test import Train, m3_Test
    from tests.conftest import small_settings
    found = {}
    for activation in ("relu", "softplus"):
        settings = small_settings(tmp_path / activation, epoch=2, train_subset=1000, activation=activation,
                                  test_ids=[0, 1, 2], method3={"test_sample_num": 3})
        Train.main(settings)
        found[activation] = m3_Test.main(settings)["info"]["metasmoothness"]
    assert found["relu"]["s_hat"] < 0.5 and found["softplus"]["s_hat"] > 0.95
    assert found["relu"]["trainings"] == 5 and found["relu"]["points"] == 10
