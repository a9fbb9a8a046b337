"""The result of evaluating a defense at one ε: what ``defenses.evaluation.benchmark`` produces and the
gradient-masking checks (``defenses.evaluation.masking``) read, in a module of its own so neither imports
the other for it."""
from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass
class EvalResult:
    clean_acc: float
    robust_acc: float
    robust_attack: str               # the attacks whose worst case robust_acc is
    acc: dict[str, float]            # robust accuracy after each attack of the cascade
    broken_by: dict[str, int]        # points each attack broke first
    clean_rejected: float            # fraction of clean inputs a detector rejected
    n: int
    seconds: float
    eps: float = math.nan
    robust_mask: torch.Tensor | None = None  # bool per input: survived every attack (CPU)
