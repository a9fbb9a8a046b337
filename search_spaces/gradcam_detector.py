# θ over the paper's 0.0-0.5 sweep; the enhancement is categorical. 'color_reverse' (RGB→BGR)
# is the identity on 1-channel images and the detector rejects it there, so this default
# space (the default preset is MNIST) leaves it out: add it in a spec's space for CIFAR.
# The rule is the default margin threshold at the spec's threat_model.fpr, as for every
# detector; the paper's label comparison (rule: paper) has an uncontrolled FPR.
SPACE = {"theta": {"low": 0.0, "high": 0.5}, "enhancement": ["none", "zero_mean"]}
KEY_HPARAMS = ["theta", "enhancement"]

# CIFAR-10: θ is the CAM's weight in the emphasis image x + θ·CAM (CAM in [0, 1], an image
# proportion, not ε-units: unchanged by ε = 8/255), over the paper's 0.0-0.5 sweep (it
# recommends 0.1-0.3); colour reversing, meaningful on RGB, joins the enhancements.
SPACE_BY_DATASET = {"cifar10": {"theta": {"low": 0.0, "high": 0.5},
                                "enhancement": ["none", "color_reverse", "zero_mean"]}}
GPU_SHARE = 0.5  # standard training of the classifier, Grad-CAM on every evaluated input
