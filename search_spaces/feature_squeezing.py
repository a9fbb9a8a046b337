# Xu et al.'s MNIST squeezers: bit depth and median smoothing (their MNIST detector is 1-bit +
# 2x2 median). Non-local means stays off: the authors use it for colour images only. The
# threshold's FPR is not searched: it is the spec's threat_model.fpr (5 %, the paper's), the
# same for every detector, so detectors compare on the same clean-rejection budget.
SPACE = {"bit_depth": [1, 2, 3, 4], "median_size": [0, 2, 3]}
KEY_HPARAMS = ["bit_depth", "median_size"]

# CIFAR-10: Xu et al.'s CIFAR-10 detector is 5-bit depth + 2x2 median + non-local means
# 13-3-2 (search window 13, patch 3, strength 2 in 0-255 units); bit depths around 5, the
# medians, and NLM off / 11-3 / 13-3 at strength 2 or 4. The squeezers act on pixel values,
# not on ε: nothing here scales with ε = 8/255.
SPACE_BY_DATASET = {"cifar10": {"bit_depth": [4, 5, 6], "median_size": [0, 2, 3],
                                "nlm_search": [0, 11, 13], "nlm_patch": 3, "nlm_h": [2.0, 4.0]}}
GPU_SHARE = 0.25  # standard training of the classifier; the squeezers are cheap
