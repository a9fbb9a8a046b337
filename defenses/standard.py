"""Standard (non-adversarial) training: cross-entropy on clean images."""
from __future__ import annotations

import torch.nn.functional as F

from defenses.core.base import LossDefense


class Standard(LossDefense):
    name = "standard"

    def loss(self, x, y, epoch):
        return F.cross_entropy(self.model(x), y)
