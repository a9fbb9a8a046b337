"""SAT: saliency-based adversarial training (Mangla, Singh & Balasubramanian, ECML-PKDD 2020).

A teacher's saliency map s of each training image, for its true class, steers the training
perturbation: each element of δᵗ is random ±1 with probability αᵗ and −s otherwise (Eq. 9),
and the student trains on clip(x + ε₀·δᵗ); ``pgd_sat`` / ``trades_sat`` replace half of each
batch by PGD / TRADES examples (Section 4.1). Maps are computed once per (teacher, method,
normalization, training set) and cached next to the teacher checkpoint.
The reading of the paper, where the authors' code differs and the results: docs/sat.md."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from defenses.core import cache
from defenses.core import data as data_lib
from defenses.core import models as model_lib
from defenses.saliency import maps as saliency
from defenses.attacks import Attack, pgd
from defenses.attacks.pgd import random_start
from defenses.core.base import BaseModelRequest, DefenseConfigError, LossDefense
from defenses.trades import kl_adversarial, trades_loss

log = logging.getLogger(__name__)

TEACHERS = ("standard", "pgd_at")
VARIANTS = ("sat", "pgd_sat", "trades_sat")
NORMALIZATIONS = ("sign", "max_abs")

# name -> saliency function(model, x, target, **kwargs); looked up at call time
METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "gradient": saliency.gradient,
    "guided_backprop": saliency.guided_backprop,
    "smoothgrad": saliency.smoothgrad,
    "integrated_gradients": saliency.integrated_gradients,
    "grad_cam_pp_box": saliency.grad_cam_pp_box,
}
# Fixed settings of each method (part of the cache key). SmoothGrad's σ = 15 % of the input
# range and 16 samples, IG's 16 Gauss-Legendre nodes from a black image: the papers' usual
# choices, kept small because each sample costs a full forward/backward over the training set.
METHOD_KWARGS: dict[str, dict[str, Any]] = {
    "gradient": {},
    "guided_backprop": {},
    "smoothgrad": {"samples": 16, "noise_level": 0.15},
    "integrated_gradients": {"steps": 16, "baseline": 0.0},
    "grad_cam_pp_box": {"threshold": 0.15},
}
CACHE_VERSION = 1
MAP_BATCH = 256  # images per saliency computation


@dataclasses.dataclass(frozen=True)
class SATParams:
    alpha: float = 0.6 ** 0.1      # α of Eq. 9 (the paper's (0.6)^(1/10))
    eps0: float = 8 / 255          # ε₀ of Algorithm 1 (the paper's CIFAR value)
    teacher: str = "pgd_at"        # "standard" (Std) or "pgd_at" (Adv) teacher
    method: str = "guided_backprop"
    variant: str = "sat"           # "sat" | "pgd_sat" | "trades_sat"
    normalization: str = "sign"    # how a map becomes s ∈ [-1,1]^d
    beta: float = 6.0              # TRADES β (trades_sat only)


# --- Eq. 9 and Algorithm 1 ------------------------------------------------------------------
def saliency_noise(s: torch.Tensor, alpha: float, epoch: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """δ of Eq. 9: per element a uniform random ±1 with probability αᵗ (t = ``epoch``), else
    −s. Takes α in [0, 1] (α = 0 gives exactly −s for t ≥ 1). One uniform draw u per element
    decides both: random iff u < αᵗ, and then −1 iff u < αᵗ/2 (a fair coin given u < αᵗ)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"saliency_noise: alpha={alpha} must be in [0, 1]")
    if epoch < 0:
        raise ValueError(f"saliency_noise: epoch={epoch} must be ≥ 0")
    p = alpha ** epoch
    device = generator.device if generator is not None else s.device
    u = torch.rand(s.shape, generator=generator, device=device).to(s.device)
    z = torch.where(u < p / 2, -1.0, 1.0).to(s.dtype)
    return torch.where(u < p, z, -s)


def sat_examples(x: torch.Tensor, s: torch.Tensor, alpha: float, epoch: int, eps0: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Algorithm 1's training input: clip(x + ε₀·δᵗ, 0, 1) with δᵗ from ``saliency_noise``.
    With s ∈ [-1,1]^d every entry moves by at most ε₀."""
    delta = saliency_noise(s, alpha, epoch, generator)
    return (x + eps0 * delta).clamp_(0.0, 1.0).detach()


# --- saliency maps of a training set ---------------------------------------------------------
def normalize_maps(m: torch.Tensor, normalization: str) -> torch.Tensor:
    """Raw maps (N, ...) -> s ∈ [-1,1]: ``sign`` or per-image ``max_abs`` (see module doc)."""
    if normalization == "sign":
        return torch.sign(m)
    if normalization == "max_abs":
        peak = m.flatten(1).abs().amax(1).view(-1, *([1] * (m.dim() - 1)))
        return torch.where(peak > 0, m / peak.clamp_min(torch.finfo(m.dtype).tiny), torch.zeros_like(m))
    raise ValueError(f"unknown normalization {normalization!r}; valid: {', '.join(NORMALIZATIONS)}")


def compute_maps(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str,
                 normalization: str, batch_size: int = MAP_BATCH) -> torch.Tensor:
    """Normalized ground-truth-class maps of every image of (x, y) (images float in [0,1] or
    uint8), as float16 on the teacher's device (exact for ±1/0 maps, 1e-3 relative otherwise).
    The teacher is evaluated in eval mode; SmoothGrad noise comes from a seeded generator so
    a cached map is reproducible."""
    device = next(teacher.parameters()).device
    fn, kwargs = METHODS[method], dict(METHOD_KWARGS[method])
    if method == "smoothgrad":
        kwargs["generator"] = torch.Generator(device=device).manual_seed(0)
    teacher.eval()
    out = []
    for i in range(0, len(y), batch_size):
        xb = data_lib.as_float(x[i:i + batch_size], device)
        yb = y[i:i + batch_size].to(device)
        out.append(normalize_maps(fn(teacher, xb, yb, **kwargs), normalization).half())
    return torch.cat(out)


def cache_path(checkpoint: Path, method: str, normalization: str, data_digest: str) -> Path:
    """Where the maps of (teacher checkpoint, method + settings, normalization, training set)
    live: next to the checkpoint. The teacher enters by its file's content, so a retrained
    teacher at the same path never reuses stale maps."""
    key = {"version": CACHE_VERSION, "teacher": cache.file_digest(checkpoint), "method": method,
           "kwargs": METHOD_KWARGS[method], "normalization": normalization, "data": data_digest}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return checkpoint.parent / f"sat-saliency-{method}-{normalization}-{digest}.pt"


def cached_maps(path: Path, shape: torch.Size, compute: Callable[[], torch.Tensor],
                device: torch.device) -> torch.Tensor:
    """The maps at ``path``, or ``compute()``'s stored there once (``defenses.core.cache``);
    maps of another shape are computed again. Returns them on ``device``."""
    return cache.cached_state(path, lambda: {"maps": compute()}, device,
                              valid=lambda state: state["maps"].shape == shape)["maps"]


class TrainingSetIndex:
    """Finds each batch image's row of the training set: batches carry no indices, and each
    image has its own fixed map. A seeded random projection (plus the label) is matched by
    nearest neighbour, then checked for exact equality, so a foreign or augmented image is an
    error rather than a silently wrong map."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, device: torch.device, dims: int = 8,
                 chunk: int = 2048):
        self.x, self.y = x, y
        gen = torch.Generator().manual_seed(0)
        self.proj = torch.randn(x[0].numel(), dims, generator=gen, dtype=torch.float64).to(device)
        self.keys = torch.cat([self._key(data_lib.as_float(x[i:i + chunk], device),
                                         y[i:i + chunk].to(device))
                               for i in range(0, len(y), chunk)])

    def _key(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # projections are O(10); the label column keeps equal images of different labels apart
        return torch.cat([x.flatten(1).double() @ self.proj, 1e4 * y[:, None].double()], 1)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        idx = torch.cdist(self._key(x, y), self.keys).argmin(1)
        host = idx.to(self.x.device)
        same = (data_lib.as_float(self.x[host], x.device) == x).flatten(1).all(1)
        same &= self.y[host].to(y.device) == y
        if not bool(same.all()):
            raise RuntimeError("sat: a training batch holds images that are not in the training set "
                               "its saliency maps were computed for (augmented or foreign data); SAT "
                               "needs the fixed map of each training image")
        return idx


# --- the defense -----------------------------------------------------------------------------
def _load_teacher(path: Path, params: SATParams, data: data_lib.Dataset,
                  student: nn.Module, device: torch.device) -> nn.Module:
    state = torch.load(path, map_location=device, weights_only=True)
    meta = state.get("meta", {})
    student_arch = type(getattr(student, "module", student)).__name__
    try:
        teacher = model_lib.build(meta.get("model", "?"), meta.get("num_classes", data.num_classes),
                                  meta.get("in_channels", data.in_channels))
    except model_lib.ModelError as e:
        raise DefenseConfigError(f"sat: teacher checkpoint {path}: {e}") from None
    found = (meta.get("dataset"), type(teacher).__name__, meta.get("num_classes"), meta.get("in_channels"))
    wanted = (data.name, student_arch, data.num_classes, data.in_channels)
    if found != wanted:
        raise DefenseConfigError(
            f"sat: teacher checkpoint {path} is a {found[1]} for {found[0]} ({found[2]} classes, "
            f"{found[3]} channels) but this trial trains a {wanted[1]} on {wanted[0]} ({wanted[2]} "
            f"classes, {wanted[3]} channels); use a teacher of the same dataset and model")
    if meta.get("defense") != params.teacher:
        raise DefenseConfigError(f"sat: teacher checkpoint {path} was trained by "
                                 f"{meta.get('defense')!r}, but teacher={params.teacher!r} was asked")
    teacher.load_state_dict(state["model"])
    return teacher.to(device).eval().requires_grad_(False)


class SAT(LossDefense):
    name = "sat"
    Params = SATParams

    def __init__(self, model, params, threat):
        super().__init__(model, params, threat)
        self.maps: torch.Tensor | None = None
        self.index: TrainingSetIndex | None = None
        self.saliency_seconds = 0.0  # spent computing maps in this trial (0 when cached)

    @classmethod
    def validate(cls, params):
        p = params
        checks = [
            (p.teacher in TEACHERS, f"unknown teacher {p.teacher!r}; valid: {', '.join(TEACHERS)}"),
            (p.method in METHODS, f"unknown saliency method {p.method!r}; valid: {', '.join(METHODS)}"),
            (p.variant in VARIANTS, f"unknown variant {p.variant!r}; valid: {', '.join(VARIANTS)}"),
            (p.normalization in NORMALIZATIONS,
             f"unknown normalization {p.normalization!r}; valid: {', '.join(NORMALIZATIONS)}"),
        ]
        for name, low, high, closed in (("alpha", 0.0, 1.0, False), ("eps0", 0.0, 1.0, True),
                                        ("beta", 0.0, math.inf, True)):
            v = getattr(p, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) and (
                low <= v <= high if closed else low < v < high)
            span = f"in [{low:g}, {high:g}]" if closed else f"in ({low:g}, {high:g})"
            checks.append((ok, f"{name}={v!r} must be a number {span}"))
        for ok, message in checks:
            if not ok:
                raise DefenseConfigError(f"sat: {message}")

    @classmethod
    def base_model(cls, params):
        return BaseModelRequest(defense=params.teacher)

    def setup(self, data, base_checkpoint):
        if base_checkpoint is None:
            raise DefenseConfigError("sat needs a teacher checkpoint (BaseModelRequest "
                                     f"{self.params.teacher!r}); none was given to setup")
        path = Path(base_checkpoint)
        device = next(self.model.parameters()).device
        p = self.params
        target = cache_path(path, p.method, p.normalization, cache.tensor_digest(data.train_x, data.train_y))

        # the teacher is checked even when its maps are cached: a wrong checkpoint never passes
        teacher = _load_teacher(path, p, data, self.model, device)

        def compute() -> torch.Tensor:
            start = time.perf_counter()
            maps = compute_maps(teacher, data.train_x, data.train_y, p.method, p.normalization)
            self.saliency_seconds = time.perf_counter() - start
            log.info("sat: %s maps of %d images in %.1f s -> %s", p.method, len(maps),
                     self.saliency_seconds, target.name)
            return maps

        self.maps = cached_maps(target, torch.Size(data.train_x.shape), compute, device)
        self.index = TrainingSetIndex(data.train_x, data.train_y, device)

    def saliency_for(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The cached s of each (x, y) of a training batch, float like x."""
        if self.maps is None or self.index is None:
            raise RuntimeError("sat: call setup(data, teacher_checkpoint) before training")
        return self.maps[self.index(x, y)].to(x.dtype)

    def loss(self, x, y, epoch):
        p, t = self.params, self.threat
        s = self.saliency_for(x, y)
        half = len(x) // 2 if p.variant != "sat" else 0
        x_sat = sat_examples(x[half:], s[half:], p.alpha, epoch, p.eps0)
        if half == 0:
            return F.cross_entropy(self.model(x_sat), y)
        if p.variant == "pgd_sat":
            x_pgd = pgd(self.model, x[:half], y[:half], t.eps, t.step_size, t.train_steps,
                        autocast=t.attack_dtype)
            return F.cross_entropy(self.model(torch.cat([x_pgd, x_sat])), y)
        x_kl = kl_adversarial(self.model, x[:half], t.eps, t.step_size, t.train_steps, t.attack_dtype)
        return trades_loss(self.model, x, y, torch.cat([x_kl, x_sat]), p.beta)

    def train_epoch(self, batches, optimizer, epoch, scheduler=None):
        metrics = super().train_epoch(batches, optimizer, epoch, scheduler)
        metrics["sat_random_prob"] = self.params.alpha ** epoch
        metrics["saliency_seconds"] = self.saliency_seconds
        return metrics

    def paper_attacks(self, eps: float) -> list:
        """The paper's evaluation at the threat model's ε: PGD-5 (every table of Section 4),
        PGD-20 and PGD-40 (appendix Table 5), uniform noise in the ε-ball and the saliency
        attack x − ε·sign(∇ₓΦ_y(x)) (Table 4). Its TRADES attack (Table 4) states no budget and
        is left out. PGD's step is the project's 2.5·ε/K (the paper does not give one)."""
        model = self.predictor()
        return ["pgd-5", "pgd-20", "pgd-40", UniformNoise(model, eps), SaliencySignAttack(model, eps)]


class UniformNoise(Attack):
    """x + U(−ε, ε)ᵈ, clipped to [0,1] (SAT's "Uniform-Noise" attack, Table 4): the model is
    never queried. Images (N,C,H,W) in [0,1]; labels unused."""

    name = "uniform_noise"

    def forward(self, images, labels):
        return images + random_start(images, self.eps)


class SaliencySignAttack(Attack):
    """SAT's saliency attack (Section 3, Fig. 2; Table 4): x − ε·sign(∇ₓΦ_y(x)), one step
    against the saliency map of the true class y (the logit's input gradient) of the attacked
    model. Images (N,C,H,W) in [0,1], labels (N,)."""

    name = "saliency_sign"

    def forward(self, images, labels):
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            grad, = torch.autograd.grad(self.model(x).gather(1, labels[:, None]).sum(), x)
        return images - self.eps * grad.sign()
