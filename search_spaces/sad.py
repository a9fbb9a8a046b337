# The paper's ratio range (Table 4/5: 0.2-1.2, default 0.8). SAD trains no weights, so a trial
# costs one BN pass over the training set plus the evaluation; the base model is shared.
SPACE = {"ratio": {"low": 0.2, "high": 1.2}}
KEY_HPARAMS = ["ratio", "variant", "base"]

# CIFAR-10: the paper's CIFAR-10 ResNet-18 ratios (Table 5: 0.2-1.2; its default 0.8). The δ
# step of x + step·δ⁰ is in input units: the threat ε (8/255) and the two radii below it
# (WeakPGD's 4/255 and 2/255), instead of the threat ε it defaults to.
SPACE_BY_DATASET = {"cifar10": {"ratio": {"low": 0.2, "high": 1.2},
                                "step": [2 / 255, 4 / 255, 8 / 255]}}
GPU_SHARE = 0.5  # no weight training, but its predictions and attacks go through saliency steps
