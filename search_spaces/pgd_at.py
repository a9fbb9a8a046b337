# clean_weight trades clean accuracy for robustness (0 = Madry's pure adversarial loss).
SPACE = {"lr": {"low": 5e-4, "high": 3e-3, "log": True}, "clean_weight": {"low": 0.0, "high": 1.0}}
KEY_HPARAMS = ["clean_weight", "lr"]

# CIFAR-10 (ε = 8/255 from the threat model, PGD-10 at 2/255 a step): Madry et al. / Rice et
# al. train with SGD at lr 0.1; the cyclic peak is searched around it. clean_weight as above.
SPACE_BY_DATASET = {"cifar10": {"lr": {"low": 0.05, "high": 0.2, "log": True},
                                "clean_weight": {"low": 0.0, "high": 1.0}}}
GPU_SHARE = 1.0  # a K-step attack per batch: a whole GPU
