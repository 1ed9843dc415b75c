"""Leave-one-out check of the influence engine (Koh & Liang 2017, Fig. 2 left).

L2-regularised multinomial logistic regression (784 -> 10) on the first 1,000 MNIST training images,
trained to convergence (L-BFGS, float64). For one test image (the highest-loss one among the first
1,000 test images, or --test_rank), influence of every training point by the `cg` solver; then remove each of the
20 most helpful and 20 most harmful points, retrain from the optimum, and compare the actual change
of the test loss with influence / n. Prints Pearson's r (target >= 0.95) and saves a scatter plot.

Usage: python bench/loo_check.py [--n 1000] [--l2 0.01] [--output_dir results]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from mnist_test.datasets import load_mnist  # noqa: E402


class LogisticRegression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.fc(x), dim=1)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, l2: float) -> None:
    """Minimise mean NLL + l2/2 ||theta||^2 to convergence (warm start from the current weights)."""
    optim = torch.optim.LBFGS(model.parameters(), max_iter=2000, tolerance_grad=1e-11,
                              tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optim.zero_grad()
        loss = utils_if.nll_sample_loss(model(x), y).mean() + \
            0.5 * l2 * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss
    for _ in range(3):
        optim.step(closure)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--l2", type=float, default=0.01)
    parser.add_argument("--test_rank", type=int, default=0,
                        help="test image = this rank in descending loss among the first 1,000")
    parser.add_argument("--output_dir", default="results")
    args = parser.parse_args()
    torch.manual_seed(0)
    train = load_mnist(opt.resolve_path("data"), train=True)
    test = load_mnist(opt.resolve_path("data"), train=False)
    x, y = train.images[:args.n].double(), train.labels[:args.n]
    model = LogisticRegression().double()
    fit(model, x, y, args.l2)
    with torch.no_grad():
        test_losses = utils_if.nll_sample_loss(model(test.images[:1000].double()), test.labels[:1000])
    test_id = int(torch.sort(test_losses, descending=True, stable=True).indices[args.test_rank])
    x_t, y_t = test.images[[test_id]].double(), test.labels[[test_id]]
    problem = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss,
                                        utils_if.select_parameters(model), l2_reg=args.l2)
    cfg = utils_if.solver_config("cg", damp=0.0, cg_tol=1e-10, cg_max_iter=1000)
    start = time.perf_counter()
    influence, info = utils_if.compute_influences(problem, x_t, y_t, x, y, cfg, False)
    influence = influence[0]
    print(f"test image {test_id} (label {int(y_t)}), loss {test_losses[test_id]:.4f}; influence of "
          f"{args.n} points in {time.perf_counter() - start:.1f} s (CG {info['cg_iterations']} "
          f"iterations, residual {info['cg_relative_residual']:.1e})")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base_loss = utils_if.nll_sample_loss(model(x_t), y_t).item()
    chosen = utils_if.top_indices(influence, 20, True) + utils_if.top_indices(influence, 20, False)
    predicted, actual = [], []
    for idx in opt.progress(chosen, desc="leave-one-out retraining"):
        keep = torch.ones(args.n, dtype=torch.bool)
        keep[idx] = False
        model.load_state_dict(base_state)
        fit(model, x[keep], y[keep], args.l2)
        with torch.no_grad():
            actual.append(utils_if.nll_sample_loss(model(x_t), y_t).item() - base_loss)
        predicted.append(influence[idx].item() / args.n)
    r = float(np.corrcoef(predicted, actual)[0, 1])
    print(f"Pearson r (predicted influence/n vs actual leave-one-out change) = {r:.4f} "
          f"over {len(chosen)} points (target >= 0.95)")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(actual, predicted, s=14)
    lim = max(map(abs, actual + predicted)) * 1.1
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
    ax.set_xlabel("actual change of test loss (leave one out)")
    ax.set_ylabel("predicted: influence / n")
    ax.set_title(f"Logistic regression, n={args.n}, test {test_id}: r = {r:.3f}", fontsize=9)
    fig.tight_layout()
    settings = {"output_dir": args.output_dir}
    path = opt.output_path(settings, "fig", f"loo_check_n{args.n}_l2{args.l2:g}_rank{args.test_rank}.png")
    fig.savefig(path, dpi=120)
    print(f"scatter plot: {path}")


if __name__ == "__main__":
    main()
