"""TRADES (Zhang et al. 2019): CE(f(x), y) + β · KL(f(x) ‖ f(x')), with x' maximizing the KL
inside the ε-ball (K steps from x + 0.001·N(0, I), as in the authors' code)."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from defenses.attacks.base import autocast_passes, frozen_eval, input_gradient
from defenses.core.base import DefenseConfigError, LossDefense


@dataclasses.dataclass(frozen=True)
class TRADESParams:
    beta: float = 6.0


def kl_adversarial(model, x: torch.Tensor, eps: float, alpha: float, steps: int,
                   autocast: torch.dtype | None = None) -> torch.Tensor:
    """The TRADES inner maximization of KL(f(x) ‖ f(x')) (model frozen in eval mode);
    ``autocast``: the precision of the model's passes, as in ``pgd``."""
    def logits(inputs: torch.Tensor) -> torch.Tensor:
        with autocast_passes(x, autocast):
            return model(inputs).float()

    with frozen_eval(model):
        p_clean = F.softmax(logits(x), dim=1).detach()
        x_adv = (x + 0.001 * torch.randn_like(x)).clamp_(0.0, 1.0)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(logits(x_adv), dim=1), p_clean, reduction="sum")
            grad = input_gradient(kl, x_adv, autocast)
            with torch.no_grad():
                x_adv = x_adv + alpha * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
    return x_adv.detach()


def trades_loss(model, x, y, x_adv, beta: float) -> torch.Tensor:
    logits = model(x)
    robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1),
                      reduction="batchmean")
    return F.cross_entropy(logits, y) + beta * robust


class TRADES(LossDefense):
    name = "trades"
    Params = TRADESParams

    @classmethod
    def validate(cls, params):
        if params.beta < 0:
            raise DefenseConfigError(f"trades: beta={params.beta} must be ≥ 0")

    def loss(self, x, y, epoch):
        t = self.threat
        x_adv = kl_adversarial(self.model, x, t.eps, t.step_size, t.train_steps, t.attack_dtype)
        return trades_loss(self.model, x, y, x_adv, self.params.beta)

    def paper_attacks(self, eps: float) -> list[str]:
        """Zhang et al.'s MNIST white-box evaluation at the threat model's ε: FGSM and
        FGSM^40 (PGD-40; the paper's step 0.01, here the project's 2.5·ε/K)."""
        return ["fgsm", "pgd-40"]
