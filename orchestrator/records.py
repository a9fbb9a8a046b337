"""The typed record of one trial: built by ``run_trial``, written as JSON, read by the
aggregator, the dashboard and the exporters. Nobody re-parses Tune's internals."""
from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import difflib
import json
import math
import time
from pathlib import Path
from typing import Any

from defenses.core.cache import atomic_write
from orchestrator.stats import accuracy_interval

COMPLETED = "completed"
FAILED = "failed"
STOPPED = "stopped"  # stopped early by the scheduler (mo_asha): off the fronts and the final evaluation
RUNNING = "running"

# What a sweep may optimize, each in Optuna's words for its direction. ``cost``: the trial's
# device-seconds of training and evaluation (TrialRecord.cost).
OBJECTIVES: dict[str, str] = {"clean_acc": "maximize", "robust_acc": "maximize", "cost": "minimize"}


def tune_modes(objectives: list[str]) -> list[str]:
    """The objectives' directions in Ray Tune's words ("max" / "min")."""
    return ["min" if OBJECTIVES[o] == "minimize" else "max" for o in objectives]


def objectives_problem(objectives: list[str]) -> str | None:
    """What is wrong with a list of objectives (a spec's, ``--objectives``), with its fix."""
    unknown = next((o for o in objectives if o not in OBJECTIVES), None)
    if unknown is not None:
        close = difflib.get_close_matches(str(unknown), list(OBJECTIVES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown objective {unknown!r}; {hint}valid objectives: {', '.join(OBJECTIVES)}"
    if len(objectives) < 2:
        return (f"give at least two objectives (a front trades one off against another), e.g. "
                f"[clean_acc, robust_acc]; got {objectives!r}")
    twice = next((o for o in objectives if objectives.count(o) > 1), None)
    return f"objective {twice!r} is listed twice; list each once" if twice else None

# Column order of trials.csv before the prefixed groups (hp.*, acc.*, flag.*, metric.*).
IDENTITY_COLUMNS = ["trial_id", "defense", "status", "clean_acc", "robust_acc", "robust_attack",
                    "clean_acc_ci_low", "clean_acc_ci_high", "robust_acc_ci_low",
                    "robust_acc_ci_high", "n_eval", "robust_acc_search", "final_attack",
                    "final_evaluated", "train_seconds", "checkpoint", "dataset", "model", "seed",
                    "epochs", "eval_seconds", "cost", "cost_unit", "started_at", "finished_at", "run_id"]
CI_SUFFIXES = ("_ci_low", "_ci_high")
N_PREFIX = "n_eval@"  # curve entries: test points evaluated at that ε


@dataclasses.dataclass
class TrialRecord:
    trial_id: str
    defense: str
    dataset: str
    model: str
    seed: int
    status: str = RUNNING
    hp: dict[str, Any] = dataclasses.field(default_factory=dict)
    clean_acc: float = math.nan
    robust_acc: float = math.nan
    robust_attack: str = ""
    acc: dict[str, float] = dataclasses.field(default_factory=dict)      # per attack
    flags: dict[str, bool] = dataclasses.field(default_factory=dict)     # e.g. catastrophic_overfitting
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # anything else numeric
    # robustness curve, keyed by column name: robust_acc@<eps>, acc.<attack>@<eps>
    curve: dict[str, float] = dataclasses.field(default_factory=dict)
    epochs: int = 0
    n_eval: int = 0                 # test points clean_acc and robust_acc were measured on
    # the sweep's final re-evaluation: its cascade ("" when not re-evaluated) and the
    # search-time robust accuracy it replaced
    final_attack: str = ""
    robust_acc_search: float = math.nan
    train_seconds: float = math.nan
    eval_seconds: float = math.nan
    # device-seconds of training (with its per-epoch validation) and the trial's own
    # evaluation, summed over its workers: CPU time on CPU, held-GPU time on GPU (cost_unit
    # "cpu_s" / "gpu_s"); the sweep's final re-evaluation is not part of it
    cost: float = math.nan
    cost_unit: str = ""
    checkpoint: str = ""
    error: str = ""
    warning: str = ""               # what went wrong and was recovered from (e.g. a bad checkpoint)
    started_at: str = ""            # ISO 8601, UTC: when the trial first started (kept over resumes)
    finished_at: str = ""           # ... and when it ended, completed or failed
    run_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def set_evaluation(self, report: Any, metrics: dict[str, float] | None = None) -> None:
        """Take the numbers of a ``defenses.evaluation.benchmark.Report`` (the primary ε's accuracies, its
        cascade, the curve, the masking flags and their evidence), keeping training-time
        flags; ``metrics`` are added to the report's evidence. The one mapping from an
        evaluation to a record, for the trial and for the final re-evaluation alike."""
        result = report.primary
        self.clean_acc, self.robust_acc = result.clean_acc, result.robust_acc
        self.robust_attack, self.acc, self.n_eval = result.robust_attack, dict(result.acc), result.n
        self.eval_seconds = report.seconds
        self.metrics = {**{k: v for k, v in self.metrics.items() if not k.startswith("masking.")},
                        "clean_rejected": result.clean_rejected, **report.evidence, **report.metrics,
                        **(metrics or {})}
        if "fpr" in self.metrics and "n_fpr" in self.metrics:
            lo, hi = accuracy_interval(self.metrics["fpr"], self.metrics["n_fpr"])
            self.metrics.update(fpr_ci_low=lo, fpr_ci_high=hi)
        self.flags = {**{k: v for k, v in self.flags.items() if k not in report.flags}, **report.flags}
        self.curve = report.curve_columns()

    @property
    def final_evaluated(self) -> bool:
        return bool(self.final_attack)

    def intervals(self) -> dict[str, float]:
        """95 % Wilson intervals of clean_acc, robust_acc and every robust_acc@<ε>."""
        out: dict[str, float] = {}
        for name, acc, n in (("clean_acc", self.clean_acc, self.n_eval),
                             ("robust_acc", self.robust_acc, self.n_eval),
                             *((k, v, self.curve.get(N_PREFIX + k.partition("@")[2], 0))
                               for k, v in self.curve.items() if k.startswith("robust_acc@"))):
            base, at, eps = name.partition("@")
            for suffix, value in zip(CI_SUFFIXES, accuracy_interval(acc, n)):
                out[f"{base}{suffix}{at}{eps}"] = value
        return out

    def to_row(self) -> dict[str, Any]:
        """One flat CSV row: identity columns (with the accuracies' intervals), then hp.*,
        acc.*, the curve's robust_acc@<eps>, its intervals and acc.<attack>@<eps>, flag.*,
        metric.*, error, warning."""
        ci = self.intervals()
        row: dict[str, Any] = {c: ci[c] if c in ci else getattr(self, c) for c in IDENTITY_COLUMNS}
        row.update({f"hp.{k}": v for k, v in sorted(self.hp.items())})
        row.update({f"acc.{k}": v for k, v in self.acc.items()})
        row.update(self.curve)
        row.update({k: v for k, v in ci.items() if "@" in k})
        row.update({f"flag.{k}": bool(v) for k, v in sorted(self.flags.items())})
        row.update({f"metric.{k}": v for k, v in sorted(self.metrics.items())})
        row["error"] = self.error
        row["warning"] = self.warning
        return row


def iso_utc(timestamp: float | None = None) -> str:
    """``timestamp`` (default: now) as ISO 8601 in UTC, e.g. 2026-12-02T03:04:05.678+00:00."""
    return dt.datetime.fromtimestamp(time.time() if timestamp is None else timestamp,
                                     tz=dt.timezone.utc).isoformat()


def write_json_atomic(path: Path, payload: Any) -> None:
    """``payload`` as JSON at ``path``, written atomically (``defenses.core.cache.atomic_write``)."""
    text = json.dumps(payload, indent=1, default=_json_default)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def record_path(run_dir: Path, trial_id: str) -> Path:
    return Path(run_dir) / "records" / f"{trial_id}.json"


def save_record(run_dir: Path, record: TrialRecord) -> Path:
    path = record_path(run_dir, record.trial_id)
    write_json_atomic(path, record.to_dict())
    return path


def load_record(path: Path) -> TrialRecord:
    with open(path) as f:
        return TrialRecord.from_dict(json.load(f))


def load_records(run_dir: Path) -> list[TrialRecord]:
    folder = Path(run_dir) / "records"
    if not folder.is_dir():
        return []
    return [load_record(p) for p in sorted(folder.glob("*.json"))]


def trial_seconds_by_defense(path: str | Path) -> dict[str, float]:
    """Per defense, the mean seconds its completed trials held a slot (``finished_at`` −
    ``started_at``) in an earlier run's ``trials.csv`` (``path``: the file or its run folder):
    the ``cost_prior`` of ``start_order: longest_first``. ValueError, naming the fix, when there
    is no such file or it has no completed trial with both times."""
    path = Path(path)
    csv_path = path / "trials.csv" if path.is_dir() else path
    if not csv_path.is_file():
        raise ValueError(f"no trials.csv at {path}; give an earlier run's folder or its "
                         "trials.csv")
    seconds: dict[str, list[float]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                span = (dt.datetime.fromisoformat(row["finished_at"])
                        - dt.datetime.fromisoformat(row["started_at"])).total_seconds()
            except (KeyError, TypeError, ValueError):  # no times: an older run's file, or a failed trial
                continue
            if row.get("status") == COMPLETED and span >= 0:
                seconds.setdefault(row["defense"], []).append(span)
    if not seconds:
        raise ValueError(f"{csv_path} has no completed trial with started_at and finished_at; "
                         "give the trials.csv of a run that finished trials")
    return {d: sum(v) / len(v) for d, v in seconds.items()}
