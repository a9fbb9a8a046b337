# Cheap by default (a trial of the default preset in ~40 s on one core): FGSM as the training
# attack, the masking-model weights at their defaults (so every trial guarding the same
# classifier reuses one cached masking model), no detector adversarial training. Heavier
# settings (BIM/MIM/C&W/DeepFool training sets, adv_train) are for the experiment or a spec's
# own `space`. The FPR is not searched: it is the spec's threat_model.fpr (5 %, the paper's).
SPACE = {
    "detector": ["spd", "smd", "id", "jsd"],
    "train_attack": "fgsm",
    "detector_lr": {"low": 3e-4, "high": 3e-3, "log": True},
    "adv_train": False,
}
KEY_HPARAMS = ["detector", "train_attack", "detector_lr", "adv_train"]

# CIFAR-10 (one of the paper's three datasets): the same cheap detector setup. detector_lr is
# the detectors' own Adam (the library's default 1e-3 inside the range), not the spec's SGD;
# the FGSM training attack runs at the threat ε (8/255), so nothing here is in ε-units. The
# classifier the detector guards trains with the spec's optimizer (SGD, cyclic).
SPACE_BY_DATASET = {"cifar10": {
    "detector": ["spd", "smd", "id", "jsd"],
    "train_attack": "fgsm",
    "detector_lr": {"low": 3e-4, "high": 3e-3, "log": True},
    "adv_train": False,
}}
GPU_SHARE = 0.5  # a masking model and a detector trained on top of the classifier
