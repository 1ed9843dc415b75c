"""Which training images made the network do this? The main MNIST job in one command.

Trains the MLP if its model is missing, tests it and chooses the test images (mnist.test_ids: the
report's loss-rank rule, or a list), then runs the methods of mnist.question.methods on them:
Method 1 (the report's), Method 2 with method2.solver and with the best measured solver beside it
(mnist.question.best_solver), and Method 3 when its replay fits mnist.question.method3_budget_s.
Writes one figure per test image (its top helpful and harmful training images by each method) and
prints how far to trust each list: the measured LDS for this recipe, and where it comes from.
Also draws the report's Figures 4.1-4.4.

    python3 mnist_test/run_pipeline.py -set 'mnist.test_ids=[42]'
    python3 mnist_test/run_pipeline.py -profile report

Default profile: quick (5 epochs) unless -profile names another.
Writes: everything Train/Test/m1_Test/m2_Test/m3_Test and the vis scripts write, and
        fig/question_{tag}_t{test id}.png, test/question_{tag}_{selection}.json (the trust table).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils_option as opt  # noqa: E402
from mnist_test import Test, Train, common, m1_Test, m2_Test, m3_Test, question, vis_m1, vis_m1_grad, vis_m2  # noqa: E402


def main(settings: dict) -> dict:
    start = time.perf_counter()
    cfg = common.mnist_cfg(settings)
    wanted = cfg.question.methods
    opt.run_stage(Train, [common.model_file(settings, cfg.method1.mode), common.grad_norm_file(settings)],
                  settings, print)
    with opt.quiet_console():  # each stage's full log is in its log file; the console tells the story
        ids = Test.main(settings)["test_ids"]
        print(f"test images: {ids if len(ids) <= 10 else f'{ids[:10]}... ({len(ids)})'}", flush=True)
        methods: list[tuple[str, str, str]] = []  # (title, result file, ldsTest row)
        if "method1" in wanted:
            methods.append(("Method 1 (the report's)", m1_Test.main(settings)["act_grad_file"],
                            question.lds_row("method1", settings)))
        if "method2" in wanted:
            for variant in (settings, question.best_solver_settings(settings)):
                if variant is not None:
                    solver = common.mnist_cfg(variant).method2.solver
                    methods.append((f"Method 2 ({solver})", m2_Test.main(variant)["if_file"],
                                    question.lds_row("method2", variant)))
        if "method3" in wanted:
            tests = min(cfg.method3.test_sample_num, len(ids))
            estimate = question.method3_seconds(settings, tests)
            if estimate <= cfg.question.method3_budget_s:
                methods.append(("Method 3 (exact, this run)", m3_Test.main(settings)["if_file"], "m3_replay"))
            else:
                print(f"Method 3 skipped: its replay would take about {estimate / 60:.0f} min for {tests} test "
                      f"image(s), above mnist.question.method3_budget_s = {cfg.question.method3_budget_s:g} s "
                      f"(raise it, or run mnist_test/m3_Test.py)")
        figures = {name: module.main(settings)["figure" if name != "vis_m2" else "figures"]
                   for name, module in (("vis_m1_grad", vis_m1_grad), ("vis_m1", vis_m1), ("vis_m2", vis_m2))}
    for title, path, _ in methods:
        print(f"{title}: {path}")
    trust = question.measured_lds(settings)
    records = [(title, opt.read_json(path, "mnist_test/run_pipeline.py"), row) for title, path, row in methods]
    train, test = question.load_sets(settings)
    logger = opt.make_logger(settings, "mnist_question")
    answers = []
    shown = [i for i in ids if all(any(k != "meta" and v["test_id_num"] == i for k, v in r.items())
                                   for _, r, _ in records)]
    for test_id in shown:
        fig = question.question_figure(settings, test_id, records, trust, cfg.vis_num, test, train)
        answers.append(opt.save_figure(fig, opt.output_path(
            settings, "fig", f"question_{common.run_tag(settings)}_t{test_id}.png"), logger))
    lines = question.trust_lines(methods, trust)
    opt.write_json(opt.output_path(settings, "test", f"question_{common.run_tag(settings)}_"
                                   f"{common.test_selection_part(settings)}.json"),
                   {"test_ids": shown, "methods": [{"title": t, "file": f, "lds_row": r,
                                                    "lds_algorithm": trust["algorithm"].get(r),
                                                    "lds_single_model": trust["single_model"].get(r)}
                                                   for t, f, r in methods],
                    "trust_source": trust["source"], "figures": answers}, logger)
    print("\n" + "\n".join(lines))
    print(f"\nanswer figures ({len(answers)}): {answers[0] if answers else '-'}" + (" ..." if len(answers) > 1 else ""))
    print(f"MNIST pipeline (profile {settings['profile']}) finished in {time.perf_counter() - start:.0f} s; "
          f"report figures: {figures['vis_m1_grad']}, ...")
    return {"seconds": time.perf_counter() - start, "methods": methods, "trust": trust, "figures": answers,
            "report_figures": figures, "test_ids": shown}


if __name__ == "__main__":
    if not any(a == "-profile" for a in sys.argv[1:]):
        sys.argv += ["-profile", "quick"]
    opt.run_script(main, __doc__)
