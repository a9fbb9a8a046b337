SPACE = {"lr": {"low": 3e-4, "high": 3e-3, "log": True}}
KEY_HPARAMS = ["lr"]

# CIFAR-10 (the cifar10 preset: SGD, momentum 0.9, cyclic schedule; lr is the cycle's peak):
# the usual 0.1 of SGD on ResNets, within a factor 2 either way. No attack in training, so a
# trial takes a quarter of a GPU under resources.gpu_shares.
SPACE_BY_DATASET = {"cifar10": {"lr": {"low": 0.05, "high": 0.2, "log": True}}}
GPU_SHARE = 0.25
