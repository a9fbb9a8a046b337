"""B4 on SAT's 6-dimensional search space (``alpha``, ``eps0``, ``teacher``, ``method``,
``variant``, ``lr``): the samplers the sweep offers against random search at equal trials, on a
space where a configuration's worth depends on more than its learning rate. The measurement
is ``bench.b4_search``'s; TPE with Optuna's defaults is left out (its 10 random start trials
are half of a 20-trial study). SAT's two teachers are trained once and shared by every study."""
from __future__ import annotations

from bench.b4_search import run as run_b4

SETTINGS = {
    "tiny": dict(trials=2, seeds=(0,), train=100, epochs=1, k=1, eval=50),
    "quick": dict(trials=4, seeds=(0,), train=500, epochs=1, k=1, eval=100),
    "full": dict(trials=20, seeds=(0, 1, 2), train=1000, epochs=2, k=3, eval=500),
}


def run(mode: str) -> str:
    return run_b4(mode, "sat", SETTINGS, ("random", "tpe", "nsga2"), key="b4sat")
