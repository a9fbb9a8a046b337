# θ over the paper's 0.0-0.5 sweep; the enhancement is categorical. 'color_reverse' (RGB→BGR)
# is the identity on 1-channel images and the detector rejects it there, so this default
# space (the default preset is MNIST) leaves it out: add it in a spec's space for CIFAR.
# The rule is the default margin threshold at the spec's threat_model.fpr, as for every
# detector; the paper's label comparison (rule: paper) has an uncontrolled FPR.
SPACE = {"theta": {"low": 0.0, "high": 0.5}, "enhancement": ["none", "zero_mean"]}
KEY_HPARAMS = ["theta", "enhancement"]
