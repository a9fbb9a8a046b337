from ray import tune

SPACE = {"lr": tune.loguniform(3e-4, 3e-3)}
KEY_HPARAMS = ["lr"]
