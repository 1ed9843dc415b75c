"""Write docs/measured_lds.json: the project's measured LDS rows, each with the trust key of the settings
it was measured with (mnist_test.question.trust_key), so that run_pipeline quotes a number only for a
run whose every score-changing setting matches.

Each entry names the ldsTest settings file that measured it; the keys are derived from that file the way
ldsTest derives each row's settings (mnist_test.lds.model_settings, lds_study.solver_variants), and the
numbers are the ones docs/results.md reports at ``source`` (with their commands).

Usage: python bench/measured_table.py        (rewrites docs/measured_lds.json)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils_option as opt  # noqa: E402
from ffdnet_test import question as ffdnet_question  # noqa: E402
from mnist_test import lds, lds_study, question  # noqa: E402

ABOUT = ("The project's own measured LDS (Spearman over retrained models; 1 = predicts them exactly, 0 = no better "
         "than chance), one entry per ldsTest study: setting algorithm = models retrained from scratch on half the "
         "images (what training does with the data); single_model = the same run with a fraction 'drop' of the "
         "images weighted 0 (this network; in the attribution window when the recipe has one). Each row carries "
         "the trust key of the settings it was measured with: run_pipeline quotes it only for a run with the same "
         "key. Made by bench/measured_table.py from the settings files named here; numbers and commands in "
         "docs/results.md at 'source'.")

REPORT_5K = "docs/results.md#method-3-and-the-single-model-setting-the-reports-question"
REPORT_60K = "docs/results.md#the-reports-question-at-the-reports-scale"
FRONTIER = "docs/results.md#the-recipe-frontier-accurate-and-attributable"
ENTRIES = [
    ("the report's recipe on 5,000 images, 40 epochs", "settings/lds_algorithm_noloo.json", "algorithm", None,
     REPORT_5K, {"m1_batch_raw": -0.001, "m1_per_sample_raw": 0.005, "if_ekfac": 0.294, "if_kfac": 0.293,
                 "if_kfac_factored": 0.398, "if_exact_last": 0.207, "if_lissa": 0.184, "grad_dot": 0.113,
                 "trak": 0.17, "if_arnoldi": 0.17}),
    ("the report's recipe on 5,000 images, 40 epochs", "settings/lds_single.json", "single_model", 0.05,
     REPORT_5K, {"m1_batch_raw": -0.003, "if_ekfac": 0.143, "if_kfac_factored": 0.2, "if_exact_last": 0.083,
                 "if_lissa": 0.111, "grad_dot": 0.026, "trak": 0.127, "if_arnoldi": 0.074, "m3_replay": 0.067}),
    ("the report's recipe on 60,000 images, 20 epochs (the report's model)", "settings/lds_report.json", "algorithm",
     None, REPORT_60K, {"m1_batch_raw": -0.083, "m1_per_sample_raw": -0.058, "if_ekfac": 0.163, "if_kfac": 0.174,
                        "if_kfac_factored": 0.16, "if_exact_last": 0.082, "if_lissa": 0.067, "grad_dot": 0.043}),
    ("the report's recipe on 60,000 images, 20 epochs (the report's model)", "settings/lds_report_single.json",
     "single_model", 0.05, REPORT_60K, {"m1_batch_raw": -0.001, "if_ekfac": 0.022, "if_kfac_factored": 0.025,
                                        "trak": 0.003, "if_arnoldi": -0.029, "grad_dot": -0.035, "m3_replay": 0.024}),
    ("the attributable recipe (mnist.recipe \"attributable\"), 60,000 images, 20 epochs, removals in its last epoch",
     "settings/lds_attributable.json", "single_model", 0.01, FRONTIER,
     {"m1_batch_raw": 0.057, "if_ekfac": 0.493, "if_kfac_factored": 0.476, "if_exact_last": 0.440, "grad_dot": 0.261,
      "trak": 0.010, "m3_replay": 0.974}),
    ("the attributable recipe (mnist.recipe \"attributable\"), 60,000 images, 20 epochs, removals in its last epoch",
     "settings/lds_attributable.json", "single_model", 0.05, FRONTIER,
     {"m1_batch_raw": -0.026, "if_ekfac": 0.592, "if_kfac_factored": 0.592, "if_exact_last": 0.51, "grad_dot": 0.458,
      "trak": 0.149, "m3_replay": 0.993}),
]


# the denoiser's single-model LDS (ffdnet_test/ldsTest.py, removals in the training's final window): per drop,
# {"{method} {target kind}": (mean over the targets of that kind, the smallest)}; keys from ffdnet_test.question.lds_key
FFDNET_ATTRIBUTABLE = "docs/results.md#an-attributable-denoiser-the-final-window"
FFDNET_NAME = ("the denoiser's attributable preset (ffdnet.recipe \"attributable\"), 1,000 Train400 patches, "
               "removals in its final window")
FFDNET_ENTRIES: list = [
    (FFDNET_NAME, "settings/ffdnet_attributable.json", 0.01, FFDNET_ATTRIBUTABLE,
     {"m3 pixel window": (0.996, 0.991), "m3 whole image": (0.999, 0.997), "ekfac pixel window": (0.309, 0.085),
      "ekfac whole image": (0.409, 0.256), "lissa pixel window": (0.26, 0.165), "lissa whole image": (0.435, 0.379),
      "m1 pixel window": (0.005, -0.112)}),
    (FFDNET_NAME, "settings/ffdnet_attributable.json", 0.05, FFDNET_ATTRIBUTABLE,
     {"m3 pixel window": (0.991, 0.968), "m3 whole image": (0.996, 0.994), "ekfac pixel window": (-0.006, -0.265),
      "ekfac whole image": (0.212, 0.088), "lissa pixel window": (0.006, -0.259), "lissa whole image": (0.165, 0.141),
      "m1 pixel window": (-0.006, -0.141)}),
]


def row_key(settings: dict, row: str) -> dict:
    """The trust key of one ldsTest row, as ldsTest makes that row's settings."""
    ids = [0]
    if row.startswith("m1_"):
        grad_mode = "per_sample" if row.startswith("m1_per_sample") else "batch"
        return question.trust_key(lds.model_settings(settings, 0, ids, grad_mode=grad_mode).mnist, "method1")
    if row == "m3_replay":
        return question.trust_key(lds.model_settings(settings, 0, ids).mnist, "method3")
    overrides, _ = lds_study.solver_variants(settings)[row]
    return question.trust_key(lds.model_settings(settings, 0, ids, method2=overrides).mnist, "method2")


def main() -> None:
    entries = []
    for name, path, setting, drop, source, values in ENTRIES:
        settings = opt.load_settings(os.path.join(opt.REPO_ROOT, path))
        entries.append({"name": name, "settings_file": path, "setting": setting, "drop": drop, "source": source,
                        "rows": {row: {"lds": value, "key": row_key(settings, row)} for row, value in values.items()}})
    for name, path, drop, source, values in FFDNET_ENTRIES:
        settings = opt.load_settings(os.path.join(opt.REPO_ROOT, path))
        entries.append({"name": name, "network": "ffdnet", "settings_file": path, "setting": "single_model",
                        "drop": drop, "source": source,
                        "rows": {row: {"lds": mean, "min": smallest,
                                       "key": ffdnet_question.lds_key(settings.ffdnet, row.split(" ", 1)[0])}
                                 for row, (mean, smallest) in values.items()}})
    out = opt.write_json(os.path.join(opt.REPO_ROOT, "docs", "measured_lds.json"), {"about": ABOUT, "entries": entries})
    print(f"written: {out} ({sum(len(e['rows']) for e in entries)} rows in {len(entries)} entries)")


if __name__ == "__main__":
    main()
