"""Study: is the single-model counterfactual of an ldsTest study a smooth function of the data weights?

Reads a single-model ldsTest study (its settings file, e.g. settings/lds_single.json, after ldsTest ran):
the base model (Train.py's run) and Method 3's scores for the first --tests test images. Then:
  1. nudges one training point's weight by eps (1e-6, 1e-4, 1e-2), retrains the whole run with
     train_model (Train.py's trainer, the replay's arithmetic) and prints the mean |change| of the
     test losses against the change Method 3 predicts for it (their ratio is the run's amplification
     of small changes; about 1 = a run that responds linearly);
  2. retrains --subsets of the study's drop-fraction subsets with train_model (not the grouped
     trainer) and prints how far they are from the grouped trainer's models of the same subsets,
     next to the typical effect of the drop, and Method 3's LDS against both.
Usage: python bench/m3_chaos.py -opt settings/lds_single.json [--tests 100] [--subsets 10] [--drop 0.05]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import utils_if  # noqa: E402
import utils_option as opt  # noqa: E402
from mnist_test import common, lds, training  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-opt", default="settings/lds_single.json")
    parser.add_argument("--tests", type=int, default=100)
    parser.add_argument("--subsets", type=int, default=10)
    parser.add_argument("--drop", type=float, default=0.05)
    parser.add_argument("--point", type=int, default=123)
    args = parser.parse_args()
    settings = opt.load_settings(args.opt)
    torch.set_num_threads(opt.apply_threads(settings))
    cpu = torch.device("cpu")
    lcfg = settings.mnist.lds
    s = lds.model_settings(settings, 0, lds.test_ids(settings))
    ids = lds.test_ids(settings)[:min(args.tests, s.mnist.method3.test_sample_num)]
    train = common.load_train_data(s, cpu, lambda *_: None)
    test = common.load_test_data(s, cpu, lambda *_: None)
    x_t, y_t = test.images[ids], test.labels[ids]
    cfg, act, n = lds.recipe(settings).replace(seed=settings.mnist.lds.ensemble_seeds[0]), settings.mnist.activation, len(train)
    influence = lds.influence_matrix(opt.read_json(common.m3_file(s), "mnist_test/m3_Test.py"), ids, common.m3_file(s))
    model, path = common.load_model(s, "lds0", cpu)
    base = np.array(lds.outputs_of(model.state_dict(), x_t, y_t, act)["loss"])
    print(f"{path}: {n} images, {cfg.epoch} epochs, {act}; {len(ids)} test images, threads {torch.get_num_threads()}")
    print("| nudge of one weight | mean abs change of the test losses | predicted by Method 3 | ratio |")
    print("|---|---|---|---|")
    for eps in (1e-6, 1e-4, 1e-2):
        w = torch.ones(n)
        w[args.point] -= eps
        moved, _ = training.train_model(train, cfg, cpu, show_progress=False, data_weights=w)
        change = np.array(lds.outputs_of(moved.state_dict(), x_t, y_t, act)["loss"]) - base
        predicted = influence[:, args.point] * eps / n   # dF = -(influence / n) dw, dw = -eps
        ratio = np.abs(change).mean() / np.abs(predicted).mean()
        print(f"| {eps:g} | {np.abs(change).mean():.3g} | {np.abs(predicted).mean():.3g} | {ratio:.3g} |", flush=True)
    folder = lds.study_folder(settings, "single_model", f"s{lcfg.ensemble_seeds[0]}_d{args.drop:g}")
    alone, grouped, masks = [], [], []
    for m in range(args.subsets):
        mask = lds.drop_mask(n, args.drop, lcfg.seed, m)
        trained, _ = training.train_model(train, cfg, cpu, show_progress=False,
                                          data_weights=torch.as_tensor(mask, dtype=torch.float32))
        alone.append(lds.outputs_of(trained.state_dict(), x_t, y_t, act)["loss"])
        grouped.append(json.load(open(os.path.join(folder, f"m{m}.json")))["loss"][:len(ids)])
        masks.append(mask)
    alone, grouped, masks = np.array(alone), np.array(grouped), np.array(masks)
    predicted = utils_if.datamodel_predictions(influence, masks, n)
    print(f"\n{args.subsets} subsets at a {args.drop:g} drop: train_model vs the grouped trainer, mean |difference| "
          f"{np.abs(alone - grouped).mean():.3g}; the drop's mean |effect| {np.abs(alone - base).mean():.3g}")
    print(f"Method 3's LDS over these {args.subsets} subsets: {np.nanmean(utils_if.spearman_columns(predicted, alone)):.3f} "
          f"(train_model), {np.nanmean(utils_if.spearman_columns(predicted, grouped)):.3f} (grouped trainer)")


if __name__ == "__main__":
    main()
