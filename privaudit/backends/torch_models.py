"""PyTorch model zoo. ``resnet9-gn`` is the paper's network: torchvision's ResNet layout with one
BasicBlock per stage, GroupNorm in place of BatchNorm and Mish in place of ReLU.

Networks take ``spatial_dims`` (MONAI's convention), so one definition serves radiographs and CT volumes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from privaudit.backends._arch import gn_groups
from privaudit.errors import unknown_name


def _conv(dims: int):
    return {2: nn.Conv2d, 3: nn.Conv3d}[dims]


def _norm_factory(kind: str, dims: int) -> Callable[[int], nn.Module]:
    if kind == "group":
        return lambda c: nn.GroupNorm(gn_groups(c), c)
    if kind == "batch":
        return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    raise ValueError(kind)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (torchvision's BasicBlock)."""

    def __init__(self, c_in: int, c_out: int, stride: int, dims: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        conv = _conv(dims)
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm(c_out)
        self.conv2 = conv(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.norm2 = norm(c_out)
        self.act = nn.Mish()
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride=stride, bias=False), norm(c_out))

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + identity)


class ResNet9(nn.Module):
    """ResNet with one BasicBlock per stage: stem + 4 blocks x 2 convs + linear head = 10 weight layers,
    called ResNet-9 in arXiv:2302.01622 (counting the stem and the 8 block convolutions)."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = 5, width: int = 64, spatial_dims: int = 2,
                 norm: str = "group"):
        super().__init__()
        conv = _conv(spatial_dims)
        norm_f = _norm_factory(norm, spatial_dims)
        pool = {2: nn.MaxPool2d, 3: nn.MaxPool3d}[spatial_dims]
        avg = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[spatial_dims]
        self.stem = nn.Sequential(
            conv(in_channels, width, 7, stride=2, padding=3, bias=False), norm_f(width), nn.Mish(),
            pool(3, stride=2, padding=1),
        )
        widths = [width, 2 * width, 4 * width, 8 * width]
        blocks, c = [], width
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(c, w, 1 if i == 0 else 2, spatial_dims, norm_f))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = avg(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class CNN3D(nn.Module):
    """``cnn3d-gn``: a small CT classifier built from MONAI's ``Convolution`` blocks (conv, GroupNorm, ReLU).

    stem (3x3x3 stride-2 conv to ``width``) -> ``stages`` stride-2 blocks doubling the width (capped at
    4 x width), each followed by a stride-1 block -> global average *and* max pooling (a small focal lesion
    survives max pooling; diffuse context such as scanner noise survives the average) -> linear head.
    Activations are not in-place, since Opacus' per-sample hooks fail on in-place ops. Fully convolutional with
    global pooling, so any input edge of at least ``2 ** (stages + 1)`` works (16 and up with the defaults);
    ``width`` sets the channels. ``spatial_dims`` 3 for volumes (2 works too).
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 1, width: int = 16, spatial_dims: int = 3,
                 stages: int = 3, dropout: float = 0.0):
        super().__init__()
        from monai.networks.blocks import Convolution

        def block(c_in, c_out, stride):
            return Convolution(spatial_dims=spatial_dims, in_channels=c_in, out_channels=c_out, strides=stride,
                               kernel_size=3, act=("relu", {"inplace": False}),
                               norm=("group", {"num_groups": gn_groups(c_out)}), bias=False)

        conv = _conv(spatial_dims)
        # A plain conv first, so the checkpoint keys (stem.0.weight, fc.weight) tell width and input channels.
        self.stem = nn.Sequential(conv(in_channels, width, 3, stride=2, padding=1, bias=False),
                                  nn.GroupNorm(gn_groups(width), width), nn.ReLU(inplace=False))
        layers, c = [], width
        for i in range(stages):
            c_out = min(width * 2 ** (i + 1), 4 * width)
            layers += [block(c, c_out, 2), block(c_out, c_out, 1)]
            c = c_out
        self.features = nn.Sequential(*layers)
        avg = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[spatial_dims]
        mx = {2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d}[spatial_dims]
        self.avg, self.max = avg(1), mx(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * c, num_classes)

    def forward(self, x):
        x = self.features(self.stem(x))
        pooled = torch.cat([torch.flatten(self.avg(x), 1), torch.flatten(self.max(x), 1)], dim=1)
        return self.fc(self.dropout(pooled))


# name -> factory(in_channels, num_classes, width, spatial_dims); "dp_ok" marks DP-compatible models.
_MODELS: dict[str, dict] = {
    "resnet9-gn": {
        "factory": lambda **kw: ResNet9(norm="group", **kw),
        "spatial_dims": (2, 3),
        "doc": "ResNet-9 with GroupNorm and Mish (the paper's model); DP-compatible",
    },
    "resnet9-bn": {
        "factory": lambda **kw: ResNet9(norm="batch", **kw),
        "spatial_dims": (2, 3),
        "doc": "ResNet-9 with BatchNorm: non-private baselines only; refused for DP",
    },
    "cnn3d-gn": {
        "factory": lambda **kw: CNN3D(**kw),
        "spatial_dims": (2, 3),
        "doc": "small CT classifier from MONAI Convolution blocks with GroupNorm (the pdac default); DP-compatible",
    },
}


def register_model(name: str, factory, spatial_dims=(2,), doc: str = "") -> None:
    _MODELS[name] = {"factory": factory, "spatial_dims": tuple(spatial_dims), "doc": doc}


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, *, in_channels: int, num_classes: int, width: int, spatial_dims: int) -> nn.Module:
    try:
        entry = _MODELS[name]
    except KeyError:
        raise unknown_name("architecture", name, _MODELS) from None
    if spatial_dims not in entry["spatial_dims"]:
        from privaudit.errors import ConfigError

        raise ConfigError(f"architecture {name!r} does not support {spatial_dims}D inputs")
    return entry["factory"](in_channels=in_channels, num_classes=num_classes, width=width, spatial_dims=spatial_dims)
