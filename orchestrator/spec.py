"""The sweep spec: schema, presets and validation. Every bad input stops here with one line
(``SpecError``) before Ray starts."""
from __future__ import annotations

import difflib
import importlib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from defenses.core import data as data_lib
from defenses.evaluation import benchmark as eval_lib
from defenses.core import models as model_lib
from defenses.core import registry
from defenses.core.base import DefenseConfigError, ThreatModel
from orchestrator.cli import BadInput
from orchestrator.records import objectives_problem, trial_seconds_by_defense

TRAIN_KEYS = ("lr", "weight_decay")  # hyperparameters of the optimizer, not of the defense


class SpecError(BadInput, ValueError):
    """One line saying what is wrong with the sweep and how to fix it (exit code 2)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ThreatSpec(_Strict):
    eps: float = Field(0.3, ge=0.0, le=1.0)
    # search-time cascade: the ``fast`` preset (FGSM, APGD-CE-20, APGD-T-20×3)
    attacks: list[str] = Field(default_factory=lambda: ["fast"], min_length=1)
    train_steps: int = Field(10, gt=0)
    train_step_size: float | None = Field(None, gt=0.0, le=1.0)
    # training attacks' passes under autocast (bf16/fp16) or not (fp32); B1 in BENCHMARKS.md
    train_precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # fraction of clean inputs every detector may reject: its threshold is set at this FPR on
    # the validation split (SweepSpec.validation_samples); a detector's own fpr overrides it
    fpr: float = 0.05
    # --- evaluation only (defenses.evaluation.benchmark): attacks may also name presets (fast, standard,
    # adaptive, paper) and AutoAttack's components (apgd_ce-100, apgd_t-50x3, fab_t-100)
    eval_eps: list[float] | None = None       # robustness curve; None: the dataset's default ε
    # test images at the other ε of the curve (bounds its cost to ~0.4× the primary ε's each
    # with eval_samples 500); null: all of eval_samples
    curve_samples: int | None = Field(200, gt=0)
    masking_samples: int = Field(64, ge=0)    # points of the gradient-masking checks; 0: off
    # the strong re-evaluation after the search of every trial that could be on a final front
    # (orchestrator.evaluate.final_evaluation): attacks/presets, the defense's adaptive attacks
    # added; "none" (or []) keeps the search-time numbers
    final_eval: list[str] = Field(default_factory=lambda: ["standard"])
    exclude_flagged: bool = False             # keep flagged trials off the Pareto fronts

    @field_validator("final_eval", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        if v is None or v == "none" or v == ["none"]:
            return []
        return [v] if isinstance(v, str) else v

    @field_validator("attacks", "final_eval")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        if v:
            eval_lib.check_attacks(v)
        return v

    @field_validator("eval_eps")
    @classmethod
    def _eps_in_range(cls, v: list[float] | None) -> list[float] | None:
        for e in v or []:
            eval_lib.check_eps(e, "eval_eps")
        return v

    @field_validator("fpr")
    @classmethod
    def _fpr_in_range(cls, v: float) -> float:
        # above 0.5 a "detector" rejects most clean inputs; 0 is no threshold at all
        if not (0.0 < v <= 0.5):
            raise ValueError(f"fpr must be in (0, 0.5], got {v!r}: the fraction of clean inputs "
                             "a detector may reject, e.g. 0.05")
        return v

    def threat_model(self) -> ThreatModel:
        return ThreatModel(eps=self.eps, attacks=tuple(self.attacks), train_steps=self.train_steps,
                           train_step_size=self.train_step_size, train_precision=self.train_precision,
                           fpr=self.fpr)


class OptimizerSpec(_Strict):
    name: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["constant", "cyclic"] = "constant"


class ResourceSpec(_Strict):
    # CPUs and GPUs of one training process: a trial with workers_per_trial = N holds N times
    # them (fractional GPUs let several small trials share one GPU)
    cpus_per_trial: float = Field(1.0, gt=0.0)
    gpus_per_trial: float = Field(0.0, ge=0.0)
    # trials of the sweep at once (None: as many as the cluster holds); in a defense's own
    # resources, that defense's trials at once
    max_concurrent: int | None = Field(None, gt=0)
    workers_per_trial: int = Field(1, ge=1)  # > 1: the trial trains data-parallel (Ray Train)
    sync_batchnorm: bool = False             # BatchNorm statistics over the global batch
    # true: a trial of defense D asks for gpus_per_trial × the GPU_SHARE that
    # search_spaces/D.py declares (its cost class: a fraction for a defense that trains without
    # a multi-step attack, so several of its trials share a GPU; 1 when it declares none).
    # A defense's own defenses.D.resources overrides it (SweepSpec.resources_for)
    gpu_shares: bool = False

    @model_validator(mode="after")
    def _ranks_need_whole_gpus(self) -> "ResourceSpec":
        if self.workers_per_trial > 1 and 0 < self.gpus_per_trial < 1:
            raise ValueError(f"gpus_per_trial={self.gpus_per_trial:g} with workers_per_trial="
                             f"{self.workers_per_trial}: the ranks of one trial cannot share a GPU "
                             "(NCCL); use gpus_per_trial: 1, or one worker per trial to share GPUs")
        if self.gpus_per_trial > 1:
            # one training process drives one GPU (no DataParallel): the others would sit idle
            raise ValueError(f"gpus_per_trial={self.gpus_per_trial:g}: one training process uses "
                             "one GPU; for a trial on several GPUs set gpus_per_trial: 1 and "
                             f"workers_per_trial: {math.ceil(self.gpus_per_trial)} (data-parallel)")
        return self

    def trial_cpus(self) -> float:
        return self.cpus_per_trial * self.workers_per_trial

    def trial_gpus(self) -> float:
        return self.gpus_per_trial * self.workers_per_trial


class DefenseResources(_Strict):
    # one defense's CPUs and GPUs per training process, in place of the spec's resources
    cpus_per_trial: float | None = Field(None, gt=0.0)
    gpus_per_trial: float | None = Field(None, ge=0.0)
    max_concurrent: int | None = Field(None, gt=0)  # this defense's trials at once


class DefenseSpec(_Strict):
    trials: int | None = Field(None, gt=0)
    # name -> fixed value | [choices] | {low, high, log}; replaces the search_spaces/ default
    space: dict[str, Any] | None = None
    resources: DefenseResources | None = None


def _check_test_split(field: str, n: int | None, dataset: str | None, otherwise: str) -> None:
    """A count of test images above the dataset's test split is a spec error, not a silent cut."""
    size = data_lib.TEST_SIZES.get(dataset) if dataset else None
    if n is not None and size is not None and n > size:
        raise ValueError(f"{field}={n} exceeds the {size} test images of {dataset}; "
                         f"use at most {size} (or {otherwise})")


class MlflowSpec(_Strict):
    tracking_uri: str = Field(min_length=1)   # file:///abs/mlruns, http://host:5000, sqlite:///...
    experiment_name: str | None = None        # default: the spec's name


class SchedulerSpec(_Strict):
    # "mo_asha": multi-objective asynchronous successive halving (orchestrator/mo_asha.py):
    # at epochs grace_period · reduction_factor^k, a trial goes on only if it ranks in the
    # top 1/reduction_factor of the trials recorded there, on the per-epoch validation
    # objectives; "none": every trial trains to its last epoch
    name: Literal["none", "mo_asha"] = "none"
    grace_period: int = Field(1, gt=0)
    reduction_factor: float = 3.0
    # a trial that none recorded at its rung dominates goes on too (false: the paper's cut alone)
    keep_nondominated: bool = True

    @field_validator("reduction_factor")
    @classmethod
    def _halves(cls, v: float) -> float:
        if v < 2:
            raise ValueError(f"reduction_factor must be ≥ 2 (each rung keeps 1/reduction_factor "
                             f"of its trials), got {v!r}; successive halving uses 2–4")
        return v


class TrackingSpec(_Strict):
    # one key per backend; a trial's runs are written by the driver (orchestrator.tracking)
    mlflow: MlflowSpec | None = None


class SweepSpec(_Strict):
    name: str = "sweep"
    dataset: str = "mnist5k"
    data_root: str | None = None
    model: str = "small_cnn"
    epochs: int = Field(3, gt=0)
    batch_size: int = Field(128, gt=0)
    train_samples: int | None = Field(None, gt=0)  # first N (seeded order) training images
    # the LAST N training images (seeded order), held out of every trial's and every base
    # model's training: clean images no classifier or detector saw, for detector thresholds
    # and validation checks; train_samples is then taken from the rest. 0 = none
    validation_samples: int = Field(256, ge=0)
    eval_samples: int | None = Field(None, gt=0)   # test images of a trial's evaluation
    # test images of the final re-evaluation (threat_model.final_eval); None: the whole test split
    final_samples: int | None = Field(None, gt=0)
    seed: int = 0
    optimizer: OptimizerSpec = OptimizerSpec()
    threat_model: ThreatSpec = ThreatSpec()
    defenses: dict[str, DefenseSpec] = Field(min_length=1)
    trials_per_defense: int = Field(2, gt=0)
    # what the fronts trade off (orchestrator.records.OBJECTIVES): clean_acc and robust_acc are
    # maximized, cost (device-seconds of a trial's training and evaluation) minimized
    objectives: list[str] = ["clean_acc", "robust_acc"]
    scheduler: SchedulerSpec = SchedulerSpec()   # early stopping of trials (default: none)
    # how the sweep's trials are shared among defenses (orchestrator.tune_adapter.DefenseRouter):
    # fixed, each its own trials; adaptive, each at least half of its own, the rest of the
    # total to the defenses that add hypervolume to the front
    allocation: Literal["fixed", "adaptive"] = "fixed"
    # which defense's trial starts when a slot frees (DefenseRouter): interleaved, in proportion
    # to the budgets; longest_first, the defense whose trials are expected to run longest
    # (from this sweep's finished and running trials, and cost_prior), so that the last wave
    # holds short trials. longest_first starts a long defense's trials close together, so its
    # study learns from fewer results before each suggestion: interleaved stays the default
    start_order: Literal["interleaved", "longest_first"] = "interleaved"
    cost_prior: str | None = None  # an earlier run's folder or trials.csv: seconds per trial
    # TPE: on SAT's 6-dimensional space (B4SAT, BENCHMARKS.md) 1.12× random's hypervolume at
    # 20 trials, NSGA-II 1.01×; on pgd_at's 2-dimensional one (B4) both ≈ random
    search: Literal["tpe", "nsga2", "random"] = "tpe"
    resources: ResourceSpec = ResourceSpec()
    max_failures: int = Field(0, ge=0)
    tracking: TrackingSpec | None = None  # experiment tracking; not part of a trial's identity

    @field_validator("defenses", mode="before")
    @classmethod
    def _expand(cls, v: Any) -> Any:
        # "all" | [names] | {name: {trials, space}} all mean the same shape
        if v == "all":
            v = registry.names()
        if isinstance(v, list):
            v = {name: {} for name in v}
        if isinstance(v, dict):
            v = {k: ({} if s is None else s) for k, s in v.items()}
            unknown = [k for k in v if k not in registry.names()]
            if unknown:
                raise ValueError(f"unknown defense {unknown[0]!r}; registered defenses: "
                                 f"{', '.join(registry.names())}")
        return v

    @field_validator("data_root")
    @classmethod
    def _absolute_root(cls, v: str | None) -> str | None:
        # trials run in Ray workers, whose working directory is not the driver's
        return None if v is None else str(Path(v).expanduser().resolve())

    @field_validator("cost_prior")
    @classmethod
    def _readable_prior(cls, v: str | None, info) -> str | None:
        if v is None:
            return None
        if info.data.get("start_order") != "longest_first":
            raise ValueError("cost_prior orders trials only with start_order: longest_first; "
                             "add it, or drop cost_prior")
        return str(Path(v).expanduser().resolve())  # read by parse: a resumed run needs it no more

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        if v not in data_lib.NAMES:
            raise ValueError(f"unknown dataset {v!r}; valid datasets: {', '.join(data_lib.NAMES)}")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v not in model_lib.NAMES:
            raise ValueError(f"unknown model {v!r}; valid models: {', '.join(model_lib.NAMES)}")
        return v

    @field_validator("eval_samples", "final_samples")
    @classmethod
    def _within_test_split(cls, v: int | None, info) -> int | None:
        _check_test_split(info.field_name, v, info.data.get("dataset"), "leave it out: all of them")
        return v

    @field_validator("threat_model")
    @classmethod
    def _curve_within_test_split(cls, v: ThreatSpec, info) -> ThreatSpec:
        _check_test_split("threat_model.curve_samples", v.curve_samples, info.data.get("dataset"),
                          "null: all of eval_samples")
        return v

    @field_validator("objectives")
    @classmethod
    def _known_distinct(cls, v: list[str]) -> list[str]:
        if (problem := objectives_problem(v)):
            raise ValueError(problem)
        return v

    @field_validator("scheduler")
    @classmethod
    def _rung_before_the_end(cls, v: SchedulerSpec, info) -> SchedulerSpec:
        epochs = info.data.get("epochs")
        if v.name != "none" and epochs is not None and v.grace_period >= epochs:
            raise ValueError(f"scheduler.grace_period={v.grace_period} must be below epochs={epochs}: "
                             "a trial is first judged after grace_period epochs")
        if v.name != "none" and info.data.get("validation_samples") == 0:
            raise ValueError(f"scheduler {v.name!r} ranks trials on the validation split, but "
                             "validation_samples is 0: give it some (e.g. 256)")
        return v

    @field_validator("resources")
    @classmethod
    def _every_rank_gets_examples(cls, v: ResourceSpec, info) -> ResourceSpec:
        batch = info.data.get("batch_size")
        if batch is not None and v.workers_per_trial > batch:
            raise ValueError(f"workers_per_trial={v.workers_per_trial} exceeds batch_size={batch}: "
                             "every worker needs a share of each batch")
        return v

    def trials_for(self, defense: str) -> int:
        return self.defenses[defense].trials or self.trials_per_defense

    def resources_for(self, defense: str) -> ResourceSpec:
        """What one trial (and one final re-evaluation) of ``defense`` holds: the spec's
        ``resources``, its GPUs scaled by the defense's GPU_SHARE under ``gpu_shares``, then
        ``defenses.<defense>.resources``. Checked for every defense by ``parse``."""
        r = self.resources
        update: dict[str, float] = {}
        if r.gpu_shares and r.gpus_per_trial > 0:
            update["gpus_per_trial"] = r.gpus_per_trial * gpu_share(defense)
        own = self.defenses[defense].resources if defense in self.defenses else None
        if own is not None:
            update.update(own.model_dump(exclude_none=True))
        if not update:
            return r
        return ResourceSpec.model_validate({**r.model_dump(), **update})

    def total_trials(self) -> int:
        return sum(self.trials_for(d) for d in self.defenses)


# The CPU presets' final cascades: AutoAttack's APGD attacks and Square, without FAB-T (FAB-T
# and Square after APGD took 0.0–0.4 more points for 2–3× the seconds on the default preset's
# adversarially trained classifiers, docs/evaluation.md). Square stays in the default: on a
# detector it attacks the whole decision, and there Square-1000 found what every gradient
# attack missed (feature squeezing, 1-bit: 82.5 % -> 69.5 % on 200 test images). The default
# preset keeps AutoAttack's 100 steps with a third of its targets; smoke, a one-minute check
# of classifiers only, half of that and no Square.
FINAL_DEFAULT = ("apgd_ce-100", "apgd_t-100x3", "square-1000")
FINAL_SMOKE = ("apgd_ce-50", "apgd_t-50x3")

PRESETS: dict[str, dict[str, Any]] = {
    # used by the integration tests: a few real trials in well under 2 minutes on 2 cores
    "smoke": {
        "name": "smoke", "dataset": "mnist5k", "model": "small_cnn", "epochs": 1,
        "train_samples": 1000, "eval_samples": 200, "batch_size": 100,
        "final_samples": 200,
        "threat_model": {"eps": 0.3, "attacks": ["fast"], "train_steps": 3, "curve_samples": 100,
                         "final_eval": list(FINAL_SMOKE)},
        "defenses": {"standard": {"trials": 2}, "pgd_at": {"trials": 2}},
    },
    # the embedded default: every registered defense, two configurations each, the front
    # re-evaluated on all 1,000 test images
    "default": {
        "name": "default", "dataset": "mnist5k", "model": "small_cnn", "epochs": 3,
        "train_samples": 2000, "eval_samples": 300, "batch_size": 100,
        # detector thresholds from 1,000 clean images: with 256, the 95th percentile's own
        # sampling noise put realized test FPRs at 5-10 % for a 5 % target (docs/detectors.md)
        "validation_samples": 1000,
        "threat_model": {"eps": 0.3, "attacks": ["fast"], "train_steps": 5, "curve_samples": 100,
                         "final_eval": list(FINAL_DEFAULT)},
        "defenses": "all", "trials_per_defense": 2,
    },
    # clusters/gpu.yaml: every registered defense on CIFAR-10 (--data-root required) with
    # PreAct ResNet-18 at L∞ ε = 8/255, SGD on fast-AT's cyclic schedule (Wong et al. 2020:
    # momentum 0.9, weight decay 5e-4, 15 epochs; lr is each space's cyclic peak), training
    # attacks under bf16 autocast, the search spaces' cifar10 entries (SPACE_BY_DATASET), one
    # GPU per trial scaled by each defense's GPU_SHARE (0.25 for the cheap ones: 4 trials on
    # one A10G), and AutoAttack "standard" on the front (1,000 test images, as RobustBench's
    # quick checks; AA-standard on all 10,000 costs ~10× that per trial)
    "cifar10": {
        "name": "cifar10", "dataset": "cifar10", "model": "preact_resnet18", "epochs": 15,
        "batch_size": 128, "eval_samples": 1000, "final_samples": 1000,
        "validation_samples": 1000,
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                      "schedule": "cyclic"},
        # PGD-10 at 2/255 a step (2.5·ε/K) for the multi-step defenses, Madry et al.'s CIFAR
        "threat_model": {"eps": 8 / 255, "attacks": ["fast"], "train_steps": 10,
                         "train_precision": "bf16", "final_eval": ["standard"]},
        "resources": {"cpus_per_trial": 1, "gpus_per_trial": 1, "gpu_shares": True},
        "defenses": "all", "trials_per_defense": 4,
    },
}


def _one_line(err: ValidationError, raw: dict[str, Any]) -> str:
    e = err.errors()[0]
    where = ".".join(str(p) for p in e["loc"]) or "spec"
    if e["type"] == "extra_forbidden":
        parent: Any = SweepSpec
        for part in e["loc"][:-1]:
            field = getattr(parent, "model_fields", {}).get(str(part))
            parent = field.annotation if field is not None else None
        valid = list(getattr(parent, "model_fields", {}) or {})
        close = difflib.get_close_matches(str(e["loc"][-1]), valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
        return f"spec error: unknown key {where!r}{hint}"
    msg = e["msg"].removeprefix("Value error, ")
    return f"spec error at {where}: {msg} (got {e.get('input')!r})" if e["type"] != "value_error" \
        else f"spec error at {where}: {msg}"


def parse(raw: dict[str, Any]) -> SweepSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"spec error: the spec must be a mapping of keys, got {type(raw).__name__}")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(_one_line(e, raw)) from None
    if spec.cost_prior:
        try:
            trial_seconds_by_defense(spec.cost_prior)  # a wrong file stops here, before Ray
        except ValueError as e:
            raise SpecError(f"spec error at cost_prior: {e}") from None
    training_images(spec)
    for defense in spec.defenses:
        check_resources_for(spec, defense)
        build_space(spec, defense)  # raises SpecError for empty/invalid spaces and values
        check_paper_preset(spec, defense)
    check_models(spec)
    return spec


def check_resources_for(spec: SweepSpec, defense: str) -> ResourceSpec:
    """``spec.resources_for(defense)``, a SpecError naming the defense if it is not valid."""
    try:
        return spec.resources_for(defense)
    except ValidationError as e:
        msg = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise SpecError(f"spec error at defenses.{defense}.resources: {msg}") from None


def check_paper_preset(spec: SweepSpec, defense: str) -> None:
    """``paper`` in the attack lists is the defense's own published evaluation: a defense that
    defines none stops the sweep here (never a silent substitute)."""
    t = spec.threat_model
    for where, names in (("attacks", t.attacks), ("final_eval", t.final_eval)):
        try:
            eval_lib.check_paper(registry.get(defense), names)
        except eval_lib.EvalConfigError as e:
            raise SpecError(f"spec error at threat_model.{where}: {e}") from None


def training_images(spec: SweepSpec) -> int:
    """How many training images a trial gets (before a defense's holdout): the first
    ``train_samples`` of what ``validation_samples`` leaves. Too few stops the sweep here."""
    total, val = data_lib.train_size(spec.dataset), spec.validation_samples
    pool = total - val
    if pool <= 0:
        raise SpecError(f"spec error at validation_samples: {val} leaves no training images "
                        f"({spec.dataset} has {total}); lower validation_samples")
    if spec.train_samples is not None and spec.train_samples > pool:
        raise SpecError(f"spec error at train_samples: {spec.train_samples} training images asked for, "
                        f"but {spec.dataset} has {total} and validation_samples={val} leaves {pool}; "
                        "lower train_samples or validation_samples")
    return spec.train_samples or pool


def check_holdout(spec: SweepSpec, defense: str) -> None:
    """A defense (or base model) keeping ``holdout_size`` training images out of training
    must be left at least one to train on."""
    holdout, n = registry.get(defense).holdout_size, training_images(spec)
    if n > holdout:
        return
    val = spec.validation_samples
    if spec.train_samples is not None:
        raise SpecError(f"spec error at train_samples: {defense} keeps {holdout} training images out "
                        f"of training for its checks, so it needs train_samples ≥ {holdout + 1}, "
                        f"got {spec.train_samples}")
    raise SpecError(f"spec error at validation_samples: {defense} keeps {holdout} training images out "
                    f"of training for its checks, so it needs ≥ {holdout + 1} left after "
                    f"validation_samples={val}; {spec.dataset} has {n + val}, so lower "
                    f"validation_samples to ≤ {n + val - holdout - 1}")


def check_models(spec: SweepSpec) -> None:
    """Each defense's architecture requirement (BatchNorm, an attention layer, ...) on the spec's
    model, built once on the CPU: a mismatch stops the sweep here instead of failing every trial."""
    classes, channels = data_lib.SHAPES[spec.dataset]
    model = model_lib.build(spec.model, classes, channels)
    for defense in spec.defenses:
        try:
            registry.get(defense).check_model(model)
        except DefenseConfigError as e:
            raise SpecError(f"spec error at model: {e}") from None


def load(path: str | Path | None = None, preset: str | None = None) -> SweepSpec:
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SpecError(f"spec file {str(p)!r} not found; pass an existing YAML file to --spec")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise SpecError(f"spec file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
        return parse(raw or {})
    name = preset or "default"
    if name not in PRESETS:
        raise SpecError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return parse(PRESETS[name])


def space_module(defense: str):
    try:
        return importlib.import_module(f"search_spaces.{defense}")
    except ModuleNotFoundError:
        raise SpecError(f"defense {defense!r} has no search space: add search_spaces/{defense}.py "
                        "defining SPACE") from None


def gpu_share(defense: str) -> float:
    """The fraction of ``resources.gpus_per_trial`` a trial of ``defense`` asks for under
    ``resources.gpu_shares``: search_spaces/<defense>.py's GPU_SHARE, else 1."""
    share = getattr(space_module(defense), "GPU_SHARE", 1.0)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise SpecError(f"search_spaces/{defense}.py: GPU_SHARE={share!r} must be a number in (0, 1]")
    return float(share)


def default_space(defense: str, dataset: str) -> tuple[dict[str, Any], str]:
    """search_spaces/<defense>.py's space for ``dataset``: its SPACE_BY_DATASET[dataset] when it
    has one (the ranges in that dataset's units: ε, learning rates of its recipe), else SPACE.
    Returns (space, where it comes from)."""
    module = space_module(defense)
    by_dataset = getattr(module, "SPACE_BY_DATASET", None) or {}
    if dataset in by_dataset:
        return by_dataset[dataset], f"search_spaces/{defense}.py SPACE_BY_DATASET[{dataset!r}]"
    return module.SPACE, f"search_spaces/{defense}.py"


def build_space(spec: SweepSpec, defense: str) -> dict[str, Any]:
    """The Tune search space of ``defense``: search_spaces/<defense>.py's (for the spec's
    dataset, ``default_space``) unless the spec gives ``space`` (both in the same plain form,
    made Tune domains by ``_domain``). Every fixed value and every range end is checked against
    the defense first."""
    override = spec.defenses[defense].space
    where = f"search_spaces/{defense}.py"
    if override is None:
        source, where = default_space(defense, spec.dataset)
    else:
        if not override:
            raise SpecError(f"spec error at defenses.{defense}.space: empty search space; give at "
                            "least one hyperparameter or drop 'space' to use the default one")
        source = override
    space = {k: _domain(defense, k, v) for k, v in source.items()}
    if not space:
        raise SpecError(f"defense {defense!r}: empty search space in {where}")
    _check_values(spec, defense, space)
    return space


def _domain(defense: str, key: str, v: Any):
    from ray import tune

    where = f"defenses.{defense}.space.{key}"
    if isinstance(v, list):
        if not v:
            raise SpecError(f"spec error at {where}: empty list of choices; give at least one value")
        return tune.choice(v)
    if isinstance(v, dict):
        if set(v) - {"low", "high", "log"} or not {"low", "high"} <= set(v):
            raise SpecError(f"spec error at {where}: a range is {{low: ..., high: ..., log: false}}")
        low, high = v["low"], v["high"]
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and low < high):
            raise SpecError(f"spec error at {where}: need numbers with low < high, got {low!r}..{high!r}")
        if v.get("log"):
            if low <= 0:
                raise SpecError(f"spec error at {where}: a log range needs low > 0, got {low}")
            return tune.loguniform(low, high)
        return tune.uniform(low, high)
    return v  # a fixed value


def _corners(space: dict[str, Any]) -> list[dict[str, Any]]:
    """Both ends of every range and every choice: enough to validate values without sampling."""
    from ray.tune.search.sample import Categorical, Float, Integer

    def values(dom: Any) -> list[Any]:
        if isinstance(dom, Categorical):
            return list(dom.categories)
        if isinstance(dom, (Float, Integer)):
            return [dom.lower, dom.upper]
        return [dom]

    keys = list(space)
    width = max((len(values(space[k])) for k in keys), default=1)
    return [{k: values(space[k])[min(i, len(values(space[k])) - 1)] for k in keys} for i in range(width)]


def split_hp(hp: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(optimizer overrides, defense hyperparameters)."""
    return ({k: v for k, v in hp.items() if k in TRAIN_KEYS},
            {k: v for k, v in hp.items() if k not in TRAIN_KEYS})


def _check_values(spec: SweepSpec, defense: str, space: dict[str, Any]) -> None:
    cls = registry.get(defense)
    for corner in _corners(space):
        train, params = split_hp(corner)
        for k, v in train.items():
            if not isinstance(v, (int, float)) or v < 0 or (k == "lr" and v == 0) or math.isnan(v):
                raise SpecError(f"spec error at defenses.{defense}.space.{k}: must be a number > 0, got {v!r}")
        try:
            params = cls.make_params(params)
            cls.check_run(params, spec.dataset, spec.model)
            request = cls.base_model(params)
        except (DefenseConfigError, TypeError) as e:
            raise SpecError(f"spec error at defenses.{defense}: {e}") from None
        if request is not None and request.defense not in registry.names():
            raise SpecError(f"defense {defense!r} needs base model {request.defense!r}, which is not "
                            f"registered; registered: {', '.join(registry.names())}")
        check_holdout(spec, defense)
        if request is not None:
            check_holdout(spec, request.defense)  # the base model trains through the same split
