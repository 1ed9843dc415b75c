"""Study: what makes Method 3's single-model prediction exact? (issue 19, "beyond the raw gradient").

For each training recipe (the report's; a smaller learning rate; a larger batch; softplus instead of
ReLU), the base run (seed 0, the first --train_subset images, --epochs epochs) is retrained with a
random --drop fraction of its points weighted 0 (same seed, same order: the single-model setting),
--subsets times, and each estimator's predicted change of each test loss is scored against the
measured one by the single-model LDS (Spearman over the subsets, mean over the test images):
  tangent w=1      the metagradient at the trained run: predicted = sum_i (w_i - 1) dF/dw_i
  tangent w=1-f    the metagradient of the run with every weight at the mean subset weight 1 - f
  secant           per subset, the mean of the metagradients at --nodes points on the straight path
                   from w = 1 to the subset's weights (midpoint rule): the integral of the tangent
                   along the path, which is the exact change where the run is continuous in w
Two more columns: the test accuracy of the base run (all 10,000 test images), so that a user can
choose a recipe; and the run's sensitivity ("chaos"): one point's weight moved by 1% (1 -> 0.99), the
whole run retrained, the mean |change| of the test losses divided by the change the metagradient
predicts (about 1 for a run that responds linearly to small changes; 1,000 means small changes are
amplified far beyond their first-order effect, and no first-order method can predict the run's
single-model counterfactuals). Prints one table and writes the numbers to results/bench/m3_smoothness_*.json.

Usage: python bench/m3_smoothness.py [--train_subset 2000] [--epochs 5] [--subsets 20] [--drop 0.05]
       [--tests 50] [--nodes 3] [--recipes report,lr0.001,batch32,softplus] [--threads 1]
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from mnist_test import common, lds, training  # noqa: E402

REPORT = {"learning_rate": 0.003, "momentum": 0.9, "weight_decay": 0.001, "batch_size": 8, "activation": "relu"}
SCAN = {"report": {}, "lr0.001": {"learning_rate": 0.001}, "batch32": {"batch_size": 32},
           "softplus": {"activation": "softplus"}, "softplus_lr0.001": {"activation": "softplus", "learning_rate": 0.001}}


def metagradients(cfg: dict, data, weights, x_t, y_t) -> torch.Tensor:
    """dF_t/dw (T, n) of the run with data weights ``weights`` (None = all 1), F_t = test loss t."""
    return training.run_metagradient(data, {**cfg, "seed": 0}, x_t, y_t, torch.device("cpu"), weights)[0]


def study(name: str, cfg: dict, data, test, args) -> dict:
    cpu, n = torch.device("cpu"), len(data)
    x_t, y_t = test.images[:args.tests], test.labels[:args.tests]
    start = time.perf_counter()
    base, _ = training.train_model(data, {**cfg, "seed": 0}, cpu, show_progress=False)
    _, predictions = common.evaluate(base, test)
    accuracy = float((predictions == test.labels).float().mean())
    masks = np.stack([lds.drop_mask(n, args.drop, 0, m) for m in range(args.subsets)])
    base_loss = np.array(lds.outputs_of(base.state_dict(), x_t, y_t, cfg["activation"])["loss"])
    measured = lds.single_model_loss_changes(data, {**cfg, "seed": 0}, masks, x_t, y_t, base_loss, cpu)
    change = torch.as_tensor(masks, dtype=torch.float64) - 1.0                      # (M, n): w_subset - 1
    predicted = {"tangent w=1": (change @ metagradients(cfg, data, None, x_t, y_t).T).numpy(),
                 f"tangent w={1 - args.drop:g}": (change @ metagradients(
                     cfg, data, torch.full((n,), 1.0 - args.drop), x_t, y_t).T).numpy()}
    if name in args.secant_recipes.split(","):
        rows = []
        for m in opt.progress(range(args.subsets), desc=f"{name}: secants", unit="subset"):
            nodes = [(j + 0.5) / args.nodes for j in range(args.nodes)]
            mean = sum(metagradients(cfg, data, (1.0 + t * change[m]).float(), x_t, y_t) for t in nodes) / len(nodes)
            rows.append((change[m] @ mean.T).numpy())
        predicted[f"secant ({args.nodes} nodes)"] = np.stack(rows)
    scores = {key: float(np.nanmean(utils_if.spearman_columns(value, measured))) for key, value in predicted.items()}
    nudged = torch.ones(n)
    nudged[0] -= 1e-2
    model, _ = training.train_model(data, {**cfg, "seed": 0}, cpu, show_progress=False, data_weights=nudged)
    moved = np.array(lds.outputs_of(model.state_dict(), x_t, y_t, cfg["activation"])["loss"]) - base_loss
    tangent = metagradients(cfg, data, None, x_t, y_t)[:, 0].numpy() * -1e-2  # predicted change (T,)
    chaos = float(np.abs(moved).mean() / max(np.abs(tangent).mean(), 1e-30))
    ratio = float(np.median(np.abs(predicted["tangent w=1"]).mean(0) / np.abs(measured).mean(0)))
    return {"recipe": name, "cfg": cfg, "test_accuracy": accuracy, "lds": scores, "chaos_ratio": chaos,
            "typical_measured_change": float(np.abs(measured).mean()), "size_ratio_tangent": ratio,
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train_subset", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--subsets", type=int, default=20)
    parser.add_argument("--drop", type=float, default=0.05)
    parser.add_argument("--tests", type=int, default=50)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--recipes", default="report,lr0.001,batch32,softplus")
    parser.add_argument("--secant_recipes", default="report", help="recipes that also get the secant (costly)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = opt.load_settings()
    data = common.load_train_data(opt.with_values(settings, {"mnist": {"train_subset": args.train_subset}}),
                                  torch.device("cpu"), lambda *_: None)
    test = common.load_test_data(settings, torch.device("cpu"), lambda *_: None)
    results = []
    for name in args.recipes.split(","):
        cfg = {**REPORT, **SCAN[name], "epoch": args.epochs}
        results.append(study(name, cfg, data, test, args))
        print(json.dumps(results[-1]), flush=True)
    keys = list(dict.fromkeys(k for r in results for k in r["lds"]))
    print(f"\nsingle-model LDS, {args.train_subset} images x {args.epochs} epochs, {args.subsets} subsets at a "
          f"{args.drop:g} drop, {args.tests} test images, {torch.get_num_threads()} thread(s)")
    print("| recipe | " + " | ".join(keys) + " | test accuracy | chaos (1% nudge: measured / predicted) | seconds |")
    print("|---|" + "---|" * (len(keys) + 3))
    for r in results:
        print(f"| {r['recipe']} | " + " | ".join(f"{r['lds'][k]:.3f}" if k in r["lds"] else "" for k in keys)
              + f" | {r['test_accuracy']:.4f} | {r['chaos_ratio']:.3g} | {r['seconds']} |")
    path = opt.output_path(settings, "bench", f"m3_smoothness_n{args.train_subset}e{args.epochs}d{args.drop:g}"
                                              f"m{args.subsets}t{args.tests}_{args.recipes.replace(',', '+')}"
                                              f"_sec{args.secant_recipes.replace(',', '+')}.json")
    opt.write_json(path, {"args": vars(args), "results": results})
    print(f"written: {path}")


if __name__ == "__main__":
    main()
