"""Study (issue 21, item 4): how far each Kronecker curvature is from the exact one, and why factored
K-FAC's LDS does not move with its damping factor.

On the default LDS study's base model (ldsTest: 5,000 images, 40 epochs, seed 0; run ldsTest first)
and its last layer (main.4, 650 parameters), where the exact Hessian is a dense 650 x 650 matrix (the
last layer's Hessian of the NLL is its Gauss-Newton matrix: the logits are linear in it):
  - the damped curvature's relative distance from the exact one, ||(K + lam) - (H + lam)||_F / ||H + lam||_F
    (K's dense matrix from its inverse applied to the identity);
  - the mean cosine between the preconditioned test gradients (K + lam)^-1 g_t and (H + lam)^-1 g_t;
  - the mean Pearson correlation, over the 5,000 training points, of their influence scores,
for K-FAC, EK-FAC and factored K-FAC at damping factors 0.01 / 0.1 / 1 (the exact one at the same lam).
Then on all layers: the Spearman correlation, per test image, between each solver's influence scores at
damping factor 0.01 and at 3 (the LDS table's extremes): the rankings a damping change leaves alone.
Prints two tables. Usage: python bench/kronecker_vs_exact.py [--tests 50] [--threads 1] [-opt settings/lds_report.json]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from mnist_test import common, lds  # noqa: E402


def curvature(problem, x, y, solver: str, factor: float, factor_file: str = ""):
    cfg = utils_if.solver_config(solver, kfac_damp_factor=factor, factor_file=factor_file, seed=0)
    return utils_if.kronecker_curvature(problem, x, y, cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tests", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-opt", default=None, help="the LDS study's settings file (default Implementation.json; "
                                                  "settings/lds_report.json: the 60,000-image report model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    settings = lds.model_settings(opt.load_settings(args.opt), 0, list(range(args.tests)))
    model, path = common.load_model(settings, "lds0", cpu)
    train = common.load_train_data(settings, cpu, lambda *_: None)
    test = common.load_test_data(settings, cpu, lambda *_: None)
    x, y, x_t, y_t = train.images, train.labels, test.images[:args.tests], test.labels[:args.tests]
    l2 = settings.mnist.method2.l2_reg
    print(f"model {path}; {len(x)} training images, {args.tests} test images, threads {torch.get_num_threads()}")

    last = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss, ["main.4.weight", "main.4.bias"], l2_reg=l2)
    hessian = last.dense_hessian(x, y).double()                                  # includes l2
    g_t, g = last.sample_grads(x_t, y_t).double(), last.sample_grads(x, y).double()
    eye = torch.eye(last.num_params, dtype=torch.float64)
    print("\nlast layer (650 parameters): the damped curvature against the exact Hessian at the same lambda")
    print("| solver | damping factor | lambda | ||K - H||_F / ||H||_F (damped) | cosine of H^-1 g_t | Pearson of scores |")
    print("|---|---|---|---|---|---|")
    for solver in ("kfac", "ekfac", "kfac_factored"):
        for factor in (0.01, 0.1, 1.0):
            k = curvature(last, x, y, solver, factor)
            lam = k.damping["main.4"]
            damped_exact = hessian + (lam - l2) * eye
            inverse_k = k.inverse_hvp(eye.float()).double()
            damped_k = torch.linalg.inv((inverse_k + inverse_k.T) / 2)
            distance = float((damped_k - damped_exact).norm() / damped_exact.norm())
            s_k = k.inverse_hvp(g_t.float()).double()
            s_h = torch.linalg.solve(damped_exact, g_t.T).T
            cosine = float(torch.nn.functional.cosine_similarity(s_k, s_h, dim=1).mean())
            scores_k, scores_h = (s_k @ g.T).numpy(), (s_h @ g.T).numpy()
            pearson = float(np.mean([utils_if.pearson(a, b) for a, b in zip(scores_k, scores_h)]))
            print(f"| {solver} | {factor:g} | {lam:.4g} | {distance:.3f} | {cosine:.3f} | {pearson:.3f} |")

    full = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss, utils_if.select_parameters(model), l2_reg=l2)
    g_t_all = full.sample_grads(x_t, y_t)
    print("\nall layers: Spearman, per test image, between the influence scores at damping factor 0.01 and at 3")
    print("| solver | Spearman (mean) | min | share of the preconditioned gradient's norm in the 10% largest-eigenvalue directions, factor 0.01 / 3 |")
    print("|---|---|---|---|")
    for solver in ("kfac_factored", "ekfac", "kfac"):
        file = common.factor_file(opt.with_values(settings, {"mnist": {"method2": {"solver": solver}}}))
        scores, shares = [], []
        for factor in (0.01, 3.0):
            k = curvature(full, x, y, solver, factor, file if os.path.isfile(file) else "")
            s = k.inverse_hvp(g_t_all)
            scores.append(utils_if.influence_sweep(full, s, x, y, show_progress=False).double().numpy())
            lam = k.eigenvalues["main.0"].flatten()
            top = lam >= torch.quantile(lam.double(), 0.9).to(lam.dtype)
            rotated = (k.QS["main.0"].T.double() @ _first_layer_block(full, s) @ k.QA["main.0"].double()).pow(2)
            flat = rotated.reshape(len(s), -1)                                     # in the Kronecker eigenbasis
            shares.append(float((flat[:, top].sum(1) / flat.sum(1)).mean()))
        rho = utils_if.spearman_columns(scores[0].T, scores[1].T)
        print(f"| {solver} | {np.nanmean(rho):.3f} | {np.nanmin(rho):.3f} | {shares[0]:.3f} / {shares[1]:.3f} |")


def _first_layer_block(problem, s):
    """The first layer's (weight | bias) block of flat vectors, (k, out, in + 1), float64."""
    parts = problem.unflatten(s)
    return torch.cat([parts["main.0.weight"], parts["main.0.bias"][..., None]], dim=-1).double()


if __name__ == "__main__":
    main()
