"""Which training images made the network do this? The main MNIST job in one command.

Trains the MLP if its model is missing, tests it and chooses the test images (mnist.test_ids: the
report's loss-rank rule, or a list), then runs the methods of mnist.question.methods on them:
Method 1 (the report's), Method 2 with method2.solver and with the best measured solver beside it
(mnist.question.best_solver), and Method 3 when its check and replay fit mnist.question.method3_budget_s
(the replay is skipped when the check says no: mnist.question.replay_when_not_smooth).
Writes one figure per test image (its top helpful and harmful training images by each method) and
prints how far to trust each list: the measured LDS for this recipe, and where it comes from.
Also draws the report's Figures 4.1-4.4.

    python3 mnist_test/run_pipeline.py -set 'mnist.test_ids=[42]'
    python3 mnist_test/run_pipeline.py -profile report

Default profile: quick (5 epochs) unless -profile names another.
Writes: everything Train/Test/m1_Test/m2_Test/m3_Test and the vis scripts write, and
        fig/question_{tag}_{run}_t{test id}.png, test/question_{tag}_{run}_{selection}.json (the trust table;
        {run}: a short hash of every setting that changes the answer, so other settings never overwrite it).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils_option as opt  # noqa: E402
from mnist_test import (Test, Train, common, m1_Test, m2_Test, m3_Test, question, vis_m1,  # noqa: E402
                        vis_m1_grad, vis_m2)


def main(settings: opt.Settings) -> dict:
    start = time.perf_counter()
    cfg = settings.mnist
    wanted = cfg.question.methods
    caveats: list[str] = []  # every caveat the console prints goes into the figure too
    opt.run_stage(Train, [common.model_file(settings, cfg.method1.mode), common.grad_norm_file(settings)],
                  settings, print)
    train, test = question.load_sets(settings)  # on the CPU, once: Method 3's check and the figures
    with opt.quiet_console():  # each stage's full log is in its log file; the console tells the story
        ids = Test.main(settings)["test_ids"]
        print(f"test images: {ids if len(ids) <= 10 else f'{ids[:10]}... ({len(ids)})'}", flush=True)
        methods: list[tuple[str, str, str, dict]] = []  # (title, result file, ldsTest row, trust key)
        if "method1" in wanted:
            methods.append(("Method 1 (the report's)", m1_Test.main(settings)["act_grad_file"],
                            question.lds_row("method1", settings), question.trust_key(settings.mnist, "method1")))
        if "method2" in wanted:
            for variant in (settings, question.best_solver_settings(settings)):
                if variant is not None:
                    solver = variant.mnist.method2.solver
                    methods.append((f"Method 2 ({solver})", m2_Test.main(variant)["if_file"],
                                    question.lds_row("method2", variant), question.trust_key(variant.mnist, "method2")))
        if "method3" in wanted:
            tests = min(cfg.method3.test_sample_num, len(ids))
            check, replay = question.method3_seconds(settings, tests)
            budget = cfg.question.method3_budget_s
            if check + replay <= budget:
                smooth = (question.method3_check(settings, ids[:tests], train, test)
                          if cfg.method3.smoothness_directions else None)
                if smooth:
                    caveats.append(f"Method 3's check, {opt.Recipe.of(cfg).question(cfg.train_subset or 60000)}: "
                                   f"S_hat {smooth['s_hat']:.3f} [{smooth['s_hat_interval'][0]:.3f}, "
                                   f"{smooth['s_hat_interval'][1]:.3f}], {smooth['decision']} (docs/results.md)")
                if smooth and smooth["decision"] == "no" and not cfg.question.replay_when_not_smooth:
                    caveats.append("Method 3's replay skipped: the check says its removal predictions cannot be "
                                   "vouched for (set mnist.question.replay_when_not_smooth = true to replay anyway)")
                    print(caveats[-1])
                else:
                    methods.append(("Method 3 (exact, this run)", m3_Test.main(settings, check=smooth)["if_file"],
                                    "m3_replay", question.trust_key(settings.mnist, "method3")))
            else:
                caveats.append(f"Method 3 skipped: its check and replay would take about {(check + replay) / 60:.0f} "
                               f"min ({check:.0f} s + {replay:.0f} s) for {tests} test image(s), above "
                               f"mnist.question.method3_budget_s = {budget:g} s (raise it, or run mnist_test/m3_Test.py)")
                print(caveats[-1])
        figures = {name: module.main(settings)["figure" if name != "vis_m2" else "figures"]
                   for name, module in (("vis_m1_grad", vis_m1_grad), ("vis_m1", vis_m1), ("vis_m2", vis_m2))}
    for title, path, _, _ in methods:
        print(f"{title}: {path}")
    trust = question.measured_lds(settings, [(title, row, key) for title, _, row, key in methods])
    records = [(title, opt.read_json(path, "mnist_test/run_pipeline.py", shape=("meta",)), row)
               for title, path, row, _ in methods]
    for title, record, _ in records:  # an unsettled or unconverged solver: said in the console and the figure
        warning = record["meta"].get("solver_info", {}).get("warning")
        if warning:
            caveats.append(f"{title}: {warning}")
    logger = opt.make_logger(settings, "mnist_question")
    answers = []
    shown = [i for i in ids if all(any(k != "meta" and v["test_id_num"] == i for k, v in r.items())
                                   for _, r, _ in records)]
    run_part = question.run_part(settings, methods)  # every setting that changes what the answer holds
    for test_id in shown:
        fig = question.question_figure(settings, test_id, records, trust, cfg.vis_num, test, train, caveats)
        answers.append(opt.save_figure(fig, opt.output_path(
            settings, "fig", f"question_{common.run_tag(settings)}_{run_part}_t{test_id}.png"), logger))
    lines = question.trust_lines([(title, row, key) for title, _, row, key in methods], trust)
    opt.write_json(opt.output_path(settings, "test", f"question_{common.run_tag(settings)}_{run_part}_"
                                   f"{common.test_selection_part(settings)}.json"),
                   {"test_ids": shown, "question": trust["question"],
                    "methods": [{"title": t, "file": f, "lds_row": r, "trust_key": key,
                                 "lds_what_training_does": trust[t]["algorithm"],
                                 "lds_this_network": {f"{drop:g}": v for drop, v in trust[t]["single_model"].items()},
                                 "trust_source": trust[t]["source"], "differs": trust[t]["differs"]}
                                for t, f, r, key in methods],
                    "caveats": caveats, "figures": answers}, logger)
    print("\n" + "\n".join(lines))
    if caveats:
        print("\n".join(f"caveat: {line}" for line in caveats))
    print(f"\nanswer figures ({len(answers)}): {answers[0] if answers else '-'}" + (" ..." if len(answers) > 1 else ""))
    print(f"MNIST pipeline (profile {settings.profile}) finished in {time.perf_counter() - start:.0f} s; "
          f"report figures: {figures['vis_m1_grad']}, ...")
    return {"seconds": time.perf_counter() - start, "methods": [m[:3] for m in methods], "keyed_methods": methods,
            "trust": trust,
            "figures": answers, "report_figures": figures, "test_ids": shown, "caveats": caveats}


if __name__ == "__main__":
    if not any(a == "-profile" for a in sys.argv[1:]):
        sys.argv += ["-profile", "quick"]
    opt.run_script(main, __doc__)
