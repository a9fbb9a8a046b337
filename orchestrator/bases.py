"""Base models that defenses start from (SAD's Φ⁰, teachers, guarded classifiers): trained
once per (dataset, model, recipe, seed) with the trial training loop and cached as checkpoints
under ``RUN_DIR/bases``; concurrent trials wait on a file lock instead of training twice."""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from defenses.base import BaseModelRequest
from orchestrator.spec import SweepSpec

log = logging.getLogger(__name__)


def base_key(spec: SweepSpec, request: BaseModelRequest) -> str:
    recipe = {"defense": request.defense, "params": dict(request.params),
              "epochs": request.epochs or spec.epochs, "dataset": spec.dataset, "model": spec.model,
              "seed": spec.seed, "train_samples": spec.train_samples,
              "validation_samples": spec.validation_samples,
              "optimizer": spec.optimizer.model_dump(), "batch_size": spec.batch_size,
              # a detector's FPR does not change the model it guards: one base for every fpr
              "threat": spec.threat_model.model_dump(exclude={"attacks", "fpr"})}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return f"{spec.dataset}-{spec.model}-{request.defense}-s{spec.seed}-{digest}"


def ensure_base(spec: SweepSpec, request: BaseModelRequest, run_dir: Path | None, device) -> Path:
    from orchestrator.trial import CHECKPOINT_FILE, build_setup, save_checkpoint, train

    folder = Path(run_dir or tempfile.gettempdir()) / "bases" / base_key(spec, request)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / CHECKPOINT_FILE).is_file():
            epochs = request.epochs or spec.epochs
            log.info("training base model %s (%d epochs)", folder.name, epochs)
            s = build_setup(spec, request.defense, dict(request.params), device, run_dir, epochs)
            seconds = train(s, epochs)
            tmp = Path(tempfile.mkdtemp(dir=folder.parent))
            save_checkpoint(tmp, s, epochs, seconds)
            os.replace(tmp, folder)
    return folder / CHECKPOINT_FILE
