"""FGSM with random start, "fast is better than free" (Wong et al. 2020).

δ ~ U(-ε, ε); δ ← clip(δ + α·sign(∇ℓ), -ε, ε) with α = 1.25ε (``alpha_ratio``); train on x + δ.
Guard against catastrophic overfitting (PGD accuracy collapsing within an epoch): after every
epoch, PGD accuracy on a held-out training batch; the best-PGD weights are kept and restored at
the end, and a drop of more than ``collapse_drop`` stops training and flags the trial."""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F

from defenses.attacks import pgd
from defenses.attacks.pgd import pgd_restarts, random_start
from defenses.core.base import DefenseConfigError, LossDefense


@dataclasses.dataclass(frozen=True)
class FGSMRSParams:
    alpha_ratio: float = 1.25     # FGSM step α = alpha_ratio · ε
    collapse_drop: float = 0.2    # PGD-accuracy drop (absolute) that counts as a collapse
    check_steps: int = 10         # PGD steps of the per-epoch check


class FGSMRS(LossDefense):
    name = "fgsm_rs"
    Params = FGSMRSParams
    holdout_size = 256
    severe_flags = frozenset({"catastrophic_overfitting"})  # the model's robustness collapsed

    def __init__(self, model, params, threat):
        super().__init__(model, params, threat)
        self.best_acc = -1.0
        self.best_state: dict | None = None
        self.collapse_epoch = 0
        self.stop_training = False

    @classmethod
    def validate(cls, params):
        if params.alpha_ratio <= 0:
            raise DefenseConfigError(f"fgsm_rs: alpha_ratio={params.alpha_ratio} must be > 0")
        if not 0 < params.collapse_drop <= 1:
            raise DefenseConfigError(f"fgsm_rs: collapse_drop={params.collapse_drop} must be in (0,1]")

    def loss(self, x, y, epoch):
        eps = self.threat.eps
        # The gradient is taken in train mode, on the same forward the paper's code uses.
        delta = random_start(x, eps).requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(self.model(x + delta), y), delta)
        with torch.no_grad():
            delta = (delta + self.params.alpha_ratio * eps * grad.sign()).clamp_(-eps, eps)
            x_adv = (x + delta).clamp_(0.0, 1.0)
        return F.cross_entropy(self.model(x_adv), y)

    def end_epoch(self, epoch, holdout):
        x, y = holdout
        steps = self.params.check_steps
        eps = self.threat.eps
        x_adv = pgd(self.model, x, y, eps, 2.5 * eps / steps, steps)
        with torch.no_grad():
            self.model.eval()
            acc = (self.model(x_adv).argmax(1) == y).float().mean().item()
            self.model.train()
        if acc >= self.best_acc:
            self.best_acc = acc
            self.best_state = copy.deepcopy(self.model.state_dict())
        elif self.best_acc - acc > self.params.collapse_drop:
            self.collapse_epoch = epoch
            self.stop_training = True  # early stopping: later epochs only overfit further
        return {"holdout_pgd_acc": acc, "catastrophic_overfitting": float(self.collapse_epoch > 0)}

    def finalize(self):
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    def flags(self):
        return {"catastrophic_overfitting": self.collapse_epoch > 0}

    def paper_attacks(self, eps: float) -> list:
        """Wong et al.'s evaluation at the threat model's ε: PGD with 50 steps and 10 random
        restarts (their MNIST and CIFAR-10 tables); step the project's 2.5·ε/K."""
        return [pgd_restarts(self.predictor(), eps, 50, 10)]

    def state_dict(self):
        return {"best_acc": self.best_acc, "best_state": self.best_state,
                "collapse_epoch": self.collapse_epoch}

    def load_state_dict(self, state):
        self.best_acc = state["best_acc"]
        self.best_state = state["best_state"]
        self.collapse_epoch = state["collapse_epoch"]
        self.stop_training = self.collapse_epoch > 0
