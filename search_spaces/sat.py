# SAT (Mangla et al. 2020). The paper's α = 0.6^(1/10) ≈ 0.95 and ε₀ = 8/255 are CIFAR values;
# ε₀ is scaled here for MNIST (threat ε = 0.3). α near 1 keeps δ mostly random early (Fig. 5).
# SmoothGrad and Integrated Gradients ("smoothgrad", "integrated_gradients") cost 16 teacher
# passes over the training set each, too much for the default preset's per-trial budget: they
# are left out of the default space and can be chosen with the spec's `space:` override.
SPACE = {
    "alpha": {"low": 0.5, "high": 0.99},
    "eps0": {"low": 0.05, "high": 0.3},
    "teacher": ["pgd_at", "standard"],
    "method": ["guided_backprop", "gradient", "grad_cam_pp_box"],
    "variant": ["sat", "pgd_sat", "trades_sat"],
    "lr": {"low": 5e-4, "high": 3e-3, "log": True},
}
KEY_HPARAMS = ["variant", "method", "teacher", "alpha", "eps0", "lr"]
