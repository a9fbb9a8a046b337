"""Saliency-based adversarial defenses, baselines, attacks and evaluation in pure PyTorch.

This package never imports Ray: it is a library a researcher can use in a notebook. The top
level holds one module per defense; the library is in ``core``, ``attacks``, ``evaluation`` and
``saliency`` (docs/architecture.md). The defense contract is re-exported here:
``from defenses import Defense, LossDefense, ThreatModel``."""
from __future__ import annotations

from typing import Any

# Resolved on first use (PEP 562) rather than imported here: importing any part of the package
# (e.g. ``defenses.core.cache`` from the torch-free aggregator) runs this file.
_CONTRACT = ("Defense", "LossDefense", "ThreatModel", "BaseModelRequest", "Prediction",
             "DefenseConfigError", "TrainingDiverged", "NoParams", "predict_labels")
__all__ = list(_CONTRACT)


def __getattr__(name: str) -> Any:
    if name in _CONTRACT:
        from defenses.core import base

        return getattr(base, name)
    raise AttributeError(f"module 'defenses' has no attribute {name!r}")
