# Xu et al.'s MNIST squeezers: bit depth and median smoothing (their MNIST detector is 1-bit +
# 2x2 median). Non-local means stays off: the authors use it for colour images only. The
# threshold's FPR is not searched: it is the spec's threat_model.fpr (5 %, the paper's), the
# same for every detector, so detectors compare on the same clean-rejection budget.
SPACE = {"bit_depth": [1, 2, 3, 4], "median_size": [0, 2, 3]}
KEY_HPARAMS = ["bit_depth", "median_size"]
