"""One training recipe of the MNIST MLP: everything that defines a training run, in one value.

Train.py's trainer, the grouped trainer, Method 3's replay, the metasmoothness check, ldsTest, the
question and the benches all read a :class:`Recipe`: the optimiser, the schedule, the batch, the
epochs, the activation, the logit scale, the seed, the training subset and the attribution window
(the last steps in which the data weights act: what Method 3 attributes and the single-model removals
change). ``mnist.recipe``'s presets are :data:`PRESETS`, Recipe values.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping

from influence.replay import window_start as first_window_step
from options.base import SettingsError

# the original's optimiser values: a file name names the ones a recipe changes
ORIGINAL_OPTIMISER = {"learning_rate": 0.003, "momentum": 0.9, "weight_decay": 0.001}
_SHORT = {"learning_rate": "lr", "momentum": "mom", "weight_decay": "wd"}


@dataclass(frozen=True)
class Recipe:
    """A training run of the MLP on the first ``train_subset`` MNIST images (0 = all 60,000): SGD with
    momentum and weight decay at ``learning_rate`` (constant, or decaying to 0: ``lr_schedule``),
    ``batch_size``, ``epoch`` epochs in the data order of ``seed``, the network's ``activation`` and
    ``logit_scale``, and the attribution ``window`` (the last ``window`` ``window_unit`` of the steps;
    0 = the whole run). Made from the ``mnist`` block (or a mapping with these keys: a study's) by :meth:`of`."""
    learning_rate: float
    momentum: float
    weight_decay: float
    batch_size: int
    epoch: int
    activation: str = "relu"
    lr_schedule: str = "constant"
    logit_scale: float = 1.0
    seed: int = 0
    train_subset: int = 0
    window: float = 0
    window_unit: str = "epochs"

    @classmethod
    def of(cls, source: "Recipe | Any | Mapping[str, Any]") -> "Recipe":
        """The recipe of a typed ``mnist`` block, or of a mapping with these keys (keys it leaves out take
        the defaults above; other keys are not the recipe's)."""
        if isinstance(source, Recipe):
            return source
        if isinstance(source, Mapping):
            return cls(**{f.name: source[f.name] for f in fields(cls) if f.name in source})
        return cls(**{f.name: getattr(source, f.name) for f in fields(cls)})

    def replace(self, **changes) -> "Recipe":
        """This recipe with some fields changed (another seed, epochs, no window)."""
        return dataclasses.replace(self, **changes)

    def steps_per_epoch(self, n: int) -> int:
        return -(-n // self.batch_size)

    def window_start(self, n: int) -> int:
        """The first step of the attribution window in the run on n images (0 = the whole run)."""
        try:
            return first_window_step(self.epoch * self.steps_per_epoch(n), self.steps_per_epoch(n),
                                     self.window, self.window_unit)
        except ValueError as error:
            raise SettingsError(f"mnist.window: {error}") from None

    def question(self, n: int) -> str:
        """The question Method 3 and the single-model LDS answer for this run on n images, in words:
        removing images from the whole run, or from its attribution window."""
        steps = self.epoch * self.steps_per_epoch(n)
        start = self.window_start(n)
        if not start:
            return f"removing images from the whole run (steps 1-{steps:,})"
        span = (f"the last {100 * self.window:g}% of the steps" if self.window_unit == "fraction" else
                "the last epoch" if (self.window, self.window_unit) == (1, "epochs")
                else f"the last {self.window:g} {self.window_unit}")
        return f"removing images from {span} (steps {start + 1:,}-{steps:,})"

    def tag(self, threads: int = 1) -> str:
        """The trained model's part of a file name: e20b8s0 (+ n1000 for a subset, + softplus, + the
        schedule, + ls for a logit scale, + t2 for a torch thread count other than 1, + the optimiser
        values off the original's). Another thread count sums in another order, so other weights; the
        window is not in it: it changes what is attributed, not the trained model."""
        tag = f"e{self.epoch}b{self.batch_size}s{self.seed}"
        if self.train_subset:
            tag += f"n{self.train_subset}"
        if self.activation != "relu":
            tag += self.activation
        if self.lr_schedule != "constant":
            tag += self.lr_schedule
        if self.logit_scale != 1.0:
            tag += f"ls{self.logit_scale:g}"
        if threads != 1:
            tag += f"t{threads}"
        for key, default in ORIGINAL_OPTIMISER.items():
            if getattr(self, key) != default:
                tag += f"{_SHORT[key]}{getattr(self, key):g}"
        return tag

    def window_words(self) -> str:
        return f"{self.window:g} {self.window_unit}" if self.window else "whole run"

    def key(self) -> dict:
        """What the trust table matches a measured LDS on: the optimiser, schedule, batch, epochs,
        network, seed, the number of training images and the window."""
        optimiser = {f.name: getattr(self, f.name) for f in fields(self)
                     if f.name not in ("seed", "train_subset", "window", "window_unit")}
        return {**optimiser, "seed": self.seed, "train_size": self.train_subset or 60000,
                "window": self.window_words()}

    def study_key(self, single_model: bool) -> dict:
        """What an LDS study's models depend on besides their seeds and subsets (hashed into its folder
        name; the values at their defaults left out, so that earlier studies keep their names)."""
        key: dict[str, Any] = {"learning_rate": self.learning_rate, "momentum": self.momentum,
                               "weight_decay": self.weight_decay, "batch_size": self.batch_size, "epoch": self.epoch}
        if self.activation != "relu":
            key["activation"] = self.activation
        start = self.window_start(self.train_subset or 60000) if single_model else 0
        if start:  # the window acts on data weights: the single-model removals
            key["window_start"] = start
        if self.lr_schedule != "constant":
            key["lr_schedule"] = self.lr_schedule
        if self.logit_scale != 1.0:
            key["logit_scale"] = self.logit_scale
        return key


# mnist.recipe: the presets, Recipe values (their seed and subset are the user's own). A preset replaces
# the defaults of its fields; a value a settings file, profile, -set or driver writes is kept, and said
# (options.loading). STUDY_PRESETS: the LDS study's epochs that go with each. The numbers: docs/results.md.
PRESETS: dict[str, Recipe] = {
    "report": Recipe(learning_rate=0.003, momentum=0.9, weight_decay=0.001, batch_size=8, epoch=20),
    "attributable": Recipe(learning_rate=0.05, momentum=0.9, weight_decay=0.0005, batch_size=128, epoch=20,
                           activation="softplus", lr_schedule="linear", window=1),
}
STUDY_PRESETS: dict[str, dict[str, Any]] = {"report": {"mnist.lds.epoch": 40}, "attributable": {"mnist.lds.epoch": 20}}
_NOT_PRESET = ("seed", "train_subset")


# ffdnet.recipe's presets, as dotted settings keys: "report" is the report's training (no final window);
# "attributable" ends training with a final window Method 3 answers exactly. Its values were chosen by the
# measured scan bench/ffdnet_attributable.py (docs/results.md, "An attributable denoiser").
FFDNET_PRESETS: dict[str, dict[str, Any]] = {
    "report": {"ffdnet.activation": "relu", "ffdnet.window.epochs": 0.0},
    "attributable": {"ffdnet.activation": "softplus", "ffdnet.window.epochs": 1.0,
                     "ffdnet.window.optimizer": "adam", "ffdnet.window.learning_rate": 1e-05,
                     "ffdnet.window.eps_root": 1e-06, "ffdnet.window.lr_schedule": "linear",
                     "ffdnet.window.batch_size": 32},
}


def preset_values(name: str, network: str = "mnist") -> dict[str, Any]:
    """A preset of ``mnist.recipe`` (or, with ``network`` "ffdnet", of ``ffdnet.recipe``) as dotted
    settings keys ({"mnist.epoch": 20, ...}), in the block's order."""
    if network == "ffdnet":
        return dict(FFDNET_PRESETS[name])
    recipe = PRESETS[name]
    return {**{f"mnist.{f.name}": getattr(recipe, f.name) for f in fields(Recipe) if f.name not in _NOT_PRESET},
            **STUDY_PRESETS[name]}


def recipe_table() -> str:
    """The presets side by side, as docs/methods.md shows them (a test keeps the two equal)."""
    names = list(PRESETS)
    rows = {name: preset_values(name) for name in names}
    lines = ["| setting | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in rows[names[0]]:
        lines.append(f"| `{key}` | " + " | ".join(f"{rows[n][key]}" for n in names) + " |")
    return "\n".join(lines)
