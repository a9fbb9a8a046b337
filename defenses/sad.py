"""SAD: Saliency Adversarial Defense without adversarial training (Algorithm 1 of the paper).

No weight is trained: from a trained Φ⁰, each training batch is pushed along Φ⁰'s raw input
gradient (x_adv = clip(x + ε·δ⁰)) and then along its saliency (x_sadv = clip(x_adv + η·S⁰)),
and only the BatchNorm statistics are re-estimated on x_sadv (AdaBN), giving Φ¹. Inference:
argmax Φ¹(clip(x̂ + η·S¹(x̂))). Variants ``full``, ``no_bn`` (Table 5), ``bn_adv`` (Section 4.6).
The choices the paper leaves open (η at test time, clipping, BN averaging, ``bn_samples``, the
step ε) and the results: docs/sad.md."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import numbers
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from defenses.core import data as data_lib
from defenses.core import models as model_lib
from defenses.attacks import PGD, Attack, frozen_eval, make, strongest_steps
from defenses.attacks.adaptive import BPDA, EOTPGD, gaussian_noise, transfer_pgd
from defenses.attacks.external import TorchAttacks, torchattacks
from defenses.core.base import BaseModelRequest, Defense, DefenseConfigError, Prediction

log = logging.getLogger(__name__)

BASES = ("standard", "trades")
NORMALIZATIONS = ("none", "linf", "rms")
VARIANTS = ("full", "no_bn", "bn_adv")
SQUARE_PER_STEP = 5       # Square queries per adaptive PGD step (pgd-20 -> square-100)
EOT_SIGMA = 1 / 3         # σ of the EOT-PGD noise, as a fraction of ε (MNIST 0.3 -> 0.1)
EOT_ADAPTIVE_SAMPLES = 4  # noise samples per step of the adaptive EOT-PGD (K steps × 4 gradients)
SALIENCY_STEP = "saliency_step"  # the predictor's preprocessing submodule (bypassed by BPDA)


# --- the two public building blocks -------------------------------------------------------------
def saliency(model: nn.Module, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """S(x) = ∂Φ_{i*}/∂x with i* = argmax Φ(x): raw logit gradient, same shape as x (Eq. 2).

    Examples are independent (the batch sum is differentiated), so ``model`` must be in eval
    mode. With ``create_graph`` and an ``x`` that is part of a graph (an attack's x + δ), S stays
    differentiable with respect to x (double backprop); otherwise it is a detached tensor."""
    with torch.enable_grad():
        inp = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        logits = model(inp)
        score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
        grad, = torch.autograd.grad(score, inp, create_graph=create_graph)
    return grad


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def adapt_bn(model: nn.Module, batches: Iterable[torch.Tensor], momentum: float | None = None) -> int:
    """Re-estimate the BatchNorm running statistics of ``model`` on ``batches`` (AdaBN).

    Only the BN layers run in training mode (every other module stays in eval mode, so e.g.
    dropout does not disturb the statistics) and nothing is differentiated: weights and BN
    affine parameters are untouched. ``momentum=None``: statistics are reset, then the
    cumulative average of the per-batch statistics (each batch weighted equally). A float:
    exponential average with that momentum, starting from the current statistics. Modes and
    momenta are restored after. Returns the number of batches seen."""
    bns = _batchnorms(model)
    if not bns:
        raise ValueError(f"adapt_bn: {type(model).__name__} has no BatchNorm layer")
    if any(not bn.track_running_stats for bn in bns):
        raise ValueError(f"adapt_bn: a BatchNorm layer of {type(model).__name__} tracks no running statistics")
    if momentum is not None and not 0.0 < momentum <= 1.0:
        raise ValueError(f"adapt_bn: momentum={momentum} must be in (0, 1] or None")
    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise ValueError("adapt_bn: no batches; the statistics were left as they were")
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(bn, bn.momentum) for bn in bns]
    n = 0
    try:
        model.eval()
        for bn in bns:
            if momentum is None:
                bn.reset_running_stats()
            bn.momentum = momentum
            bn.train()
        with torch.no_grad():
            for x in itertools.chain([first], it):
                model(x)
                n += 1
    finally:
        for m, mode in modes:
            m.training = mode
        for bn, mom in momenta:
            bn.momentum = mom
    return n


def normalize_map(s: torch.Tensor, how: str) -> torch.Tensor:
    """Per-example scaling of a saliency map: ``none`` (raw, the paper), ``linf`` (max |S| = 1,
    so η is the largest pixel change), ``rms`` (root mean square 1)."""
    if how == "none":
        return s
    flat = s.flatten(1)
    scale = flat.abs().amax(1) if how == "linf" else flat.pow(2).mean(1).sqrt()
    return s / scale.clamp_min(1e-12).view(-1, *([1] * (s.dim() - 1)))


# --- the defended predictor ---------------------------------------------------------------------
class SaliencyStep(nn.Module):
    """x -> clip(x + η·S(x), 0, 1) with S the (normalized) saliency of ``model``."""

    def __init__(self, model: nn.Module, ratio: float, normalize: str, create_graph: bool):
        super().__init__()
        self.model = model
        self.ratio, self.normalize, self.create_graph = ratio, normalize, create_graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ratio == 0:
            return x  # η = 0 is the bare model exactly, not x + 0·S
        s = normalize_map(saliency(self.model, x, self.create_graph), self.normalize)
        return (x + self.ratio * s).clamp(0.0, 1.0)


class SADPredictor(nn.Module):
    """Φ¹(SaliencyStep(x)). With ``create_graph=False`` S is a constant for autograd (what a
    naive attack on the prediction sees); with ``True`` attacks differentiate through S too."""

    def __init__(self, model: nn.Module, ratio: float, normalize: str, create_graph: bool = False):
        super().__init__()
        self.saliency_step = SaliencyStep(model, ratio, normalize, create_graph)
        self.classifier = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.saliency_step(x))


# --- hyperparameters ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SADParams:
    ratio: float = 0.8                # η, the hybridization ratio (both stages)
    step: float | None = None         # ε of x_adv = x + ε·δ⁰ (raw gradient); None: threat ε
    base: str = "standard"            # Φ⁰: "standard", or "trades" for AT+SAD
    normalize: str = "none"           # saliency scaling: none | linf | rms
    variant: str = "full"             # full | no_bn (Table 5) | bn_adv (BN on x_adv, no saliency)
    bn_momentum: float | None = None  # None: AdaBN reset + cumulative average; float: EMA
    bn_samples: int | None = 256      # training images in the BN pass; None: all (Algorithm 1)


def _check_choice(name: str, value: object, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise DefenseConfigError(f"sad: {name}={value!r} is not one of {', '.join(valid)}")


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class SAD(Defense):
    name = "sad"
    Params = SADParams

    def __init__(self, model, params, threat):
        super().__init__(model, params, threat)
        self.base: nn.Module | None = None   # Φ⁰, frozen: source of δ⁰, S⁰ and the transfer attack
        self.adapted = False
        self._predictors: dict[bool, SADPredictor] = {}

    # --- configuration ---------------------------------------------------------------------
    @classmethod
    def validate(cls, params: SADParams) -> None:
        if not _is_number(params.ratio) or params.ratio < 0:
            raise DefenseConfigError(f"sad: ratio={params.ratio!r} must be a finite number ≥ 0")
        if params.step is not None and (not _is_number(params.step) or params.step <= 0):
            raise DefenseConfigError(f"sad: step={params.step!r} must be a number > 0 (or None: the threat ε)")
        _check_choice("base", params.base, BASES)
        _check_choice("normalize", params.normalize, NORMALIZATIONS)
        _check_choice("variant", params.variant, VARIANTS)
        m = params.bn_momentum
        if m is not None and (not _is_number(m) or not 0.0 < m <= 1.0):
            raise DefenseConfigError(f"sad: bn_momentum={m!r} must be in (0, 1] or None (cumulative)")
        k = params.bn_samples
        if k is not None and (not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1):
            raise DefenseConfigError(f"sad: bn_samples={k!r} must be an integer ≥ 1 or None (whole training set)")

    @classmethod
    def base_model(cls, params: SADParams) -> BaseModelRequest:
        return BaseModelRequest(defense=params.base)

    @property
    def uses_saliency(self) -> bool:
        """Whether inference adds a saliency map (the ablation bn_adv and η = 0 do not)."""
        return self.params.variant != "bn_adv" and self.params.ratio > 0

    @property
    def updates_bn(self) -> bool:
        return self.params.variant != "no_bn"

    @property
    def step_size(self) -> float:
        return self.params.step if self.params.step is not None else self.threat.eps

    # --- setup: Φ⁰ from the base checkpoint -------------------------------------------------------
    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        """DefenseConfigError unless ``model`` has BatchNorm layers (SAD re-estimates them)."""
        if not model_lib.has_batchnorm(model):
            raise DefenseConfigError(
                f"sad: model {type(model).__name__} has no BatchNorm layer; SAD re-estimates "
                "BN statistics, so it needs a model with BatchNorm (e.g. small_cnn, preact_resnet18)")

    def setup(self, data, base_checkpoint: Path | None) -> None:
        self.check_model(self.model)
        state = self._load_checkpoint(base_checkpoint)
        meta = state["meta"]
        self._check_meta(meta, data)
        base = model_lib.build(meta["model"], meta["num_classes"], meta["in_channels"])
        if type(base) is not type(self.model):
            raise DefenseConfigError(f"sad: incompatible base checkpoint: its model is {meta['model']!r} "
                                     f"({type(base).__name__}), this trial's is {type(self.model).__name__}")
        try:
            self.model.load_state_dict(state["model"])
            base.load_state_dict(state["model"])
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise DefenseConfigError(f"sad: base checkpoint {base_checkpoint} does not fit the model: {first}") from None
        self.base = base.to(next(self.model.parameters()).device).eval().requires_grad_(False)
        self._predictors.clear()
        log.info("sad: Φ⁰ loaded from %s (%s on %s)", base_checkpoint, meta["defense"], meta["dataset"])

    @staticmethod
    def _load_checkpoint(path: Path | None) -> dict:
        if path is None:
            raise DefenseConfigError("sad: no base checkpoint given; SAD starts from a trained Φ⁰ "
                                     "(base_model() asks the orchestrator for one)")
        path = Path(path)
        if not path.is_file():
            raise DefenseConfigError(f"sad: base checkpoint {str(path)!r} not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: say which, in one line
            raise DefenseConfigError(f"sad: base checkpoint {str(path)!r} is unreadable "
                                     f"({type(e).__name__})") from None
        if not isinstance(state, dict) or not {"model", "meta"} <= set(state) \
                or not isinstance(state["meta"], dict):
            raise DefenseConfigError(f"sad: base checkpoint {str(path)!r} has no 'model'/'meta' entries")
        return state

    def _check_meta(self, meta: dict, data) -> None:
        expect = {"dataset": data.name, "num_classes": data.num_classes,
                  "in_channels": data.in_channels, "defense": self.params.base}
        for key, want in expect.items():
            if meta.get(key) != want:
                raise DefenseConfigError(f"sad: incompatible base checkpoint: its {key} is "
                                         f"{meta.get(key)!r}, this trial needs {want!r}")
        if meta.get("model") not in model_lib.NAMES:
            raise DefenseConfigError(f"sad: incompatible base checkpoint: unknown model {meta.get('model')!r}")

    # --- "training": one BN re-estimation pass -------------------------------------------------
    def bn_input(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch whose statistics Φ¹ takes: x_sadv (full), x_adv (bn_adv), all under Φ⁰."""
        assert self.base is not None, "setup() loads Φ⁰ first"
        with torch.enable_grad():
            inp = x.detach().requires_grad_(True)
            # summed loss: each example's gradient is its own ∂ℓ(x_n, y_n)/∂x_n (Eq. 3)
            delta, = torch.autograd.grad(F.cross_entropy(self.base(inp), y, reduction="sum"), inp)
        x_adv = (x + self.step_size * delta).clamp(0.0, 1.0)
        if self.params.variant == "bn_adv" or self.params.ratio == 0:
            return x_adv
        s = normalize_map(saliency(self.base, x_adv), self.params.normalize)
        return (x_adv + self.params.ratio * s).clamp(0.0, 1.0)

    def train_epoch(self, batches, optimizer, epoch, scheduler=None):
        # one pass gives the statistics; further epochs would only repeat it at full cost
        self.stop_training = True
        if self.adapted or not self.updates_bn:
            self.adapted = True
            return {"bn_batches": 0.0}
        shift = _ShiftMeter()
        batches = _take(batches, self.params.bn_samples)
        n = adapt_bn(self.model, shift.track(self, batches), momentum=self.params.bn_momentum)
        self.adapted = True
        return {"bn_batches": float(n), **shift.metrics()}

    def state_dict(self):
        return {"adapted": self.adapted}

    def load_state_dict(self, state):
        self.adapted = bool(state.get("adapted", False))

    # --- prediction -------------------------------------------------------------------------------
    def _predictor(self, create_graph: bool) -> SADPredictor:
        if create_graph not in self._predictors:
            ratio = self.params.ratio if self.uses_saliency else 0.0
            self._predictors[create_graph] = SADPredictor(self.model, ratio, self.params.normalize,
                                                          create_graph)
        return self._predictors[create_graph]

    def predictor(self) -> nn.Module:
        """Φ¹(clip(x + η·S¹(x))) with S¹ detached: what a plain attack on the prediction sees."""
        return self._predictor(create_graph=False)

    def differentiable_predictor(self) -> nn.Module:
        """The same function, with S¹ differentiable in x (double backprop through the step)."""
        return self._predictor(create_graph=True)

    def predict(self, x: torch.Tensor) -> Prediction:
        # eval mode whatever the caller left: a train-mode saliency pass would move BN statistics
        with frozen_eval(self.model):
            return Prediction(self.predictor()(x).detach())

    def adaptive_steps(self) -> int:
        """Steps of the adaptive PGD attacks: those of the strongest iterative attack of the
        threat model (pgd-20 -> 20), so asking for stronger attacks strengthens them too."""
        return strongest_steps(self.threat.attacks)

    def adaptive_attacks(self, eps: float) -> list[Attack]:
        """Cheapest first, so the costly ones only see what survives: transfer PGD-K from Φ⁰;
        when inference adds a saliency map, BPDA PGD-K (the saliency step is the identity on
        the backward pass) and PGD-K through the fully differentiable step (double backprop);
        then Square with 5·K queries (black-box); then, with a saliency step, EOT-PGD: K steps,
        each on the gradient averaged over ``EOT_ADAPTIVE_SAMPLES`` Gaussian-noise copies
        (σ = ε/3) of the input. K: ``adaptive_steps()``.

        SAD itself is deterministic; the noise of the EOT attack is the attacker's: averaging
        the gradient over a neighbourhood smooths the jumps of the piecewise-constant saliency
        step, which no pointwise gradient sees past (on AT+SAD it breaks more than every other
        attack, docs/sad.md). It is ``paper_attacks``' EOT-PGD at the adaptive budget (K steps,
        4 samples instead of 12 × 32), last because each step costs 4 gradients. On a ReLU
        network S(x) is piecewise constant, so double backprop adds a zero term and the
        differentiable attack follows the same gradient as plain PGD on ``predictor()``."""
        k = self.adaptive_steps()
        attacks: list[Attack] = []
        if self.base is not None:
            attacks.append(transfer_pgd(self.base, eps, steps=k))
        if self.uses_saliency:
            attacks.append(BPDA(self.predictor(), eps, step=SALIENCY_STEP, steps=k))
            full = PGD(self.differentiable_predictor(), eps, steps=k)
            full.name = f"diff-{full.name}"
            attacks.append(full)
        attacks.append(make(f"square-{SQUARE_PER_STEP * k}", self.predictor(), eps))
        if self.uses_saliency:
            attacks.append(self.eot_attack(eps, steps=k, samples=EOT_ADAPTIVE_SAMPLES))
        return attacks

    def eot_attack(self, eps: float, steps: int, samples: int) -> EOTPGD:
        """EOT-PGD on ``predictor()`` over Gaussian input noise σ = ``EOT_SIGMA``·ε."""
        return EOTPGD(self.predictor(), eps, steps=steps, samples=samples,
                      transform=gaussian_noise(EOT_SIGMA * eps))

    def paper_attacks(self, eps: float, eot_samples: int = 32) -> list[Attack]:
        """The paper's white-box attacks (Section 4.2) scaled to the threat model: its
        StrongPGD (k=20) is at ε and WeakPGD (k=20) at ε/2 (8/255 and 4/255 on CIFAR); C&W-L2
        with c=0.2 (projected onto the L∞ ball); its EOT-PGD "APGD" with k=12 and 32 samples,
        at ε rather than 1.5·ε (the threat model's bound), the samples drawn as Gaussian noise
        σ = ε/3 because SAD itself has no randomness to average over."""
        pred = self.predictor()
        weak = _Budgeted(PGD(pred, eps / 2, steps=20), eps, "weak_pgd-20")
        cw = TorchAttacks(pred, eps, "cw_c0.2-50",
                          lambda m, e: torchattacks.CW(m, c=0.2, kappa=0.0, steps=50, lr=0.01))
        return [weak, PGD(pred, eps, steps=20), cw, self.eot_attack(eps, steps=12, samples=eot_samples)]


class _Budgeted(Attack):
    """An attack of a smaller radius counted in the threat model's ε (the paper's WeakPGD)."""

    def __init__(self, attack: Attack, eps: float, name: str):
        if attack.eps > eps:
            raise ValueError(f"{name}: radius {attack.eps:g} exceeds the threat model's ε={eps:g}")
        super().__init__(attack.model, eps)
        self.attack, self.name = attack, name

    def forward(self, images, labels):
        return self.attack(images, labels)


def _take(batches, limit: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``limit`` examples of ``batches`` (all of them for None), counted on the
    global batches: in a data-parallel trial every rank takes its part of the same first
    ``limit`` (possibly none of the last batch: it still joins the synchronized forward),
    so the ranks run the same number of passes and see what one process would."""
    seen = 0
    for x, y in batches:
        if limit is not None and seen >= limit:
            return
        offset, total = data_lib.shard_position(len(y), x.device)
        take = total if limit is None else min(total, limit - seen)
        seen += take
        keep = max(0, min(len(y), take - offset))
        yield x[:keep], y[:keep]


class _ShiftMeter:
    """How far the BN pass moved the images: mean |x_in − x| and max per-pixel change."""

    def __init__(self):
        self.abs_sum, self.linf, self.count = 0.0, 0.0, 0

    def track(self, defense: SAD, batches) -> Iterator[torch.Tensor]:
        for x, y in batches:
            x_in = defense.bn_input(x, y)
            diff = (x_in - x).abs()
            self.abs_sum += float(diff.sum())
            self.linf = max(self.linf, float(diff.max()))
            self.count += diff.numel()
            yield x_in

    def metrics(self) -> dict[str, float]:
        return {"shift_mean_abs": self.abs_sum / max(self.count, 1), "shift_linf": self.linf}
