"""PGD adversarial training (Madry et al. 2018): cross-entropy on PGD-K examples.

``clean_weight`` adds ``clean_weight · CE(clean)``; at 1.0 the loss is CE(nat) + CE(adv), the
50/50 clean/adversarial mix that ATAT reduces to when λ₁ = λ₂ = 0."""
from __future__ import annotations

import dataclasses

import torch.nn.functional as F

from defenses.attacks import pgd
from defenses.attacks.pgd import pgd_restarts
from defenses.core.base import DefenseConfigError, LossDefense


@dataclasses.dataclass(frozen=True)
class PGDATParams:
    clean_weight: float = 0.0


class PGDAT(LossDefense):
    name = "pgd_at"
    Params = PGDATParams

    @classmethod
    def validate(cls, params):
        if params.clean_weight < 0:
            raise DefenseConfigError(f"pgd_at: clean_weight={params.clean_weight} must be ≥ 0")

    def loss(self, x, y, epoch):
        t = self.threat
        x_adv = pgd(self.model, x, y, t.eps, t.step_size, t.train_steps, autocast=t.attack_dtype)
        loss = F.cross_entropy(self.model(x_adv), y)
        if self.params.clean_weight:
            loss = loss + self.params.clean_weight * F.cross_entropy(self.model(x), y)
        return loss

    def paper_attacks(self, eps: float) -> list:
        """Madry et al.'s MNIST white-box table at the threat model's ε: FGSM, PGD with 40 and
        100 steps (1 and 20 restarts) and PGD-40 on the C&W margin loss. Steps are the
        project's 2.5·ε/K (the paper's 0.01 at ε = 0.3 is 1.3·ε over 40 steps)."""
        model = self.predictor()
        return ["fgsm", "pgd-40", "pgd-100", pgd_restarts(model, eps, 40, 20),
                pgd_restarts(model, eps, 100, 20), "pgd_cw-40"]
