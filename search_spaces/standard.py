SPACE = {"lr": {"low": 3e-4, "high": 3e-3, "log": True}}
KEY_HPARAMS = ["lr"]
