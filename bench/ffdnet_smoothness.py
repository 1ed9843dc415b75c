"""Can expTest's fine-tuning be attributed? Metasmoothness of the denoiser's fine-tuning per optimiser variant.

For each variant of ffdnet.explain.finetune (Adam as the study runs it; Adam with epsilon inside the
square root, eps_root; SGD with momentum at --sgd_lrs), the fine-tuning of the study's base model (seed 0's order) is repeated with
the data weights of influence.smoothness (1 + 2 x ffdnet.method3.smoothness_directions runs: the check
m3_Test runs before its replays), and S_hat is printed with the check's time. The base model is the
study's (FFDNet_Train.py with the same settings, e.g. -profile quick).

Usage: python bench/ffdnet_smoothness.py [-opt settings/ffdnet_explain_1seed.json] [--eps_roots 0 1e-6 1e-4]
       [--sgd_lrs 0.02 0.005] [--threads 2]
"""
import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import utils_option as opt  # noqa: E402
from ffdnet_test import attribution, common, explain  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-opt", default=os.path.join(opt.REPO_ROOT, "settings/ffdnet_explain_1seed.json"))
    parser.add_argument("--eps_roots", type=float, nargs="*", default=[0.0, 1e-6, 1e-4])
    parser.add_argument("--sgd_lrs", type=float, nargs="*", default=[], help="also SGD with momentum 0.9 at these rates")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    settings = opt.load_settings(args.opt)
    torch.set_num_threads(args.threads)
    cfg = settings.ffdnet
    device = torch.device("cpu")
    base, model_path = common.load_model(settings, device)
    noisy, clean, sigma, _ = attribution.training_triples(settings, device)
    rows = []
    variants = [("Adam" if not e else f"Adam, eps_root {e:g}", dataclasses.replace(cfg.explain.finetune, eps_root=e))
                for e in args.eps_roots]
    variants += [(f"SGD, momentum 0.9, lr {lr:g}", dataclasses.replace(cfg.explain.finetune, optimizer="sgd", momentum=0.9,
                                                                      learning_rate=lr, eps_root=0.0))
                 for lr in args.sgd_lrs]
    for name, ft in variants:
        with opt.Timer() as timer:
            found = explain.metasmoothness(base, noisy, clean, sigma, ft, cfg.method3)
        rows.append({"variant": name, "s_hat": found["s_hat"],
                     "s_hat_each": found["s_hat_each"], "runs": found["trainings"], "seconds": round(timer.seconds, 1)})
        print(rows[-1], flush=True)
    print(f"\n{model_path}: {len(clean)} patches, fine-tuning {cfg.explain.finetune}, "
          f"{torch.get_num_threads()} thread(s)")
    print(opt.markdown_table(["variant", "S_hat", "fine-tuning runs", "seconds"],
                             [[r["variant"], r["s_hat"], r["runs"], r["seconds"]] for r in rows], ".4g"))
    path = opt.output_path(settings, "bench", "ffdnet_smoothness.json")
    opt.write_json(path, {"model": model_path, "rows": rows})
    print(f"written: {path}")


if __name__ == "__main__":
    main()
