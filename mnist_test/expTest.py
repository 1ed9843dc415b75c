"""Explainability test, step 2: each retrained model's test loss and decision on its own test
image; the mean test loss against N for explanatory vs random points (Figures 4.8-4.10: one
figure per method list, a relabel panel and a remove panel), and the decision flips.

Reads:  the models of expTrain.py (model_zoo/expTest/{tag}/...)
Writes: test/expTest_{tag}.json and .csv (one row per model: method, manipulation, N, test id,
        label, loss, prediction, prediction of the base model); test/expTest_{tag}_flips.md;
        fig/expTest_{tag}_{method}.png
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import utils_option as opt  # noqa: E402
from mnist_test import common, explain  # noqa: E402
from mnist_test.model import mnist_model  # noqa: E402

PANELS = (("relabel", "algo", "random"), ("remove", "remove_algo", "remove_random"))


def evaluate_jobs(settings: opt.Settings, device) -> list[dict]:
    test = common.load_test_data(settings, device, lambda *_: None)
    jobs = explain.plan(settings)
    cfg = settings.mnist
    model = mnist_model(cfg.activation, cfg.logit_scale).to(device).eval()

    def run(path, test_id):
        model.load_state_dict(opt.load_torch(path, "mnist_test/expTrain.py", map_location=device)["model"])
        with torch.no_grad():
            out = model(test.images[[test_id]])
        return float(-out[0, test.labels[test_id]]), int(out[0].argmax())

    base = opt.require_file(jobs[0]["path"], "mnist_test/expTrain.py")
    test_ids = sorted({j["test_id"] for j in jobs[1:]})
    base_result = {t: run(base, t) for t in test_ids}
    rows = []
    for job in opt.progress(jobs[1:], desc="expTest"):
        if not os.path.isfile(job["path"]):
            continue
        loss, pred = run(job["path"], job["test_id"])
        rows.append({"method": job["method"], "manipulation": job["manipulation"], "n": job["n"],
                     "test_id": job["test_id"], "label": int(test.labels[job["test_id"]]),
                     "loss": loss, "prediction": pred, "base_loss": base_result[job["test_id"]][0],
                     "base_prediction": base_result[job["test_id"]][1]})
    for (method, manipulation) in {(r["method"], r["manipulation"]) for r in rows}:  # N = 0 rows
        for t in test_ids:
            rows.append({"method": method, "manipulation": manipulation, "n": 0, "test_id": t,
                         "label": int(test.labels[t]), "loss": base_result[t][0],
                         "prediction": base_result[t][1], "base_loss": base_result[t][0],
                         "base_prediction": base_result[t][1]})
    return sorted(rows, key=lambda r: (r["method"], r["manipulation"], r["n"], r["test_id"]))


def mean_curve(rows, method, manipulation):
    ns = sorted({r["n"] for r in rows if r["method"] == method and r["manipulation"] == manipulation})
    return ns, [float(np.mean([r["loss"] for r in rows if r["method"] == method and
                               r["manipulation"] == manipulation and r["n"] == n])) for n in ns]


def draw(settings, rows, method, logger):
    import matplotlib
    if not opt.is_interactive():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [p for p in PANELS if any(r["manipulation"] in p[1:] and r["method"] == method for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, (title, explanatory, random) in zip(axes[0], panels):
        for manipulation, color, label in ((explanatory, "tab:blue", f"explanatory ({method})"),
                                           (random, "tab:red", "random")):
            ns, losses = mean_curve(rows, method, manipulation)
            if ns:
                ax.plot(ns, losses, "o-", color=color, label=label)
        ax.set_xlabel("N (training points manipulated)")
        ax.set_ylabel("mean test loss of the test images")
        ax.set_title(f"{title} the top-N vs N random points")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Explainability test, {method} (fresh model per point, {common.run_tag(settings)})")
    fig.tight_layout()
    return opt.save_figure(fig, opt.output_path(settings, "fig", f"expTest_{common.run_tag(settings)}_{method}.png"),
                           logger)


def main(settings: opt.Settings) -> dict:
    cfg = settings.mnist
    logger, device = opt.start_script(settings, "mnist_expTest", cfg, seed=False)
    rows = evaluate_jobs(settings, device)
    tag = common.run_tag(settings)
    csv_path = opt.write_csv(opt.output_path(settings, "test", f"expTest_{tag}.csv"), rows, logger)
    flips = [r for r in rows if r["n"] > 0 and r["prediction"] != r["base_prediction"]]
    lines = [opt.markdown_table(["method", "manipulation", "N", "test id", "label", "before → after"],
                                [[r["method"], r["manipulation"], r["n"], r["test_id"], r["label"],
                                  f"{r['base_prediction']} → {r['prediction']}"] for r in flips])]
    flips_path = opt.output_path(settings, "test", f"expTest_{tag}_flips.md")
    opt.write_text(flips_path, "\n".join(lines) + "\n")
    logger.info("decision flips:\n" + "\n".join(lines))
    ratios = {}
    for method in sorted({r["method"] for r in rows}):
        for _title, explanatory, random in PANELS:
            ns_e, loss_e = mean_curve(rows, method, explanatory)
            ns_r, loss_r = mean_curve(rows, method, random)
            for n, le, lr in zip(ns_e, loss_e, loss_r):
                if n and ns_e == ns_r:
                    base = loss_e[0]  # N = 0: the base model, always in the rows
                    increase_e, increase_r = le - base, lr - base
                    ratios[f"{method}/{explanatory}/n{n}"] = {"explanatory_increase": increase_e,
                                                             "random_increase": increase_r}
                    logger.info(f"{method} {explanatory:<12} N={n:>6}: mean loss {le:.4f} (random {lr:.4f}); "
                                f"increase {increase_e:+.4f} vs {increase_r:+.4f}")
    figures = {m: draw(settings, rows, m, logger) for m in sorted({r["method"] for r in rows})}
    json_path = opt.write_json(opt.output_path(settings, "test", f"expTest_{tag}.json"),
                               {"rows": rows, "increases": ratios, "flips": flips}, logger)
    return {"json": json_path, "csv": csv_path, "flips": flips_path, "figures": figures}


if __name__ == "__main__":
    opt.run_script(main, __doc__)
