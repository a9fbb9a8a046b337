# The TRADES paper's β range (1/λ in its notation): 1 (accuracy) to 10 (robustness).
SPACE = {"beta": {"low": 0.5, "high": 10.0, "log": True}, "lr": {"low": 5e-4, "high": 3e-3, "log": True}}
KEY_HPARAMS = ["beta", "lr"]

# CIFAR-10: the TRADES paper's CIFAR runs use β = 6 (1/λ) with SGD at lr 0.1; β from 1
# (accuracy) to 10 (robustness), the cyclic peak around 0.1.
SPACE_BY_DATASET = {"cifar10": {"beta": {"low": 1.0, "high": 10.0, "log": True},
                                "lr": {"low": 0.05, "high": 0.2, "log": True}}}
GPU_SHARE = 1.0  # a K-step KL attack per batch
