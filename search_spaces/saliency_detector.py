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
