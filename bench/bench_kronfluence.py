"""Benchmark: this project's EK-FAC against kronfluence's (the field's implementation) on the same
trained MLP, the same damping heuristic (0.1 x mean eigenvalue per layer), the same 10 test
images and all 60,000 training images: Pearson and Spearman per test image, and the times.

kronfluence is never a dependency of the toolkit: it runs in a throwaway virtual environment,
made like this (its torchvision pin would pull a CUDA torch, so --no-deps):
    python -m venv /tmp/kfvenv && /tmp/kfvenv/bin/pip install torch==2.13.0 numpy
    /tmp/kfvenv/bin/pip install --no-deps kronfluence==1.0.1 accelerate
    /tmp/kfvenv/bin/pip install einops einconv opt-einsum safetensors tqdm psutil pyyaml packaging huggingface_hub
Usage: python bench/bench_kronfluence.py [--venv /tmp/kfvenv] [--model PATH] [--fisher true|empirical] [--threads 1]
(the model defaults to Train.py's report model, trained first if missing: about 75 s).
This script runs itself inside the venv for kronfluence's half (--kronfluence-side).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

# the report's 10 test images (loss-rank rule under the seed-0 report model; README)
TEST_IDS = [3520, 233, 9786, 8690, 614, 7238, 5421, 586, 1127, 8845]


def load_arrays():
    from mnist_test.datasets import load_mnist
    train = load_mnist(os.path.join(ROOT, "data"), train=True)
    test = load_mnist(os.path.join(ROOT, "data"), train=False)
    return train.images, train.labels, test.images[TEST_IDS], test.labels[TEST_IDS]


def kronfluence_side(model_path: str, out: str, fisher: str) -> None:
    """Runs in the venv: kronfluence EK-FAC factors (true Fisher) and pairwise scores."""
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))

    from mnist_test.model import mnist_model

    class NllTask(Task):  # our model outputs log-probabilities
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logp = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(logp.detach().exp(), 1).flatten()
            return F.nll_loss(logp, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.nll_loss(model(x), y, reduction="sum")

    torch.manual_seed(0)
    x, y, xt, yt = load_arrays()
    model = mnist_model()
    model.load_state_dict(torch.load(model_path, weights_only=True)["model"])
    model.eval()
    task = NllTask()
    model = prepare_model(model, task)
    analyzer = Analyzer("mnist_bench", model=model, task=task, cpu=True, disable_tqdm=True,
                        output_dir=os.path.join(os.path.dirname(out), "kronfluence_results"))
    start = time.perf_counter()
    analyzer.fit_all_factors("ekfac", dataset=TensorDataset(x, y), per_device_batch_size=2000,
                             factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=fisher == "empirical"),
                             overwrite_output_dir=True)
    factors_s = time.perf_counter() - start
    start = time.perf_counter()
    analyzer.compute_pairwise_scores("scores", "ekfac", query_dataset=TensorDataset(xt, yt),
                                     train_dataset=TensorDataset(x, y), per_device_query_batch_size=10,
                                     per_device_train_batch_size=2000,
                                     score_args=ScoreArguments(damping_factor=None), overwrite_output_dir=True)
    scores_s = time.perf_counter() - start
    scores = analyzer.load_pairwise_scores("scores")["all_modules"].double().numpy()
    np.savez(out, scores=scores, factors_s=factors_s, scores_s=scores_s)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--venv", default="/tmp/kfvenv")
    parser.add_argument("--model", default="")
    parser.add_argument("--fisher", default="true", choices=["true", "empirical"],
                        help="empirical: no sampled labels on either side, which isolates the sampling noise")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    parser.add_argument("--kronfluence-side", nargs=3, metavar=("MODEL", "OUT", "FISHER"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.kronfluence_side:
        kronfluence_side(*args.kronfluence_side)
        return
    import utils_if
    import utils_option as opt
    from mnist_test import Train, common
    from mnist_test.model import mnist_model
    settings = opt.load_settings(profile="report")
    model_path = args.model or common.model_file(settings, settings.mnist.method1.mode)
    if not os.path.isfile(model_path):
        Train.main(settings)
    x, y, xt, yt = load_arrays()
    model = mnist_model()
    model.load_state_dict(torch.load(model_path, weights_only=True)["model"])
    problem = utils_if.InfluenceProblem(model, utils_if.nll_sample_loss, utils_if.select_parameters(model),
                                        l2_reg=0.0)  # kronfluence has no L2 term
    start = time.perf_counter()
    curvature = utils_if.KroneckerCurvature(problem, x, y, eigen_corrected=True, fisher=args.fisher, seed=0)
    ours_factors_s = time.perf_counter() - start
    start = time.perf_counter()
    s_test = curvature.inverse_hvp(problem.sample_grads(xt, yt))
    ours = utils_if.influence_sweep(problem, s_test, x, y, show_progress=False).double().numpy()
    ours_scores_s = time.perf_counter() - start
    out = os.path.join(tempfile.mkdtemp(prefix="bench_kf_"), "kronfluence.npz")
    python = os.path.join(args.venv, "bin", "python")
    proc = subprocess.run([python, os.path.abspath(__file__), "--kronfluence-side", model_path, out, args.fisher],
                          capture_output=True, text=True, env={**os.environ, "BENCH_THREADS": str(args.threads)})
    if proc.returncode != 0:
        sys.exit(f"kronfluence side failed (is {python} the venv above?):\n{proc.stderr[-3000:]}")
    theirs = np.load(out)
    scores = theirs["scores"]
    print(f"threads {torch.get_num_threads()}; {args.fisher} Fisher; model {model_path}; 10 test images x "
          f"{len(x)} training images")
    print(f"{'test id':>8} {'Pearson':>8} {'Spearman':>9} {'top-100 overlap':>16}")
    pearsons = []
    for t, test_id in enumerate(TEST_IDS):
        p = utils_if.pearson(ours[t], scores[t])
        s = float(utils_if.spearman_columns(ours[t], scores[t])[0])
        overlap = utils_if.top_k_overlap(np.argsort(-ours[t]), np.argsort(-scores[t]), 100)
        pearsons.append(p)
        print(f"{test_id:>8} {p:>8.4f} {s:>9.4f} {overlap:>16}")
    print(f"min Pearson {min(pearsons):.4f}, mean {np.mean(pearsons):.4f}; sign: ours = +kronfluence "
          f"({'same' if np.mean(pearsons) > 0 else 'opposite'} sign convention)")
    print(f"ours: factors {ours_factors_s:.1f} s, influence of 10 test images on all {len(x)} {ours_scores_s:.1f} s")
    print(f"kronfluence: factors {float(theirs['factors_s']):.1f} s, scores {float(theirs['scores_s']):.1f} s")


if __name__ == "__main__":
    main()
