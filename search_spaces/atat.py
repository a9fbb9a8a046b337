# λ₁ (attention transfer) and λ₂ (logit pairing) on a log grid plus 0, the point that removes
# the term (the paper's ablation switches each term between 0 and 1). A categorical grid keeps
# 0 reachable for Tune and Optuna alike (a log-uniform range cannot contain 0), and every value
# is checked by ATAT.validate before the sweep starts. init: the paper starts the student from
# the teacher; random init is what the authors' released code does.
LAMBDA_GRID = [0.0, 0.1, 0.3, 1.0, 3.0]
SPACE = {
    "lambda1": LAMBDA_GRID,
    "lambda2": LAMBDA_GRID,
    "init": ["teacher", "random"],
}
KEY_HPARAMS = ["lambda1", "lambda2", "init"]

# CIFAR-10: the paper trains on CIFAR-10 with λ₁ = λ₂ = 1 and PGD-7 at 2/255 (ε = 8/255, from
# the threat model); its ablation switches each term between 0 and 1, so the same grid. λ are
# loss weights, in no input units. The student's lr is the spec's optimizer.lr (0.1 in the
# cifar10 preset, the peak of its cyclic schedule), as for the teacher.
SPACE_BY_DATASET = {"cifar10": {"lambda1": LAMBDA_GRID, "lambda2": LAMBDA_GRID,
                                "init": ["teacher", "random"]}}
GPU_SHARE = 1.0  # PGD training plus a differentiable Grad-CAM of the student per batch
