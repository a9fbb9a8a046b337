# The TRADES paper's β range (1/λ in its notation): 1 (accuracy) to 10 (robustness).
SPACE = {"beta": {"low": 0.5, "high": 10.0, "log": True}, "lr": {"low": 5e-4, "high": 3e-3, "log": True}}
KEY_HPARAMS = ["beta", "lr"]
