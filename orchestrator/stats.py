"""Uncertainty of the accuracies a trial reports. Plain Python: the aggregator and the
exporters use it without torch."""
from __future__ import annotations

import math

Z95 = 1.959964  # two-sided 95 % normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson 1927), 95 % by default. Unlike the normal
    approximation it stays inside [0, 1] and does not collapse at 0 % or 100 %, the values a
    sweep's broken and clean extremes take. (nan, nan) when nothing was measured."""
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} outside [0, n={n}]")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(acc: float, n: int | float) -> tuple[float, float]:
    """The Wilson interval of an accuracy measured on ``n`` points (the count is ``acc·n``
    rounded: accuracies are stored as fractions of whole points)."""
    if n is None or acc is None or not n > 0 or math.isnan(acc):
        return math.nan, math.nan
    n = int(n)
    return wilson_interval(min(n, max(0, round(acc * n))), n)
