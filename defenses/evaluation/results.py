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


def merge_results(parts: list[EvalResult | None]) -> EvalResult:
    """One ε's result over disjoint, consecutive shares of the points (rank order), as if one
    process had run the cascade on all of them: counts add, accuracies are the shares' means
    weighted by their sizes, masks concatenate. Every part ran the same cascade; None is a
    rank that had no points (fewer points than ranks) and adds nothing."""
    parts = [p for p in parts if p is not None]
    n = sum(p.n for p in parts)

    def mean(values: list[float]) -> float:
        return sum(v * p.n for v, p in zip(values, parts)) / max(n, 1)

    first = parts[0]
    return EvalResult(
        clean_acc=mean([p.clean_acc for p in parts]),
        robust_acc=mean([p.robust_acc for p in parts]),
        robust_attack=first.robust_attack,
        acc={k: mean([p.acc.get(k, p.robust_acc) for p in parts]) for k in first.acc},
        broken_by={k: sum(p.broken_by.get(k, 0) for p in parts) for k in first.broken_by},
        clean_rejected=mean([p.clean_rejected for p in parts]),
        n=n, seconds=max(p.seconds for p in parts), eps=first.eps,
        robust_mask=torch.cat([p.robust_mask for p in parts]) if first.robust_mask is not None else None)
