from ray import tune

# SAT (Mangla et al. 2020). The paper's α = 0.6^(1/10) ≈ 0.95 and ε₀ = 8/255 are CIFAR values;
# ε₀ is scaled here for MNIST (threat ε = 0.3). α near 1 keeps δ mostly random early (Fig. 5).
# SmoothGrad and Integrated Gradients ("smoothgrad", "integrated_gradients") cost 16 teacher
# passes over the training set each, too much for the default preset's per-trial budget: they
# are left out of the default space and can be chosen with the spec's `space:` override.
SPACE = {
    "alpha": tune.uniform(0.5, 0.99),
    "eps0": tune.uniform(0.05, 0.3),
    "teacher": tune.choice(["pgd_at", "standard"]),
    "method": tune.choice(["guided_backprop", "gradient", "grad_cam_pp_box"]),
    "variant": tune.choice(["sat", "pgd_sat", "trades_sat"]),
    "lr": tune.loguniform(5e-4, 3e-3),
}
KEY_HPARAMS = ["variant", "method", "teacher", "alpha", "eps0", "lr"]
