"""What every defense stands on: the contract (``base``: ``Defense``, its hyperparameters,
the threat model), the registry that names defenses, data, model architectures, the detector
base class and the one locked, content-keyed cache."""
