"""Model-based saliency detectors of adversarial examples (``shared/papers/001``, ICLR 2020
submission "Model-based saliency for the detection of adversarial examples").

A small CNN (``defenses.saliency.detector_net``), trained on clean training images against the
successful adversarial images of one attack (``defenses.attacks.detector_training``) on the
guarded classifier, decides whether an input is adversarial from what it sees: the saliency
mask of the real-time masking model (``smd``), the salient pixels (``spd``), the image alone
(``id``) or the image with the predicted class's logit gradient (``jsd``). It rejects above the
threshold that rejects a fraction ``fpr`` of the clean validation split. The paper's white-box
attack (``AlternatingWhiteBox``) and detector adversarial training are here too.
The reading of the paper, its deviations and the results: docs/saliency_detector.md."""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from defenses.core import cache
from defenses.attacks import Attack, frozen_eval
from defenses.attacks.adaptive import smooth_relu, straight_through
from defenses.attacks.detector_aware import OrthogonalPGD
from defenses.core.base import DefenseConfigError, Prediction
from defenses.core.data import as_float
from defenses.core.detector import GuardDetector, load_guarded_classifier
from defenses.evaluation.detection import threshold_at_fpr
from defenses.saliency.maps import capture_activation
from defenses.attacks.detector_training import (DEFAULT_STEPS, TEST_ONLY_ATTACKS, TRAIN_ATTACKS, craft,
                                                detection_attack, threat_attack)
from defenses.saliency.detector_net import (DetectorCNN, batched, detector_input, detector_pass,
                                           input_channels, logit_gradient)
from defenses.saliency.masking import MaskingModel, SaliencyLossWeights, train_masking_model

log = logging.getLogger(__name__)

DETECTORS = ("smd", "spd", "id", "jsd")
CHECKPOINT_FORMAT = "saliency_detector/1"
MASK_TRAIN_MAX = 1000   # masking-model training images (CPU budget; the masks converge on fewer)


@dataclasses.dataclass(frozen=True)
class SaliencyDetectorParams:
    detector: str = "spd"          # smd | spd | id | jsd
    train_attack: str = "fgsm"     # fgsm | bim | mim | cw | deepfool
    attack_steps: int = 0          # 0: the attack's default (bim/mim 10, cw 30, deepfool 50)
    fpr: float | None = None       # clean false-positive rate of the threshold; None: the threat model's
    detector_lr: float = 1e-3      # Adam, as the paper trains every network
    passes: int = 2                # passes over the detector's training set per epoch
    adv_train: bool = False        # detector adversarial training against AlternatingWhiteBox
    adv_train_samples: int = 300   # clean training images attacked per epoch for it
    rounds: int = 5                # T of the alternating white-box attack
    area_weight: float = 6.0       # saliency loss weights (defenses.saliency.maps.masking)
    smooth_weight: float = 0.0
    preserve_weight: float = 1.0
    destroy_weight: float = 2.0
    destroy_power: float = 0.3
    mask_epochs: int = 4
    detector_checkpoint: str = ""  # a saved detector (save_detector) to use instead of training

    @property
    def loss_weights(self) -> SaliencyLossWeights:
        return SaliencyLossWeights(area=self.area_weight, smooth=self.smooth_weight,
                                   preserve=self.preserve_weight, destroy=self.destroy_weight,
                                   destroy_power=self.destroy_power)

    @property
    def steps(self) -> int:
        return self.attack_steps or DEFAULT_STEPS[self.train_attack]


# --- the white-box attack of the paper -----------------------------------------------------

class AlternatingWhiteBox(Attack):
    """§3.8: T rounds, each a signed step up the classifier's cross-entropy (Eq. 3) then a
    signed step down the detector's score (Eq. 4), projected onto the ε-ball and [0,1].
    ``joint(x) -> (logits, score)`` with the detector rejecting x iff score > 0 (the
    convention of ``defenses.attacks.detector_aware``). Returned: among the iterates that fool
    the classifier, the one with the lowest detector score (the last iterate if none does)."""

    def __init__(self, joint: Callable, eps: float, rounds: int = 5, alpha: float | None = None):
        super().__init__(joint, eps)
        if rounds <= 0:
            raise ValueError("AlternatingWhiteBox needs rounds ≥ 1")
        self.rounds = rounds
        self.alpha = alpha if alpha is not None else 2.5 * eps / (2 * rounds)
        self.name = f"alt_whitebox-{rounds}"

    def _step(self, x, images, labels, on_detector: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        logits, score = self.model(x)
        objective = -score.sum() if on_detector else F.cross_entropy(logits, labels, reduction="sum")
        grad, = torch.autograd.grad(objective, x)
        x_next = torch.min(torch.max(x + self.alpha * grad.sign(), images - self.eps), images + self.eps)
        return x_next.clamp(0.0, 1.0).detach(), logits.detach(), score.detach()

    def forward(self, images, labels):
        x = images.clone()
        best = images.clone()
        best_score = torch.full((len(labels),), math.inf, device=images.device)
        for step in range(2 * self.rounds + 1):
            on_detector = step % 2 == 1
            if step < 2 * self.rounds:
                x_next, logits, score = self._step(x, images, labels, on_detector)
            else:  # judge the last iterate too
                with torch.no_grad():
                    logits, score = self.model(x)
                x_next = x
            keep = (logits.argmax(1) != labels) & (score < best_score)
            best[keep], best_score[keep] = x[keep], score[keep]
            x = x_next
        never = best_score == math.inf
        best[never] = x[never]
        return best


class _Joint(nn.Module):
    """``x -> (logits, score)`` for the adaptive attacks; the classifier is a submodule so the
    attacks freeze it (the detector's networks never require grad outside ``train_epoch``)."""

    def __init__(self, detector: "SaliencyDetector"):
        super().__init__()
        self.classifier = detector.model
        self._detector = [detector]  # a list: not a submodule

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._detector[0].classify_and_score(x)


JACOBIAN_BETA = 10.0  # softplus β of the Jacobian channel's BPDA surrogate (pre-activations ~1)


class _SmoothJacobianJoint(nn.Module):
    """The jsd detector's ``x -> (logits, score)`` for BPDA (Athalye et al. 2018) on its
    Jacobian channel. Forward: the detector's own values, bit for bit. Backward: the channel
    ∇ₓz_c(x) of a ReLU classifier is piecewise constant in x, so its true derivative is zero
    almost everywhere and a gradient attack never moves that half of the decision; here its
    gradient is that of the same channel computed on the classifier with every ReLU replaced
    by softplus_β (``smooth_relu``, double backprop), a function close to it whose derivative
    is not zero. The image channel and the classifier keep their true gradients."""

    def __init__(self, detector: "SaliencyDetector", beta: float = JACOBIAN_BETA):
        super().__init__()
        self.classifier = detector.model
        self._detector = [detector]  # a list: not a submodule
        self.beta = beta

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        det = self._detector[0]
        if not (torch.is_grad_enabled() and x.requires_grad):
            return det.classify_and_score(x)  # judging an iterate: nothing to differentiate
        if det.threshold is None:
            raise RuntimeError("saliency_detector: no threshold yet; it is set on the validation "
                               "split after each training epoch")
        logits = det.model(x)
        classes = logits.argmax(1).detach()
        exact = logit_gradient(det.model, x.detach(), classes)  # no graph: the true channel
        with smooth_relu(self.beta):
            surrogate = logit_gradient(det.model, x, classes)   # create_graph through softplus
        channel = straight_through(surrogate, exact)
        return logits, det.net(torch.cat([x, channel], 1)) - det.threshold


# --- the defense ---------------------------------------------------------------------------

class SaliencyDetector(GuardDetector):
    """Guards a standard classifier with an SMD / SPD / ID / JSD detector (see the module
    docstring). ``predict`` -> (the classifier's logits, detector logit > threshold)."""

    name = "saliency_detector"
    Params = SaliencyDetectorParams
    batch_size = 100

    def __init__(self, model, params, threat):
        super().__init__(model, params, threat)
        self.masker: MaskingModel | None = None
        self.net: DetectorCNN | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.threshold: float | None = None
        self.classifier_id = ""
        self.meta: dict[str, Any] = {}
        self.loaded = False
        self._train_set: tuple[torch.Tensor, torch.Tensor] | None = None
        self._whitebox: list[torch.Tensor] = []

    # --- configuration -------------------------------------------------------------------
    @classmethod
    def validate(cls, params):
        p, where = params, "saliency_detector"
        if p.detector not in DETECTORS:
            raise DefenseConfigError(f"{where}: unknown detector {p.detector!r}; valid: {', '.join(DETECTORS)}")
        if p.train_attack in TEST_ONLY_ATTACKS:
            raise DefenseConfigError(f"{where}: train_attack {p.train_attack!r} is a test-only attack "
                                     f"(too slow to build a training set); valid: {', '.join(TRAIN_ATTACKS)}")
        if p.train_attack not in TRAIN_ATTACKS:
            raise DefenseConfigError(f"{where}: unknown train_attack {p.train_attack!r}; valid: "
                                     f"{', '.join(TRAIN_ATTACKS)}")
        if p.fpr is not None and not (isinstance(p.fpr, (int, float)) and 0.0 < p.fpr < 1.0):
            raise DefenseConfigError(f"{where}: fpr={p.fpr!r} must lie strictly between 0 and 1 "
                                     "(or be null: the threat model's fpr)")
        ints = {"attack_steps": (p.attack_steps, 0), "passes": (p.passes, 1), "rounds": (p.rounds, 1),
                "adv_train_samples": (p.adv_train_samples, 1), "mask_epochs": (p.mask_epochs, 1)}
        for name, (v, lo) in ints.items():
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
                raise DefenseConfigError(f"{where}: {name}={v!r} must be an integer ≥ {lo}")
        if not (isinstance(p.detector_lr, (int, float)) and math.isfinite(p.detector_lr) and p.detector_lr > 0):
            raise DefenseConfigError(f"{where}: detector_lr={p.detector_lr!r} must be a number > 0")
        if not isinstance(p.adv_train, bool):
            raise DefenseConfigError(f"{where}: adv_train={p.adv_train!r} must be true or false")
        problem = p.loss_weights.check()
        if problem:
            raise DefenseConfigError(f"{where}: {problem}")
        if p.detector_checkpoint:
            cls._check_checkpoint_file(p)

    @classmethod
    def check_run(cls, p: SaliencyDetectorParams, dataset: str, model: str) -> None:
        """A saved detector for another dataset or architecture stops the sweep before Ray; one
        for the same architecture but other weights is caught in ``setup`` (the guarded
        classifier's fingerprint is only known once the run has trained it)."""
        if not p.detector_checkpoint:
            return
        saved = cls._check_checkpoint_file(p).get("classifier", {})
        if (saved.get("dataset"), saved.get("model")) != (dataset, model):
            raise DefenseConfigError(
                f"saliency_detector: detector_checkpoint {p.detector_checkpoint!r} was trained for "
                f"classifier {saved.get('model')}/{saved.get('dataset')}, not this sweep's "
                f"{model}/{dataset}; train one for it or drop detector_checkpoint")

    @staticmethod
    def _check_checkpoint_file(p: SaliencyDetectorParams) -> dict[str, Any]:
        path = Path(p.detector_checkpoint)
        where = f"saliency_detector: detector_checkpoint {str(path)!r}"
        if not path.is_file():
            raise DefenseConfigError(f"{where} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same config error
            raise DefenseConfigError(f"{where} cannot be read: {type(e).__name__}") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise DefenseConfigError(f"{where} is not a saliency detector checkpoint (save_detector)")
        if state["detector"] != p.detector:
            raise DefenseConfigError(f"{where} holds a {state['detector']!r} detector, not {p.detector!r}")
        return state

    # --- setup ---------------------------------------------------------------------------
    def setup(self, data, base_checkpoint):
        base_meta = load_guarded_classifier(self.model, base_checkpoint, data, self.name)
        self.model.requires_grad_(False)
        device = next(self.model.parameters()).device
        self.classifier_id = cache.model_digest(self.model)
        self.meta = {"dataset": data.name, "model": base_meta["model"], "fingerprint": self.classifier_id}
        # the threshold's clean images: the validation split, which neither the classifier nor
        # this detector trains on; the detector trains on every training image
        self.calib_x = self.validation_images(data)[0]
        # the training images, their adversarials and the detector's inputs stay in host
        # memory, batches go to the GPU: on CIFAR they are GBs in float32, more than a trial
        # holding a quarter of a GPU may take (resources.gpus_per_trial: 0.25)
        self.device = device
        self.train_x, self.train_y = as_float(data.train_x), data.train_y
        self.image_shape = tuple(self.train_x.shape[1:])
        self.cache_dir = Path(base_checkpoint).parent
        c, h, w = self.image_shape
        self.net = DetectorCNN(input_channels(self.params.detector, c), h, w).to(device)
        self.net.requires_grad_(False)  # trained only inside train_epoch; attacks never need it
        if self.params.detector in ("smd", "spd"):
            self.masker = MaskingModel(self.model, data.num_classes, self.image_shape).to(device)
        if self.params.detector_checkpoint:
            self._load_detector(self._check_checkpoint_file(self.params),
                                f"detector_checkpoint {self.params.detector_checkpoint!r}")
            return
        if self.masker is not None:
            self._fit_masker()
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.params.detector_lr)

    def _fit_masker(self) -> None:
        """Load the masking model trained for this classifier and these loss weights, or train
        and cache it next to the base checkpoint (trials guarding the same classifier reuse it)."""
        p, device = self.params, self.device
        n = min(MASK_TRAIN_MAX, len(self.train_y))
        x, y = self.train_x[:n].to(device), self.train_y[:n].to(device)
        key = cache.key_digest(classifier=self.classifier_id, data=cache.tensor_digest(x), weights=dataclasses.asdict(p.loss_weights),
                   epochs=p.mask_epochs, lr=5e-3, batch=50, width=32)

        def build() -> dict[str, Any]:
            torch.manual_seed(0)
            fresh = MaskingModel(self.model, self.masker.selector.num_embeddings, self.image_shape).to(device)
            history = train_masking_model(fresh, x, y, p.loss_weights, p.mask_epochs, batch_size=50, lr=5e-3)
            log.info("saliency_detector: masking model trained, loss per epoch %s", history)
            return {"masker": fresh.state_dict(), "history": history, "classifier": self.classifier_id}

        state = cache.cached_state(self.cache_dir / f"saliency_mask-{key}.pt", build, device)
        self.masker.load_state_dict(state["masker"])
        self.masker.eval().requires_grad_(False)
        self.mask_history = list(state["history"])

    # --- detector inputs and score --------------------------------------------------------
    def inputs(self, x: torch.Tensor, logits: torch.Tensor | None = None,
               act: torch.Tensor | None = None) -> torch.Tensor:
        return detector_input(self.params.detector, self.model, self.masker, x, logits, act)

    def raw_score(self, x: torch.Tensor, logits: torch.Tensor | None = None,
                  act: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(self.inputs(x, logits, act))

    def score(self, x, logits, act: torch.Tensor | None = None):
        if self.threshold is None:
            raise RuntimeError("saliency_detector: no threshold yet; it is set on the validation "
                               "split after each training epoch")
        return self.raw_score(x, logits, act) - self.threshold

    def classify_and_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, score) with ONE classifier forward: the masking model's encoder reuses the
        attention-layer output of the classification (same graph, so attacks differentiate
        both through it)."""
        with capture_activation(self.model) as store:
            logits = self.model(x)
        return logits, self.score(x, logits, store["act"])

    def predict(self, x):
        logits, score = self.classify_and_score(x)
        return Prediction(logits, score > 0)

    def joint(self) -> nn.Module:
        return _Joint(self)

    def calibrate(self) -> dict[str, float]:
        """Threshold = (1 − fpr) quantile of the detector logits of the validation images."""
        with frozen_eval(self.model), torch.no_grad():
            scores = batched(self.raw_score, self.calib_x)
        self.threshold = threshold_at_fpr(scores, self.target_fpr)
        return {"threshold": self.threshold}

    # --- training ------------------------------------------------------------------------
    def _attack_training_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Adversarial versions of the training images (cached next to the base checkpoint
        per classifier, attack and ε) and which of them count as adversarial."""
        p, device = self.params, self.device
        key = cache.key_digest(classifier=self.classifier_id, data=cache.tensor_digest(self.train_x), attack=p.train_attack,
                   steps=p.steps, eps=self.threat.eps)

        def build() -> dict[str, Any]:
            torch.manual_seed(0)
            attack = detection_attack(p.train_attack, self.model, self.threat.eps, p.steps)
            return {"adv": craft(attack, self.train_x, self.train_y, device=device)}

        adv = cache.cached_state(self.cache_dir / f"saliency_adv-{key}.pt", build, torch.device("cpu"))["adv"]
        with torch.no_grad():
            correct = batched(self.model, self.train_x, device=device).argmax(1) == self.train_y
            fooled = correct & (batched(self.model, adv, device=device).argmax(1) != self.train_y)
        return adv, fooled

    def _build_train_set(self) -> None:
        adv, fooled = self._attack_training_set()
        with frozen_eval(self.model), torch.no_grad():
            clean_in = batched(self.inputs, self.train_x, device=self.device)
            adv_in = batched(self.inputs, adv[fooled], device=self.device)
        self.net.fit_scaling(clean_in)
        labels = torch.cat([torch.zeros(len(clean_in)), torch.ones(len(adv_in))]).to(clean_in.device)
        self._train_set = (torch.cat([clean_in, adv_in]), labels)

    def whitebox_attack(self, eps: float) -> AlternatingWhiteBox:
        return AlternatingWhiteBox(self.joint(), eps, rounds=self.params.rounds)

    def _whitebox_examples(self, epoch: int) -> torch.Tensor:
        """Detector inputs of fresh white-box examples against the current detector (those
        that fool the classifier), for detector adversarial training."""
        if self.threshold is None:
            self.calibrate()
        g = torch.Generator().manual_seed(1000 + epoch)
        idx = torch.randperm(len(self.train_y), generator=g)[:self.params.adv_train_samples]
        x, y = self.train_x[idx].to(self.device), self.train_y[idx].to(self.device)
        adv = craft(self.whitebox_attack(self.threat.eps), x, y, self.batch_size)
        with frozen_eval(self.model), torch.no_grad():
            fooled = batched(self.model, adv).argmax(1) != y
            return batched(self.inputs, adv[fooled]).to(self.train_x.device)

    def train_epoch(self, batches: Iterable, optimizer, epoch, scheduler=None):
        """One epoch of the detector on its fixed training set [X, X_adv] (§3.7; the trial's
        clean batches are not used: the set and its adversarial half are built once), plus,
        with ``adv_train``, white-box examples crafted against the detector as it now is."""
        if self.loaded:
            self.stop_training = True  # a loaded detector is used as saved
            return {}
        if self._train_set is None:
            self._build_train_set()
        inputs, labels = self._train_set
        if self.params.adv_train:
            self._whitebox.append(self._whitebox_examples(epoch))
            wb = torch.cat(self._whitebox)
            inputs = torch.cat([inputs, wb])
            labels = torch.cat([labels, torch.ones(len(wb), device=labels.device)])
        g = torch.Generator().manual_seed(epoch)
        self.net.requires_grad_(True)
        for _ in range(self.params.passes):
            metrics = detector_pass(self.net, self.opt, inputs, labels, self.batch_size, g)
        self.net.requires_grad_(False)
        metrics["n_adv_train"] = float(labels.sum())
        if self.params.adv_train:
            metrics["n_whitebox"] = float(sum(len(w) for w in self._whitebox))
        return metrics

    def end_epoch(self, epoch, holdout):
        metrics = self.calibrate()
        metrics.update(super().end_epoch(epoch, holdout))
        return metrics

    # --- attacks -------------------------------------------------------------------------
    def jacobian_bpda_attack(self, eps: float) -> OrthogonalPGD:
        """jsd only: orthogonal PGD on ``_SmoothJacobianJoint``, i.e. BPDA with a softplus
        surrogate of the Jacobian channel, named ``bpda_softplus-opgd-K``. BPDA rather than a
        gradient-free attack on the joint decision (``square_joint``, which every detector gets
        anyway): a surrogate gradient steers all 2·C·H·W inputs of the detector at once, where
        random search needs many queries per direction it finds."""
        if self.params.detector != "jsd":
            raise ValueError(f"saliency_detector: the Jacobian-channel BPDA attack is for the jsd "
                             f"detector, not {self.params.detector!r}")
        restarts = self.ADAPTIVE_RESTARTS if self.full_strength(eps) else 1
        attack = OrthogonalPGD(_SmoothJacobianJoint(self), eps, steps=self.adaptive_budget(),
                               early_stop=True, restarts=restarts)
        attack.name = f"bpda_softplus-{attack.name}"
        return attack

    def adaptive_attacks(self, eps):
        # the paper's alternating attack first: it is the cheapest (2T gradient steps), so the
        # generic detector-aware attacks (extra-class C&W, orthogonal PGD) of
        # ``GuardDetector`` only run on the inputs it leaves unbroken; at full strength, for jsd
        # BPDA on the Jacobian channel (which those attacks' true gradient never reaches), and
        # Square on the joint decision last (the most queries per point)
        attacks = [self.whitebox_attack(eps)] + self.gradient_attacks(eps)
        if not self.full_strength(eps):
            return attacks
        if self.params.detector == "jsd":
            attacks.append(self.jacobian_bpda_attack(eps))
        return attacks + [self.square_attack(eps)]

    def paper_attacks(self, eps):
        """The paper's attacks (§3.2) inside the threat model, then its white-box attack."""
        return [threat_attack(a, self.model, eps) for a in TRAIN_ATTACKS] + [self.whitebox_attack(eps)]

    # --- state and export ----------------------------------------------------------------
    def _detector_state(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "detector": self.params.detector,
                "classifier": dict(self.meta), "net": self.net.state_dict(),
                "masker": self.masker.state_dict() if self.masker is not None else None,
                "threshold": self.threshold, "fpr": self.target_fpr}

    def save_detector(self, path: str | Path) -> None:
        """Write the trained detector (with its masking model and threshold), atomically, for
        ``detector_checkpoint``."""
        state = self._detector_state()
        cache.atomic_write(path, lambda tmp: torch.save(state, tmp))

    def _load_detector(self, state: dict[str, Any], source: str) -> None:
        saved = state["classifier"]
        if saved.get("fingerprint") != self.classifier_id:
            raise DefenseConfigError(
                f"saliency_detector: {source} was trained for classifier {saved.get('model')}/"
                f"{saved.get('dataset')} #{saved.get('fingerprint')}, not this trial's "
                f"{self.meta['model']}/{self.meta['dataset']} #{self.classifier_id}")
        self.net.load_state_dict(state["net"])
        if self.masker is not None:
            self.masker.load_state_dict(state["masker"])
            self.masker.eval().requires_grad_(False)
        self.net.eval().requires_grad_(False)
        self.threshold = None if state["threshold"] is None else float(state["threshold"])
        self.loaded = True

    def state_dict(self):
        state = self._detector_state()
        state["optimizer"] = self.opt.state_dict() if self.opt is not None else None
        return state

    def load_state_dict(self, state):
        if not state:
            return
        self._load_detector(state, "the resumed trial's checkpoint")
        self.loaded = False  # resuming a trial: training goes on
        if self.opt is not None and state.get("optimizer") is not None:
            self.opt.load_state_dict(state["optimizer"])
