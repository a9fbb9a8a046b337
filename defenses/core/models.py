"""Model builders. Inputs are images in [0,1]; each model normalizes inside ``forward`` so
attacks and ε stay in input units. Each model names its attention layer (the last
convolutional block) in ``attention_layer`` so Grad-CAM and attention transfer can find it."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

NAMES = ("small_cnn", "preact_resnet18", "wide_resnet34_10")

# Per-dataset statistics by channel count: 1 channel = MNIST, 3 = CIFAR.
_STATS = {1: ((0.1307,), (0.3081,)),
          3: ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))}


class ModelError(ValueError):
    """An unknown model name or a model without what a defense needs."""


class Normalize(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        mean, std = _STATS.get(in_channels, ((0.5,) * in_channels, (0.5,) * in_channels))
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """The 4-conv + 2-FC MNIST network of the TRADES/MART papers, with BatchNorm."""

    attention_layer = "block2"

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.normalize = Normalize(in_channels)

        def conv_bn(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        self.block1 = nn.Sequential(*conv_bn(in_channels, 32), *conv_bn(32, 32))
        self.block2 = nn.Sequential(nn.MaxPool2d(2), *conv_bn(32, 64), *conv_bn(64, 64))
        self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.LazyLinear(200),
                                  nn.ReLU(inplace=True), nn.Linear(200, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(self.normalize(x))))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 as in fast_adversarial / RobustBench's CIFAR baselines."""

    attention_layer = "layer4"

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.normalize = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        widths, cin, layers = (64, 128, 256, 512), 64, []
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(PreActBlock(cin, w, stride), PreActBlock(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-widen (Zagoruyko & Komodakis), the Madry/TRADES CIFAR model at 34-10."""

    attention_layer = "block3"

    def __init__(self, depth: int = 34, widen: int = 10, num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.normalize = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)

        def group(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                   for i in range(n)])

        self.block1 = group(widths[0], widths[1], 1)
        self.block2 = group(widths[1], widths[2], 2)
        self.block3 = group(widths[2], widths[3], 2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        out = F.relu(self.bn(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "small_cnn": lambda k, c: SmallCNN(k, c),
    "preact_resnet18": lambda k, c: PreActResNet18(k, c),
    "wide_resnet34_10": lambda k, c: WideResNet(34, 10, k, c),
}

# Input size each model is built for (to materialize lazy layers at build time).
_INPUT_SIZE = {1: 28, 3: 32}


def build(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Build a model by name; lazy layers are materialized so ``state_dict`` is complete."""
    if name not in _BUILDERS:
        raise ModelError(f"unknown model {name!r}; valid models: {', '.join(NAMES)}")
    model = _BUILDERS[name](num_classes, in_channels)
    size = _INPUT_SIZE.get(in_channels, 32)
    with torch.no_grad():
        model.eval()(torch.zeros(1, in_channels, size, size))
    return model.train()


def attention_module(model: nn.Module) -> nn.Module:
    """The module named by ``model.attention_layer`` (unwrapping DDP); a clear error if none."""
    inner = getattr(model, "module", model)
    name = getattr(inner, "attention_layer", None)
    if name is None:
        raise ModelError(f"model {type(inner).__name__} names no attention layer "
                         "(set the class attribute attention_layer to its last conv block)")
    try:
        return inner.get_submodule(name)
    except AttributeError as e:
        raise ModelError(f"model {type(inner).__name__}: attention layer {name!r} not found") from e


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
