"""torchattacks behind our ``Attack`` call: FGSM, MIM, C&W, DeepFool, Square, AutoAttack.

torchattacks wants an ``nn.Module``; a plain callable is wrapped. Its L2 attacks (C&W,
DeepFool) are projected onto the L∞ ball by ``Attack.__call__``, so in an L∞ threat model they
only count within ε."""
from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any, Callable

import torch
import torch.nn as nn

from defenses.attacks.base import Attack


def _lazy_import(name: str) -> ModuleType:
    """``name``, loaded at its first attribute access (the recipe of importlib's docs)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# torchattacks pulls in scipy.stats (~0.6 s of imports). Training processes never attack with
# it, and every Ray Train worker is a fresh process: load it when an attack is first built.
torchattacks = _lazy_import("torchattacks")


class _CallableModule(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class TorchAttacks(Attack):
    """Adapter: ``factory(module, eps)`` builds the torchattacks object at first use."""

    def __init__(self, model, eps, name: str, factory: Callable[[nn.Module, float], Any]):
        super().__init__(model, eps)
        self.name = name
        module = model if isinstance(model, nn.Module) else _CallableModule(model)
        self._attack = factory(module, eps)
        if self._attack.device is None or not any(True for _ in module.parameters()):
            self._attack.set_device(None)

    def forward(self, images, labels):
        if self._attack.device is None:
            self._attack.set_device(images.device)
        return self._attack(images, labels)


def _num_classes(model: Callable, images_shape: tuple[int, ...] | None = None) -> int:
    inner = getattr(model, "module", model)
    for m in reversed(list(inner.modules()) if isinstance(inner, nn.Module) else []):
        if isinstance(m, nn.Linear):
            return m.out_features
    return 10


def fgsm(model, eps, n=None):
    return TorchAttacks(model, eps, "fgsm", lambda m, e: torchattacks.FGSM(m, eps=e))


def mim(model, eps, n=None):
    steps = n or 10
    return TorchAttacks(model, eps, f"mim-{steps}",
                        lambda m, e: torchattacks.MIFGSM(m, eps=e, alpha=2.5 * e / steps,
                                                         steps=steps, decay=1.0))


def cw(model, eps, n=None):
    steps = n or 50
    return TorchAttacks(model, eps, f"cw-{steps}",
                        lambda m, e: torchattacks.CW(m, c=1.0, kappa=0.0, steps=steps, lr=0.01))


def deepfool(model, eps, n=None):
    steps = n or 50
    return TorchAttacks(model, eps, f"deepfool-{steps}",
                        lambda m, e: torchattacks.DeepFool(m, steps=steps, overshoot=0.02))


def square(model, eps, n=None):
    queries = n or 1000
    return TorchAttacks(model, eps, f"square-{queries}",
                        lambda m, e: torchattacks.Square(m, norm="Linf", eps=e, n_queries=queries,
                                                         n_restarts=1, seed=0))


def autoattack(model, eps, n=None):
    classes = _num_classes(model)
    return TorchAttacks(model, eps, "autoattack",
                        lambda m, e: torchattacks.AutoAttack(m, norm="Linf", eps=e, version="standard",
                                                             n_classes=classes, seed=0))
