# The paper's ratio range (Table 4/5: 0.2-1.2, default 0.8). SAD trains no weights, so a trial
# costs one BN pass over the training set plus the evaluation; the base model is shared.
SPACE = {"ratio": {"low": 0.2, "high": 1.2}}
KEY_HPARAMS = ["ratio", "variant", "base"]
