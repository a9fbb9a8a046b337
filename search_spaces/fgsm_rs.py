from ray import tune

# Wong et al. use α = 1.25ε; larger steps make catastrophic overfitting likelier.
SPACE = {"alpha_ratio": tune.uniform(0.75, 1.5), "lr": tune.loguniform(5e-4, 3e-3)}
KEY_HPARAMS = ["alpha_ratio", "lr"]
