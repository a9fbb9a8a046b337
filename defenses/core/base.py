"""The defense contract.

A defense is a frozen dataclass of hyperparameters (``Params``) plus a class that knows how one
training epoch runs (``train_epoch``) and how it predicts (``predict`` -> logits and, for
detectors, a per-input ``rejected`` flag). ``predictor()`` is the module attacks must attack:
what ``predict`` computes, never the bare model when the defense adds anything to it."""
from __future__ import annotations

import abc
import contextlib
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Iterator, NamedTuple

import torch
import torch.nn as nn

from defenses import attacks as attack_lib
from defenses.core.data import Dataset

if TYPE_CHECKING:
    from defenses.attacks import Attack


class DefenseConfigError(ValueError):
    """Hyperparameters or a base model a defense cannot work with; the message says why."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite: the trial is failed, not retried."""


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class ThreatModel:
    """L∞ threat model in input units (images in [0,1]). ``attacks`` are evaluated as a
    worst case per example; ``train_steps``/``train_step_size`` configure training attacks."""

    eps: float
    attacks: tuple[str, ...] = ("fgsm", "pgd-20")
    norm: str = "Linf"
    train_steps: int = 10
    train_step_size: float | None = None  # None: 2.5·ε/K (Madry et al.)
    # precision of the training attack's forward/backward passes (the weight update stays fp32):
    # "bf16"/"fp16" run them under autocast, ~2× faster on CPUs with bf16 units and on GPUs
    train_precision: str = "fp32"
    # fraction of clean inputs a detector may reject: detectors set their threshold at it on
    # the validation split (images no classifier or detector trained on)
    fpr: float = 0.05

    def __post_init__(self) -> None:
        if self.train_precision not in PRECISIONS:
            raise ValueError(f"train_precision={self.train_precision!r}; valid: {', '.join(PRECISIONS)}")
        if not (isinstance(self.fpr, (int, float)) and 0.0 < self.fpr <= 0.5):
            raise ValueError(f"fpr must be in (0, 0.5], got {self.fpr!r}")

    @property
    def attack_dtype(self) -> "torch.dtype | None":
        """The autocast dtype of training attacks; None: full precision."""
        return PRECISIONS[self.train_precision]

    @property
    def step_size(self) -> float:
        if self.train_step_size is not None:
            return self.train_step_size
        return 2.5 * self.eps / max(self.train_steps, 1)


@dataclasses.dataclass(frozen=True)
class NoParams:
    """For defenses with no hyperparameters of their own."""


@dataclasses.dataclass(frozen=True)
class BaseModelRequest:
    """A trained model a defense starts from (SAD's Φ⁰, a teacher, a guarded classifier):
    the orchestrator trains it once per (dataset, model, recipe, seed) and passes its path."""

    defense: str
    epochs: int | None = None  # None: the trial's own epoch count
    params: tuple[tuple[str, Any], ...] = ()


class Prediction(NamedTuple):
    logits: torch.Tensor
    rejected: torch.Tensor | None = None  # bool per input, for detectors


class Defense(abc.ABC):
    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    holdout_size: ClassVar[int] = 0  # training examples kept out of training for end_epoch checks
    stop_training: bool = False  # set by end_epoch to stop early (e.g. a collapse was seen)

    def __init__(self, model: nn.Module, params: Any, threat: ThreatModel):
        self.model = model
        self.params = params
        self.threat = threat

    # --- configuration -------------------------------------------------------------------
    @classmethod
    def make_params(cls, hp: dict[str, Any]) -> Any:
        """Hyperparameter dict -> frozen dataclass; unknown names are an error."""
        fields = {f.name for f in dataclasses.fields(cls.Params)}
        unknown = sorted(set(hp) - fields)
        if unknown:
            raise DefenseConfigError(
                f"defense {cls.name!r} has no hyperparameter {', '.join(map(repr, unknown))}; "
                f"valid: {', '.join(sorted(fields)) or '(none)'}")
        params = cls.Params(**hp)
        cls.validate(params)
        return params

    @classmethod
    def validate(cls, params: Any) -> None:
        """Raise DefenseConfigError for values the defense cannot use (checked before Ray)."""

    @classmethod
    def base_model(cls, params: Any) -> BaseModelRequest | None:
        return None

    @classmethod
    def check_run(cls, params: Any, dataset: str, model: str) -> None:
        """Raise DefenseConfigError when ``params`` cannot serve a sweep on this dataset and
        model (e.g. a saved detector trained for another classifier); checked before Ray."""

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        """Raise DefenseConfigError when the defense cannot work on this architecture (e.g. SAD
        without BatchNorm, Grad-CAM without an attention layer); checked before Ray starts."""

    # --- training ------------------------------------------------------------------------
    def setup(self, data: Dataset, base_checkpoint: Path | None) -> None:
        """Called once before training (load a base model, cache teacher saliency, ...)."""

    @abc.abstractmethod
    def train_epoch(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, epoch: int,
                    scheduler: Any | None = None) -> dict[str, float]:
        """Run one epoch over ``batches``; return metrics such as ``loss``."""

    def end_epoch(self, epoch: int, holdout: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, float]:
        """Per-epoch checks after training (e.g. catastrophic-overfitting guard)."""
        return {}

    def finalize(self) -> None:
        """After the last epoch (e.g. restore the best checkpoint)."""

    def flags(self) -> dict[str, bool]:
        """Named warnings that go into the trial record as ``flag.<name>``."""
        return {}

    # the ``flags()`` after which a trial's numbers are not to be used (e.g. FGSM-RS's
    # catastrophic overfitting): the dashboard shows them in red, other flags in yellow
    severe_flags: ClassVar[frozenset[str]] = frozenset()

    def state_dict(self) -> dict[str, Any]:
        """Defense-specific state to checkpoint with the model (for resuming)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # --- prediction ------------------------------------------------------------------------
    def predictor(self) -> nn.Module:
        """The module whose logits ``predict`` returns; the one attacks differentiate."""
        return self.model

    def predict(self, x: torch.Tensor) -> Prediction:
        return Prediction(self.predictor()(x))

    def surrogate(self) -> nn.Module | None:
        """The model the gradient-masking checks' transfer attack crafts on: the bare model
        when the prediction wraps it (preprocessing, a saliency step), else none (a transfer
        from the attacked model itself is no check)."""
        return self.model if self.predictor() is not self.model else None

    def adaptive_attacks(self, eps: float) -> list["Attack"]:
        """Attacks built for this defense specifically (BPDA, full differentiation through a
        saliency step, EOT, detector-aware, transfer from a base model). ``benchmark`` adds
        them to the cascade, so robust accuracy is the worst case over them too. Each is a
        ``defenses.attacks.Attack`` whose output is judged by ``predict``."""
        return []

    def evaluation_metrics(self, x: torch.Tensor, y: torch.Tensor, attacks: "list[Attack]",
                           batch_size: int = 256) -> dict[str, float]:
        """Numbers beyond clean/robust accuracy that the evaluation of (x, y) under ``attacks``
        (the primary ε's cascade) should report, e.g. a detector's FPR and detection rates;
        they become the record's ``metric.*`` columns. None by default."""
        return {}

    def blackbox_attack(self, eps: float, queries: int) -> "Attack":
        """The gradient-free attack the gradient-masking checks run on the points still robust
        after the cascade (its breaks count): Square on ``predictor()``. A defense whose
        decision is more than those logits (a detector's rejection) attacks that decision."""
        return attack_lib.make(f"square-{queries}", self.predictor(), eps)

    def paper_attacks(self, eps: float) -> "list[str | Attack] | None":
        """The attacks of the defense's own paper (the evaluation's ``paper`` preset), as
        attack names and built ``Attack``s at radius ``eps``; None: this defense defines no
        paper setting, and asking for ``paper`` is an error."""
        return None


# The running loss is checked for NaN/inf every this many steps and at the end of the epoch,
# not after every step: each check waits for the GPU (a device-to-host copy). A non-finite loss
# makes non-finite weights, so every later loss and the running sum stay non-finite: the check
# still catches it, at most this many steps later.
DIVERGENCE_CHECK_STEPS = 32


def check_finite(total: torch.Tensor, epoch: int) -> None:
    if not torch.isfinite(total):
        raise TrainingDiverged(f"training loss became {total.item()} at epoch {epoch}")


class LossDefense(Defense):
    """A defense trained by gradient descent on a per-batch loss: the common case."""

    @abc.abstractmethod
    def loss(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        """Training loss of one batch (the model is in train mode)."""

    def train_epoch(self, batches, optimizer, epoch, scheduler=None):
        total = torch.zeros((), device=next(self.model.parameters()).device)
        n = 0
        for step, (x, y) in enumerate(batches, start=1):
            self.model.train()
            loss = self.loss(x, y, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += loss.detach() * len(y)
            n += len(y)
            if step % DIVERGENCE_CHECK_STEPS == 0:
                check_finite(total, epoch)
        check_finite(total, epoch)
        return {"loss": (total / max(n, 1)).item()}


def predict_labels(defense: Defense, x: torch.Tensor, batch_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax of ``defense.predict``, rejected) for every input, batched, under no_grad."""
    preds, rejected = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits, rej = defense.predict(x[i:i + batch_size])
            preds.append(logits.argmax(1))
            rejected.append(rej if rej is not None else torch.zeros_like(preds[-1], dtype=torch.bool))
    return torch.cat(preds), torch.cat(rejected)


@contextlib.contextmanager
def cudnn_mode(benchmark: bool, deterministic: bool) -> Iterator[None]:
    """cuDNN's autotuner and determinism for a block, restored after (no effect on the CPU).
    Training has fixed shapes, where ``benchmark`` picks the fastest kernels once; an
    evaluation attacks shrinking subsets of the points (a new shape at every cascade step),
    where autotuning each shape costs more than it saves, and its ``deterministic`` kernels
    keep a defense whose prediction takes an input gradient (SAD, the Grad-CAM detector, JSD)
    from flipping near-tie labels between two runs of the same checkpoint."""
    before = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, deterministic
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before
