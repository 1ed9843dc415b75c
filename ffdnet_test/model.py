"""FFDNet (Zhang, Zuo & Zhang, 2018): pixel-unshuffle by 2, a noise-level map concatenated as the
last channel, a stack of 3x3 convolutions with ReLU, pixel-shuffle back. The output is the clean
image itself (no residual), as in KAIR and the original code.

Two layouts, both as one ``main`` Sequential so that checkpoint keys are ``main.{index}.*``:
- ``"bn"`` (the original author's): Conv-ReLU, then (layers - 2) blocks Conv-BN-ReLU, then Conv.
  Colour: 12 layers x 96 channels (854,028 parameters); gray: 15 x 64 (486,980).
- ``"plain"`` (the official models, KAIR): Conv-ReLU, (layers - 2) x Conv-ReLU, Conv, no BN.
  Colour: 852,108 parameters; gray: 484,676.

Method-1 "layer L" follows the original's numbering: the max(L, 1)-th convolution (so L = 0 and
L = 1 both mean the first conv; L = 11 is the 11th of the colour net's 12 convs).
"""
from __future__ import annotations

import torch
from torch import nn

ARCH = {True: (15, 64), False: (12, 96)}  # is_gray -> (conv layers, channels)
# the nonlinearity after each conv but the last: the report's ReLU, or softplus (the same layers and
# parameters, a network smooth in its weights: ffdnet.recipe "attributable")
ACTIVATIONS = {"relu": nn.ReLU, "softplus": nn.Softplus}


class FFDNet(nn.Module):
    def __init__(self, is_gray: bool, layout: str = "bn", num_layers: int | None = None,
                 channels: int | None = None, residual: bool = False, activation: str = "relu") -> None:
        super().__init__()
        if layout not in ("bn", "plain"):
            raise ValueError(f"FFDNet layout {layout!r}: expected 'bn' or 'plain'")
        if activation not in ACTIVATIONS:
            raise ValueError(f"FFDNet activation {activation!r}: one of {', '.join(ACTIVATIONS)}")
        default_layers, default_channels = ARCH[is_gray]
        self.is_gray, self.layout, self.residual, self.activation = is_gray, layout, residual, activation
        act = ACTIVATIONS[activation]
        self.num_layers = num_layers or default_layers
        self.channels = channels or default_channels
        image_channels = 1 if is_gray else 3
        self.image_channels = image_channels
        nc = self.channels
        modules: list[nn.Module] = [nn.Conv2d(4 * image_channels + 1, nc, 3, padding=1), act()]
        for _ in range(self.num_layers - 2):
            modules.append(nn.Conv2d(nc, nc, 3, padding=1))
            if layout == "bn":
                modules.append(nn.BatchNorm2d(nc))
            modules.append(act())
        modules.append(nn.Conv2d(nc, 4 * image_channels, 3, padding=1))
        self.main = nn.Sequential(*modules)
        self.unshuffle = nn.PixelUnshuffle(2)
        self.shuffle = nn.PixelShuffle(2)

    # ---- layer bookkeeping -----------------------------------------------------------------------
    def conv_indices(self) -> list[int]:
        """Indices in ``main`` of the convolutions, in order."""
        return [i for i, m in enumerate(self.main) if isinstance(m, nn.Conv2d)]

    def conv_index(self, layer: int) -> int:
        """``main`` index of Method-1 layer L (the max(L, 1)-th conv)."""
        convs = self.conv_indices()
        if not 0 <= layer <= len(convs):
            raise ValueError(f"layer {layer} does not exist: this FFDNet has {len(convs)} conv layers "
                             f"(valid: 0..{len(convs)})")
        return convs[max(layer, 1) - 1]

    def block_output_index(self, layer: int) -> int:
        """``main`` index of the activation that ends layer L's block (the conv itself for the last)."""
        index = self.conv_index(layer)
        for j in range(index, len(self.main)):
            if isinstance(self.main[j], ACTIVATIONS[self.activation]):
                return j
            if j > index and isinstance(self.main[j], nn.Conv2d):
                break
        return index

    # ---- forward -------------------------------------------------------------------------------
    def head(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Pad to even size (replicate), pixel-unshuffle, append the noise-level map."""
        h, w = x.shape[-2:]
        x = nn.functional.pad(x, (0, w % 2, 0, h % 2), mode="replicate") if (h % 2 or w % 2) else x
        x = self.unshuffle(x)
        noise_map = sigma.reshape(-1, 1, 1, 1).to(x.dtype).expand(x.shape[0], 1, *x.shape[-2:])
        return torch.cat([x, noise_map], dim=1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Denoise ``x`` (B, C, H, W) in [0, 1] at noise level ``sigma`` (B,) in [0, 1] units.

        The network outputs the clean image (FFDNet, KAIR, the original); with ``residual`` it
        outputs the noise and the result is x minus it (DnCNN's residual learning, which trains
        several times faster from scratch).
        """
        h, w = x.shape[-2:]
        out = self.shuffle(self.main(self.head(x, sigma)))[..., :h, :w]
        return x - out if self.residual else out


def feature_position(row: int, col: int) -> tuple[int, int]:
    """Full-image pixel (row, col) -> its position in the half-resolution feature maps.

    Pixel-unshuffle by 2 puts each 2x2 block of pixels into one feature-map position, so pixel
    (r, c) lives at (r // 2, c // 2).
    """
    return row // 2, col // 2


class PackedInput(nn.Module):
    """FFDNet with one input tensor: (B, C + 1, H, W), the last channel holding sigma (any pixel).

    The influence engine calls ``model(x)``; this carries each sample's noise level with it.
    Parameter names gain the prefix ``net.``.
    """

    def __init__(self, net: "FFDNet") -> None:
        super().__init__()
        self.net = net

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return self.net(packed[:, :-1], packed[:, -1, 0, 0])

    @staticmethod
    def pack(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, sigma.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[-2:])], dim=1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def orthogonal_init(model: nn.Module) -> None:
    """The original's init: orthogonal (gain 1) conv weights; biases and BN keep their defaults."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.orthogonal_(module.weight)
