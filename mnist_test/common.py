"""MNIST-side plumbing shared by the scripts: file names, model and data loading, test-image choice.

File names carry every setting that changes their content, so runs with different settings never
overwrite each other: ``e{epoch}b{batch}s{seed}`` plus ``n{train_subset}`` when a subset is used and
the optimiser values when they differ from the original recipe.
"""
from __future__ import annotations

import json
import logging
import os

import torch

import utils_if
import utils_option as opt
from mnist_test.datasets import MnistData, load_mnist
from mnist_test.model import mnist_model
from options.recipe import Recipe



def stability_settings(settings: opt.Settings, seed: int, test_ids=None) -> dict:
    """The settings of model staTest{index}: its seed and its mode name (and the shared test ids)."""
    index = settings.mnist.stability.seeds.index(seed)
    mode = f"staTest{index}"
    mnist = {"seed": seed, "method1": {"mode": mode}, "method2": {"mode": mode}, "method3": {"mode": mode}}
    if test_ids is not None:
        mnist["test_ids"] = test_ids
    return opt.with_values(settings, {"mnist": mnist})


def run_tag(settings: opt.Settings) -> str:
    """e20b8s0 (+ n1000 for a training subset, + softplus, + t2 for threads other than 1 (t0 = all
    cores), + optimiser values off the original recipe)."""
    return Recipe.of(settings.mnist).tag(settings.threads)


def model_file(settings: opt.Settings, mode: str) -> str:
    return opt.output_path(settings, "model_zoo", f"mnist_{run_tag(settings)}_{mode}.pth")


def grad_norm_file(settings: opt.Settings, mode: str | None = None) -> str:
    m1 = settings.mnist.method1
    mode = mode or m1.mode
    suffix = "" if m1.skip_first_epoch else "_allep"
    return opt.output_path(settings, "grad_norm", mode,
                           f"mnist_{run_tag(settings)}_{m1.grad_mode}{suffix}.json")


def test_file(settings: opt.Settings, mode: str) -> str:
    """Test.py's result: named for the model and the test selection it was made for."""
    return opt.output_path(settings, "test", f"mnist_{run_tag(settings)}_{mode}_{test_selection_part(settings)}_test.json")


def test_selection_part(settings: opt.Settings, count: int | None = None) -> str:
    """Which test images a result holds: loss-rank rule (num x step), "all", or a short hash of an
    explicit list; ``count`` (method2.test_sample_num) when only the first ones are used."""
    import hashlib
    cfg = settings.mnist
    ids = cfg.test_ids
    if ids == "loss_rank":
        part = f"lr{cfg.test_num}x{cfg.test_rank_step}"
    elif ids == "all":
        part = "all"
    else:
        part = "ids" + hashlib.sha1(json.dumps(list(ids)).encode()).hexdigest()[:6]
    return part + (f"k{count}" if count is not None and ids != "all" else "")


def m1_file(settings: opt.Settings, mode: str | None = None) -> str:
    m1 = settings.mnist.method1
    mode = mode or m1.mode
    stem = os.path.basename(grad_norm_file(settings, mode))[:-len(".json")]
    layers = "-".join(m1.layers)
    return opt.output_path(settings, "act_grad", mode,
                           f"{stem}_{layers}_{test_selection_part(settings)}_top{m1.top_k}_scores.json")


def m2_file(settings: opt.Settings, mode: str | None = None) -> str:
    """Influence file: the solver part (utils_option.solver_file_part), the run tag and mode."""
    cfg = settings.mnist
    m2 = cfg.method2
    mode = mode or m2.mode
    solver = utils_if.solver_for(m2.solver)
    extra = f"_ce{cfg.checkpoint_every}" if solver.needs_checkpoints else ""  # TracIn sums over the checkpoints
    tests = test_selection_part(settings, m2.test_sample_num)
    name = f"if_{opt.solver_file_part(m2, solver)}{extra}_{run_tag(settings)}_{mode}_{tests}_top{m2.top_k}.json"
    return opt.output_path(settings, m2.if_dir, name)


def m3_file(settings: opt.Settings, mode: str | None = None) -> str:
    """Method-3 file: target, checkpoint interval-free (the result does not depend on it), run tag, mode."""
    m3 = settings.mnist.method3
    mode = mode or m3.mode
    tests = test_selection_part(settings, m3.test_sample_num)
    name = f"m3_replay_{m3.target}_{run_tag(settings)}{window_part(Recipe.of(settings.mnist))}_{mode}_{tests}_top{m3.top_k}.json"
    return opt.output_path(settings, m3.if_dir, name)


def window_part(recipe: Recipe) -> str:
    """"" for the whole run, else the attribution window: _w1epochs, _w500steps, _w0.1fraction."""
    return f"_w{recipe.window:g}{recipe.window_unit}" if recipe.window else ""


def attribution_file(settings: opt.Settings, method: str) -> tuple[str, str, str]:
    """(file, the script that makes it, its settings block) of a Method-2 or Method-3 result."""
    if method == "method3":
        return m3_file(settings), "mnist_test/m3_Test.py", "method3"
    return m2_file(settings), "mnist_test/m2_Test.py", "method2"


def checkpoint_file(settings: opt.Settings, mode: str, epoch: int) -> str:
    """Train.py's checkpoint after ``epoch`` epochs (mnist.checkpoint_every > 0), for TracIn."""
    return opt.output_path(settings, "model_zoo", "checkpoints", f"mnist_{run_tag(settings)}_{mode}",
                           f"ep{epoch}.pth")


def checkpoint_files(settings: opt.Settings, mode: str) -> list[str]:
    """The checkpoints Train.py wrote with the current settings, in epoch order (error if none)."""
    every = settings.mnist.checkpoint_every
    if not every:
        raise opt.SettingsError(f"mnist.method2.solver = {settings.mnist.method2.solver!r} needs "
                                f"checkpoints: set mnist.checkpoint_every (e.g. 1) and run mnist_test/Train.py again")
    epochs = range(every, settings.mnist.epoch + 1, every)
    return [opt.require_file(checkpoint_file(settings, mode, e), "mnist_test/Train.py (mnist.checkpoint_every > 0)")
            for e in epochs]


def factor_file(settings: opt.Settings, mode: str | None = None) -> str:
    """K-FAC/EK-FAC factors of a model (they depend on the model, data, Fisher kind and seed only,
    not on the damping or the test images): written once, reused by later runs."""
    m2 = settings.mnist.method2
    mode = mode or m2.mode
    params = "_p" + "+".join(m2.params) if m2.params else ""
    solver = utils_if.solver_for(m2.solver).factor_name  # K-FAC factored reads K-FAC's factors
    fitted = f"_fp{m2.fit_points}" if m2.fit_points else ""  # factors fitted on a subsample
    name = f"mnist_{run_tag(settings)}_{mode}_{solver}_{m2.fisher}{params}{fitted}_l2{m2.l2_reg:g}.pt"
    return opt.output_path(settings, m2.if_dir, "factors", name)


def read_result(path: str, made_by: str, settings: opt.Settings, block: str) -> dict:
    """Read an m1/m2 result and check that it was made with the current settings of ``block``
    ("method1" or "method2") and the current training recipe: a stale or foreign file is refused
    in one line, never silently used."""
    record = opt.read_json(path, made_by, shape=("meta.settings",))
    made = record["meta"]["settings"]
    now = opt.as_dict(settings.mnist)  # compared with the block as the file stored it (a dict, as written)
    ignored = {"mode", "chunk_size", "if_dir"}  # names and memory bounds, not content
    for key in ("seed", "epoch", "batch_size", "learning_rate", "momentum", "weight_decay", "train_subset",
                "activation"):
        made_value = made.get(key, "relu" if key == "activation" else now[key])  # files before the option: ReLU
        if made_value != now[key]:
            raise opt.SettingsError(f"{path} was made with mnist.{key} = {made_value!r}, not {now[key]!r}: "
                                    f"run {made_by} again with the current settings")
    for key, value in now[block].items():
        if key not in ignored and key in made.get(block, {}) and made[block][key] != value:
            raise opt.SettingsError(f"{path} was made with mnist.{block}.{key} = {made[block][key]!r}, not "
                                    f"{value!r}: run {made_by} again with the current settings")
    if block != "method1":  # an influence file's shape: the figures read its solver's record
        opt.require_shape(record, path, made_by, ("meta.solver_info",))
    return record


def load_grad_norms(settings: opt.Settings, mode: str | None = None,
                    device: torch.device = torch.device("cpu")) -> tuple[dict, dict]:
    """The gradient-norm file of Train.py: ({layer: (n_train, n_out) float64 tensor}, meta)."""
    record = opt.read_json(grad_norm_file(settings, mode), "mnist_test/Train.py")
    arrays = {name: torch.tensor(rows, dtype=torch.float64, device=device)
              for name, rows in record["arrays"].items()}
    return arrays, record["meta"]


def load_train_data(settings: opt.Settings, device: torch.device, log=print) -> MnistData:
    cfg = settings.mnist
    data = load_mnist(opt.data_path(cfg.data_dir), train=True, log=log)
    return data.subset(cfg.train_subset).to(device)


def load_test_data(settings: opt.Settings, device: torch.device, log=print) -> MnistData:
    return load_mnist(opt.data_path(settings.mnist.data_dir), train=False, log=log).to(device)


def load_data(settings: opt.Settings, device: torch.device, log=print) -> tuple[MnistData, MnistData]:
    """(training images (mnist.train_subset), test images) on ``device``."""
    return load_train_data(settings, device, log), load_test_data(settings, device, log)


def load_model(settings: opt.Settings, mode: str, device: torch.device,
               logger: logging.Logger | None = None) -> tuple[torch.nn.Module, str]:
    """The trained MLP of ``mode`` under the current settings, in eval mode."""
    path = model_file(settings, mode)
    cfg = settings.mnist
    model = mnist_model(cfg.activation, cfg.logit_scale).to(device)
    state = opt.load_torch(path, "mnist_test/Train.py", map_location=device)
    try:
        model.load_state_dict(state["model"] if isinstance(state, dict) and "model" in state else state)
    except (RuntimeError, TypeError, KeyError) as err:
        raise opt.UnreadableFileError(f"{path} holds no weights of this MLP ({type(err).__name__}; another "
                                      f"model or activation?): delete it and run mnist_test/Train.py again") from None
    model.eval()
    if logger is not None:
        logger.info(f"model: {path}")
    return model, path


def selected_test_ids(settings: opt.Settings, mode: str | None = None) -> list[int]:
    """The chosen test images: the settings' explicit list, or those Test.py chose by loss rank."""
    cfg = settings.mnist
    if isinstance(cfg.test_ids, list):
        return list(cfg.test_ids)
    if cfg.test_ids == "all":
        return list(range(10000))
    path = test_file(settings, mode or cfg.method1.mode)
    record = opt.read_json(path, "mnist_test/Test.py")
    made_for, wanted = record.get("selection", "an unnamed selection"), test_selection_part(settings)
    if made_for != wanted:
        raise opt.SettingsError(f"{path} was made for test selection {made_for}, these settings select {wanted}: "
                                f"run mnist_test/Test.py with the same settings to make the right file")
    return record["test_ids"]


def replay_record(model_path: str, device: torch.device) -> str:
    """How the model was trained (Train.py's replay record), for the message of a failed replay."""
    state = opt.load_torch(model_path, "mnist_test/Train.py", map_location=device)
    made = state.get("replay") if isinstance(state, dict) else None
    if not made:
        return "the file has no replay record: it predates Method 3"
    return (f"it was trained with {made['threads']} thread(s) on {made['device']}, torch {made['torch']}; "
            f"here: {torch.get_num_threads()} thread(s) on {device}, torch {torch.__version__}")


def attribution_record(settings: opt.Settings, model: torch.nn.Module, model_path: str, x_test: torch.Tensor,
                       y_test: torch.Tensor, ids: list[int], influence: torch.Tensor, top_k: int, info: dict,
                       sign_convention: str, logger: logging.Logger) -> dict:
    """The JSON of an attribution (m2_Test, m3_Test): "meta", then per test position its id, label,
    prediction, loss, the influence row and the top-k helpful and harmful training images."""
    with torch.no_grad():
        out = model(x_test)
    losses = -out.gather(1, y_test[:, None]).squeeze(1)
    result = {"meta": {"settings": opt.as_dict(settings.mnist), "profile": settings.profile, "model_file": model_path,
                       "n_train": influence.shape[1], "sign_convention": sign_convention, "solver_info": info,
                       "threads": torch.get_num_threads(), "test_ids": ids}}
    influence = influence.cpu()
    for position, test_id in enumerate(ids):
        row = influence[position]
        entry = {"test_id_num": test_id, "label": int(y_test[position]), "prediction": int(out[position].argmax()),
                 "loss": float(losses[position]), "influence": row.tolist(),
                 "helpful": utils_if.top_indices(row, top_k, largest=True),
                 "harmful": utils_if.top_indices(row, top_k, largest=False)}
        result[str(position)] = entry
        if position < 10:  # the first few on the console; all of them are in the file
            logger.info(f"test {test_id} (label {entry['label']}): helpful {entry['helpful'][:5]}, "
                        f"harmful {entry['harmful'][:5]}")
    return result


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: MnistData, chunk: int = 10000):
    """Per-image NLL loss and prediction for a whole dataset, in a few big forward passes."""
    model.eval()
    losses, preds = [], []
    for s in range(0, len(data), chunk):
        out = model(data.images[s:s + chunk])
        losses.append(-out.gather(1, data.labels[s:s + chunk, None]).squeeze(1))
        preds.append(out.argmax(1))
    return torch.cat(losses), torch.cat(preds)
