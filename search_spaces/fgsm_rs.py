# Wong et al. use α = 1.25ε; larger steps make catastrophic overfitting likelier.
SPACE = {"alpha_ratio": {"low": 0.75, "high": 1.5}, "lr": {"low": 5e-4, "high": 3e-3, "log": True}}
KEY_HPARAMS = ["alpha_ratio", "lr"]

# CIFAR-10: Wong et al.'s own recipe, α = 1.25ε (10/255 at ε = 8/255; α is relative to the
# threat ε, so alpha_ratio is the same range as above: α from 6/255 to 12/255) with the
# cyclic schedule peaking at lr 0.2 over 15 epochs; the peak is searched from 0.05 to 0.2.
SPACE_BY_DATASET = {"cifar10": {"alpha_ratio": {"low": 0.75, "high": 1.5},
                                "lr": {"low": 0.05, "high": 0.2, "log": True}}}
GPU_SHARE = 0.25  # one FGSM step per batch: four trials share a GPU
