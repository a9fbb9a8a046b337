from ray import tune

# clean_weight trades clean accuracy for robustness (0 = Madry's pure adversarial loss).
SPACE = {"lr": tune.loguniform(5e-4, 3e-3), "clean_weight": tune.uniform(0.0, 1.0)}
KEY_HPARAMS = ["clean_weight", "lr"]
