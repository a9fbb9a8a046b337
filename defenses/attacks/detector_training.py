"""The attacks the model-based saliency detectors are trained and tested on (Ye et al. and
the detector papers' set): FGSM, BIM, MIM, C&W-L2, DeepFool (batched, ours) and JSMA, by name,
with the papers' step counts; ``threat_attack`` is a training attack inside the L∞ threat
model. Used by ``defenses.saliency_detector`` and its experiments."""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
import torch.nn as nn

from defenses import attacks as attack_lib
from defenses.attacks import Attack, frozen_eval
from defenses.attacks.external import TorchAttacks, torchattacks

log = logging.getLogger(__name__)

TRAIN_ATTACKS = ("fgsm", "bim", "mim", "cw", "deepfool")
TEST_ONLY_ATTACKS = ("jsma",)
DEFAULT_STEPS = {"fgsm": 1, "bim": 10, "mim": 10, "cw": 30, "deepfool": 50, "jsma": 0}


def deepfool(model: Callable, x: torch.Tensor, y: torch.Tensor, steps: int = 50,
             overshoot: float = 0.02) -> torch.Tensor:
    """Batched DeepFool-L2 (Moosavi-Dezfooli et al. 2016): at each step move to the nearest
    linearized class boundary, accumulate the steps in r and try x + (1+overshoot)·r (kept in
    [0,1]); an image stops as soon as it is misclassified."""
    x_adv, r_tot = x.clone(), torch.zeros_like(x)
    active = torch.ones(len(y), dtype=torch.bool, device=x.device)
    for _ in range(steps):
        idx = active.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        xi = x_adv[idx].detach().requires_grad_(True)
        logits = model(xi)
        going = logits.argmax(1) == y[idx]
        active[idx[~going]] = False
        if not going.any():
            break
        k = logits.shape[1]
        grads = torch.stack([torch.autograd.grad(logits[:, j].sum(), xi, retain_graph=j < k - 1)[0]
                             for j in range(k)], 1)
        with torch.no_grad():
            rows = torch.arange(len(idx), device=x.device)
            yi = y[idx]
            f = logits - logits[rows, yi][:, None]
            w = grads - grads[rows, yi][:, None]
            wn = w.flatten(2).norm(dim=2) + 1e-8
            ratio = f.abs() / wn
            ratio[rows, yi] = math.inf
            nearest = ratio.argmin(1)
            step = ((ratio[rows, nearest] + 1e-4) / wn[rows, nearest]).view(-1, 1, 1, 1) * w[rows, nearest]
            j = idx[going]
            r_tot[j] += step[going]
            x_adv[j] = (x[j] + (1 + overshoot) * r_tot[j]).clamp(0.0, 1.0)
    return x_adv.detach()


class NativeAttack:
    """An attack run in its own norm (no projection onto the L∞ ε-ball), images kept in [0,1]:
    C&W-L2, DeepFool, JSMA as the paper runs them. Same call as ``Attack``."""

    def __init__(self, model: nn.Module, name: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.model, self.name, self.fn = model, name, fn

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with frozen_eval(self.model):
            adv = self.fn(images, labels)
        return adv.detach().clamp_(0.0, 1.0)


def _torchattacks_native(model: nn.Module, name: str, attack: Any) -> NativeAttack:
    attack.set_device(next(model.parameters()).device)
    return NativeAttack(model, name, attack)


def detection_attack(name: str, model: nn.Module, eps: float, steps: int = 0):
    """The paper's attacks by name (``fgsm``, ``bim``, ``mim``, ``cw``, ``deepfool``,
    ``jsma``); ``steps`` 0 = the default budget. Returns an ``attack(images, labels)``
    callable with a ``name``."""
    steps = steps or DEFAULT_STEPS.get(name, 0)
    if name == "fgsm":
        return attack_lib.make("fgsm", model, eps)
    if name == "bim":
        return TorchAttacks(model, eps, f"bim-{steps}",
                            lambda m, e: torchattacks.BIM(m, eps=e, alpha=2.5 * e / steps, steps=steps))
    if name == "mim":
        return attack_lib.make(f"mim-{steps}", model, eps)
    if name == "cw":
        return _torchattacks_native(model, f"cw_l2-{steps}",
                                    torchattacks.CW(model, c=10.0, kappa=0.0, steps=steps, lr=0.1))
    if name == "deepfool":
        return NativeAttack(model, f"deepfool_l2-{steps}",
                            lambda x, y: deepfool(model, x, y, steps=steps))
    if name == "jsma":
        return _torchattacks_native(model, "jsma", torchattacks.JSMA(model, theta=1.0, gamma=0.1))
    raise ValueError(f"unknown detection attack {name!r}; valid: "
                     f"{', '.join(TRAIN_ATTACKS + TEST_ONLY_ATTACKS)}")


class DeepFoolAttack(Attack):
    """Our batched DeepFool as an ``Attack``: projected onto the ε-ball like every attack of
    the threat model (``detection_attack("deepfool")`` is the unprojected one)."""

    def __init__(self, model, eps, steps: int = 50):
        super().__init__(model, eps)
        self.steps = steps
        self.name = f"deepfool_l2-{steps}"

    def forward(self, images, labels):
        return deepfool(self.model, images, labels, self.steps)


def threat_attack(name: str, model: nn.Module, eps: float, steps: int = 0) -> Attack:
    """The paper's attack ``name`` within the L∞ threat model (C&W and DeepFool projected onto
    the ε-ball): what ``paper_attacks`` evaluates with."""
    steps = steps or DEFAULT_STEPS.get(name, 0)
    if name == "cw":
        return TorchAttacks(model, eps, f"cw_l2-{steps}",
                            lambda m, e: torchattacks.CW(m, c=10.0, kappa=0.0, steps=steps, lr=0.1))
    if name == "deepfool":
        return DeepFoolAttack(model, eps, steps)
    if name in ("fgsm", "bim", "mim"):
        return detection_attack(name, model, eps, steps)
    raise ValueError(f"no threat-model version of attack {name!r}; valid: {', '.join(TRAIN_ATTACKS)}")


def craft(attack: Callable, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250,
          device: torch.device | None = None) -> torch.Tensor:
    """``attack`` over (x, y) in batches; with ``device``, each batch is attacked there and
    its adversarials come back to x's device (a training set kept in host memory)."""
    dev = device or x.device
    return torch.cat([attack(x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev)).to(x.device)
                      for i in range(0, len(y), batch_size)])


