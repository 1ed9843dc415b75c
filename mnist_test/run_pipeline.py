"""The main MNIST job in one command: data -> Train -> Test -> m1_Test -> m2_Test -> figures.

Runs the same scripts you would run one by one, in-process, with one settings object.
Default profile: quick (real MNIST, all 60,000 images, 5 epochs instead of 20, Method 2 with the
report's LiSSA); -profile report runs the report's settings. Prints where every result and figure is at the end.

Usage: python mnist_test/run_pipeline.py [-opt Implementation.json] [-profile quick|report]
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils_option as opt  # noqa: E402
from mnist_test import Test, Train, m1_Test, m2_Test, vis_m1, vis_m1_grad, vis_m2  # noqa: E402

STAGES = [("Train (model + gradient norms)", Train), ("Test (accuracy, test-image choice)", Test),
          ("m1_Test (Method 1 scores)", m1_Test), ("m2_Test (Method 2 influence)", m2_Test),
          ("vis_m1_grad (Fig 4.1)", vis_m1_grad), ("vis_m1 (Fig 4.2)", vis_m1),
          ("vis_m2 (Figs 4.3, 4.4)", vis_m2)]


def main(settings: dict) -> dict:
    outputs = {}
    start = time.perf_counter()
    for number, (title, module) in enumerate(STAGES, 1):
        print(f"\n=== stage {number}/{len(STAGES)}: {title} ===", flush=True)
        stage_start = time.perf_counter()
        outputs[title] = module.main(settings)
        print(f"=== stage {number} done in {time.perf_counter() - stage_start:.1f} s ===", flush=True)
    total = time.perf_counter() - start
    print(f"\nMNIST pipeline (profile {settings['profile']}) finished in {total:.0f} s. Results:")
    for title, result in outputs.items():
        for key, value in result.items():
            paths = value if isinstance(value, dict) else {"": value}
            for sub, path in paths.items():
                if isinstance(path, str) and os.path.isfile(path):
                    label = f"{key}.{sub}" if sub else key
                    print(f"  {title.split(' ')[0]:<12} {label:<16} {path}")
    return {"seconds": total, "outputs": outputs}


if __name__ == "__main__":
    if not any(a == "-profile" for a in sys.argv[1:]):
        sys.argv += ["-profile", "quick"]
    opt.run_script(main, __doc__)
