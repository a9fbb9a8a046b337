# clean_weight trades clean accuracy for robustness (0 = Madry's pure adversarial loss).
SPACE = {"lr": {"low": 5e-4, "high": 3e-3, "log": True}, "clean_weight": {"low": 0.0, "high": 1.0}}
KEY_HPARAMS = ["clean_weight", "lr"]
