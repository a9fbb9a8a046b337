"""One module per defense: ``SPACE`` (plain data over that defense's hyperparameters and the
training keys ``lr``/``weight_decay``, in the spec's ``space:`` form: a list is a choice,
``{low, high, log}`` a range, anything else a fixed value) and ``KEY_HPARAMS`` (what the
dashboard shows). ``orchestrator.spec.build_space`` finds them by the defense's name and turns
them into Ray Tune domains; no search space imports Ray.

Optional, per module:

- ``SPACE_BY_DATASET``: ``{dataset: space}``, the space ``build_space`` takes instead of
  ``SPACE`` when the spec's dataset matches (``SPACE`` is in MNIST units: ε = 0.3, Adam's
  learning rates). The ``cifar10`` entries are in CIFAR units (ε = 8/255) and their ``lr``
  ranges are SGD's cyclic peaks, the ``cifar10`` preset's optimizer; a CIFAR-10 spec with Adam
  gives its own ``space`` (or sets ``optimizer.name: sgd``).
- ``GPU_SHARE``: the fraction of ``resources.gpus_per_trial`` one trial of the defense asks for
  when the spec sets ``resources.gpu_shares`` (its cost class: 0.25 for a defense that trains
  without a multi-step attack, 1 for adversarial training); 1 when absent."""
