"""Which final window makes the denoiser attributable? The measured scan behind ffdnet.recipe "attributable".

Each candidate is the quick profile's training (Train400, sigma 0-75, patch 32 stride 16, batch 32,
residual, BN recalibrated; lr 1e-3, / 10 at --decay) for --epochs epochs on the first --patches patches, with the report's
layers and an activation (relu, or softplus in every layer, training included), followed by a final
window (ffdnet.window: BatchNorm frozen, a fresh optimiser, the learning rate decaying linearly to
0) of an optimiser (adam lr 1e-4; adam with eps_root 1e-6; sgd lr 0.02 momentum 0.9) and a length
(0.5, 1, 2 epochs). For each it reports:
  S_hat     metasmoothness of the window in its data weights with its interval (explain.metasmoothness,
            1 + 2 x --directions reruns of the window from its start)
  LDS       Method 3's single-model LDS through the window at 1% and 5% drops (ffdnet_test/ldsTest.py,
            --subsets subsets each): per target (each pixel window of ffdnet.attribution.points on
            the first 2 test images, and each whole image), the mean and the minimum
  PSNR      Set12 at sigma 25 of the trained model (window included) and of the report's model on
            the same patches (no window, ReLU: the relu candidates' window start)
  seconds   the main training, the window, and Method 3's replay (forward + backward, all targets)
Prints a Markdown table; writes results/bench/ffdnet_attributable_p{patches}_s{seed}.json (one row per
candidate, resumable: a candidate in the file is not run again).

Usage: python3 bench/ffdnet_attributable.py [--patches 1000] [--epochs 32] [--decay 24] [--seed 1] [--subsets 16] [--directions 4]
       [--candidates adam-1-relu,adam-1-softplus,...] [--part a]   (two processes with --part a / b on 2 cores)
Candidate names: {adam|adamer|sgd}-{window epochs}-{relu|softplus}[-{first learning rate}].
"""
import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import utils_option as opt  # noqa: E402
from ffdnet_test import FFDNet_Train, attribution, common, datasets, explain, ldsTest, window  # noqa: E402
from ffdnet_test.training import validate  # noqa: E402

OPTIMISERS = {"adam": {"optimizer": "adam", "learning_rate": 1e-4, "eps_root": 0.0},
              "adamer": {"optimizer": "adam", "learning_rate": 1e-4, "eps_root": 1e-6},
              "sgd": {"optimizer": "sgd", "learning_rate": 0.02, "momentum": 0.9}}
DEFAULT = ",".join(f"{o}-1-{a}" for a in ("relu", "softplus") for o in OPTIMISERS)


def candidate_settings(name: str, args, output_dir: str) -> opt.Settings:
    optimiser, epochs, activation, *lr = name.split("-", 3)
    window_values = {**OPTIMISERS[optimiser], "epochs": float(epochs), "lr_schedule": "linear", "batch_size": 32}
    if lr:
        window_values["learning_rate"] = float(lr[0])
    values = {"recipe": "attributable", "activation": activation, "seed": args.seed, "max_patches": args.patches,
              "epoch": args.epochs, "lr_decay_epochs": args.decay,
              "window": window_values,
              "method3": {"smoothness_directions": args.directions},
              "lds": {"num_subsets": args.subsets, "methods": ["m3"], "top_k": 0, "test_images": 2}}
    return opt.load_settings(args.opt, profile="quick", overrides={"output_dir": output_dir, "threads": 1,
                                                                   "ffdnet": values})


def plain(settings: opt.Settings) -> opt.Settings:
    """The same training without the window (the report's recipe when the activation is relu)."""
    return opt.with_values(settings, {"ffdnet": {"window": {"epochs": 0.0}}})


def psnr(settings: opt.Settings, model) -> float:
    _, images = datasets.read_folder(common.folder(settings, "test_dir"), settings.ffdnet.is_gray)
    return validate(model, images, 25.0, settings.ffdnet.seed, torch.device("cpu"))


def study(name: str, args, output_dir: str) -> dict:
    settings = candidate_settings(name, args, output_dir)
    cfg = settings.ffdnet
    with opt.quiet_console():  # the training before the window, once per activation (FFDNet_Train reuses it)
        opt.run_stage(FFDNet_Train, [common.model_file(plain(settings))], plain(settings))
        result = ldsTest.main(settings)
    trained, _ = common.load_model(settings, torch.device("cpu"))
    start = window.load_start(settings, torch.device("cpu"))
    noisy, clean, sigma, _ = attribution.training_triples(settings, torch.device("cpu"))
    with opt.Timer() as check_timer:
        smooth = explain.metasmoothness(start, noisy, clean, sigma, cfg.window, cfg.method3, seed=cfg.seed)
    history = opt.load_torch(common.model_file(settings), "FFDNet_Train.py", weights_only=False)["history"]
    rows = [r for r in result["rows"] if r["method"] == "m3"]
    out = {"candidate": name, "s_hat": smooth["s_hat"], "s_hat_interval": list(smooth["s_hat_interval"]),
           "decision": smooth["decision"], "psnr": psnr(settings, trained), "psnr_window_start": psnr(settings, start),
           "seconds_window": history[-1]["seconds"], "steps_window": window.window_run(cfg, len(clean)).num_steps,
           "seconds_replay": result["meta"]["method3"]["seconds_forward"] + result["meta"]["method3"]["seconds_backward"],
           "seconds_check": round(check_timer.seconds, 1), "replay_targets": result["meta"]["method3"]["targets"]}
    for fraction in sorted({r["fraction"] for r in rows}):
        per_target = {r["target"]: round(r["lds"], 3) for r in rows if r["fraction"] == fraction and "low" in r}
        pixels = [v for k, v in per_target.items() if not k.endswith("whole")]
        wholes = [v for k, v in per_target.items() if k.endswith("whole")]
        out[f"lds_{fraction:g}"] = {"per_target": per_target, "pixel_mean": float(np.mean(pixels)),
                                    "pixel_min": float(np.min(pixels)), "whole_min": float(np.min(wholes))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-opt", default=os.path.join(opt.REPO_ROOT, "settings/shared.json"))
    parser.add_argument("--patches", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=32, help="training epochs before the window (ffdnet.epoch)")
    parser.add_argument("--decay", type=int, nargs="*", default=[24], help="ffdnet.lr_decay_epochs")
    parser.add_argument("--subsets", type=int, default=16)
    parser.add_argument("--directions", type=int, default=4)
    parser.add_argument("--candidates", default=DEFAULT)
    parser.add_argument("--part", default="", help="this process's share of the candidates (two processes of 1 "
                        "thread each on 2 cores: the reruns must use the training's thread count to be bitwise)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    output_dir = os.path.join(opt.REPO_ROOT, "results", "bench", "ffdnet_attributable")
    stem = os.path.join(opt.REPO_ROOT, "results", "bench",
                        f"ffdnet_attributable_p{args.patches}e{args.epochs}_s{args.seed}_m{args.subsets}_d{args.directions}")
    path = f"{stem}{'_' + args.part if args.part else ''}.json"
    done = {r["candidate"]: r for r in (opt.read_json(path, "bench/ffdnet_attributable.py")["results"]
                                        if os.path.isfile(path) else [])}
    for name in args.candidates.split(","):
        if name not in done:
            done[name] = study(name, args, output_dir)
            opt.write_json(path, {"args": vars(args), "results": list(done.values())})
            print(f"{name}: done", flush=True)
    for other in sorted(glob.glob(f"{stem}*.json")):  # the other processes' shares, for the table
        for r in opt.read_json(other, "bench/ffdnet_attributable.py")["results"]:
            done.setdefault(r["candidate"], r)
    header = ["candidate", "S_hat [interval]", "LDS 1% pixel mean / min", "LDS 1% whole min",
              "LDS 5% pixel mean / min", "LDS 5% whole min", "PSNR (start)", "window s", "replay s"]
    rows = []
    for r in done.values():
        one, five = r.get("lds_0.01", {}), r.get("lds_0.05", {})
        rows.append([r["candidate"], f"{r['s_hat']:.3f} [{r['s_hat_interval'][0]:.3f}, {r['s_hat_interval'][1]:.3f}]",
                     f"{one.get('pixel_mean', np.nan):.3f} / {one.get('pixel_min', np.nan):.3f}",
                     f"{one.get('whole_min', np.nan):.3f}",
                     f"{five.get('pixel_mean', np.nan):.3f} / {five.get('pixel_min', np.nan):.3f}",
                     f"{five.get('whole_min', np.nan):.3f}", f"{r['psnr']:.2f} ({r['psnr_window_start']:.2f})",
                     f"{r['seconds_window']:.0f}", f"{r['seconds_replay']:.0f}"])
    print(opt.markdown_table(header, rows))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
