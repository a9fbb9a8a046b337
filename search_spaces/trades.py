from ray import tune

# The TRADES paper's β range (1/λ in its notation): 1 (accuracy) to 10 (robustness).
SPACE = {"beta": tune.loguniform(0.5, 10.0), "lr": tune.loguniform(5e-4, 3e-3)}
KEY_HPARAMS = ["beta", "lr"]
