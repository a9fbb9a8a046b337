# Wong et al. use α = 1.25ε; larger steps make catastrophic overfitting likelier.
SPACE = {"alpha_ratio": {"low": 0.75, "high": 1.5}, "lr": {"low": 5e-4, "high": 3e-3, "log": True}}
KEY_HPARAMS = ["alpha_ratio", "lr"]
