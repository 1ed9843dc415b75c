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
    directions = [smoothness.random_direction(30, seed) for seed in range(4)]
    finals = [run(w) for w in smoothness.weight_sets(directions, h)]
    return smoothness.metasmoothness(finals, h)


def test_a_run_linear_in_its_data_weights_has_metasmoothness_one():
    result = _check(_one_sgd_step_of_a_linear_model, h=0.1)
    assert result["trainings"] == 9 and abs(result["s_hat"] - 1.0) < 1e-9
    assert all(abs(s - 1.0) < 1e-9 for s in result["s_hat_each"])
    assert abs(result["s_hat_interval"][0] - 1.0) < 1e-9 and abs(result["s_hat_interval"][1] - 1.0) < 1e-9


def test_a_run_with_a_kink_is_clearly_below_one():
    result = _check(_two_steps_of_an_l1_model, h=0.5)
    assert result["s_hat"] < 0.8, result


def test_the_weighting_is_definition_2_by_an_independent_computation():
    """Each parameter weighted by |theta(2h) - theta(0)| = |d1 + d2| (not |d1| + |d2|), written out
    element by element in plain Python."""
    generator = torch.Generator().manual_seed(5)
    at_z, at_h, at_2h = (torch.randn(50, generator=generator, dtype=torch.float64) for _ in range(3))
    numerator = denominator = 0.0
    for a, b, c in zip(at_z.tolist(), at_h.tolist(), at_2h.tolist()):
        moved = abs(c - a)
        agree = (1 if b - a > 0 else -1) * (1 if c - b > 0 else -1)
        numerator += moved * agree
        denominator += moved
    assert abs(smoothness.sign_agreement(at_z, at_h, at_2h) - numerator / denominator) < 1e-12


def test_pure_noise_reads_zero():
    """Three independent draws: S_hat 0 in expectation. Over 400 seeds of 20,000 entries the
    estimator measured mean -0.0004, standard deviation 0.0086, range [-0.025, 0.024]; the bound is
    about 6 standard deviations, far from the mean (the old |d1| + |d2| weighting reads -0.5 here)."""
    for seed in (3, 4):
        generator = torch.Generator().manual_seed(seed)
        finals = [torch.randn(20000, generator=generator, dtype=torch.float64) for _ in range(3)]
        assert abs(smoothness.metasmoothness(finals, 0.1)["s_hat"]) < 0.05


def test_the_curvature_is_a_second_derivative_along_the_unit_direction_whatever_the_size():
    """f(w) = q |w - 1|^2 has second derivative 2q along every unit direction: S = 2q for a direction
    over 10 points and over 1,000 (the old S grew with the number of points moved)."""
    q, h = 0.7, 0.1
    for n in (10, 1000):
        v = smoothness.random_direction(n, 0)
        weights = smoothness.weight_sets([v], h)
        outputs = [torch.tensor([q * float(((w - 1) ** 2).sum())], dtype=torch.float64) for w in weights]
        result = smoothness.metasmoothness([torch.zeros(1), torch.ones(1), 2 * torch.ones(1)], h, outputs, [v])
        assert abs(result["curvature"] - 2 * q) < 1e-9, (n, result["curvature"])


def test_the_verdict_is_three_way_on_the_interval():
    vouch, reject = smoothness.VOUCH_AT, smoothness.REJECT_BELOW
    assert utils_if.decision((vouch + 0.001, 0.999)) == "yes"
    assert utils_if.decision((vouch - 0.001, 0.999)) == "unsure"          # the interval reaches below the line
    assert utils_if.decision((0.1, reject - 0.001)) == "no"
    assert utils_if.decision((0.1, reject + 0.001)) == "unsure"
    check = {"s_hat": 0.5, "s_hat_interval": [0.45, 0.55], "s_hat_each": [0.45, 0.55], "directions": 2, "h": 0.1}
    line = utils_if.verdict(check, "fine-tune with eps_root", question="the last epoch (steps 8,911-9,380)")
    assert "0.500 [0.450, 0.550]" in line and "no" in line and "eps_root" in line
    assert "the last epoch (steps 8,911-9,380)" in line and "held-out" in line


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
    assert found["relu"]["trainings"] == 1 + 2 * 8 and found["relu"]["h"] == 0.1
    assert found["relu"]["decision"] == "no" and found["softplus"]["decision"] == "yes"
