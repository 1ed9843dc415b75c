"""The original MNIST classifier: MLP 784-128-64-10, ReLU, LogSoftmax (109,386 parameters).

Module names match the original checkpoints: ``main.0`` = fc1, ``main.2`` = fc2, ``main.4`` = fc3.
``logit_scale`` (mnist.logit_scale) multiplies the logits by a constant before the log-softmax.
``activation="softplus"`` (mnist.activation) swaps both ReLUs for softplus: the same parameters, but a
training run whose gradient is continuous in the weights, so that the trained model is a smooth
function of the data weights (README, "Method 3: what makes the prediction exact").
"""
from __future__ import annotations

import torch
from torch import nn

LAYER_MODULES = {"fc1": "main.0", "fc2": "main.2", "fc3": "main.4"}  # Method-1 layer -> module
ACTIVATIONS = {"relu": (nn.ReLU, torch.relu), "softplus": (nn.Softplus, nn.functional.softplus)}


class LogitScale(nn.Module):
    """Logits times a constant c (mnist.logit_scale): no parameters, so the state dict is the report's."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale


class mnist_model(nn.Module):  # noqa: N801  (the original's class name)
    def __init__(self, activation: str = "relu", logit_scale: float = 1.0) -> None:
        super().__init__()
        module, self.act = ACTIVATIONS[activation]
        self.activation, self.logit_scale = activation, float(logit_scale)
        layers = [nn.Linear(784, 128), module(), nn.Linear(128, 64), module(), nn.Linear(64, 10)]
        if self.logit_scale != 1.0:  # main.5; the report's network has none (and its hand-written fast paths)
            layers.append(LogitScale(self.logit_scale))
        self.main = nn.Sequential(*layers)
        self.log_softmax = nn.LogSoftmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_softmax(self.main(x.reshape(x.shape[0], -1)))

    def forward_with_layers(self, x: torch.Tensor):
        """Log-probabilities plus, per Linear layer, its input and its output (pre-activation).

        Method 1 needs both: row j of a Linear layer's per-example weight gradient is
        delta_j * input, where delta is the loss gradient at the layer's output.
        """
        h = x.reshape(x.shape[0], -1)
        layers = {}
        for name, index in (("fc1", 0), ("fc2", 2), ("fc3", 4)):
            z = self.main[index](h)
            layers[name] = (h, z)
            h = self.act(z) if name != "fc3" else z
        return self.log_softmax(h * self.logit_scale if self.logit_scale != 1.0 else h), layers


    @torch.no_grad()
    def layer_activations(self, x: torch.Tensor, layers) -> dict:
        """Method-1 activations: post-activation outputs of fc1 / fc2, the logits for fc3."""
        _, io = self.forward_with_layers(x)
        return {name: (io[name][1] if name == "fc3" else self.act(io[name][1])) for name in layers}


if __name__ == "__main__":
    net = mnist_model()
    print(net)
    print("parameters:", sum(p.numel() for p in net.parameters()))
    print("output shape:", tuple(net(torch.zeros(2, 1, 28, 28)).shape))
