"""One module per defense: ``SPACE`` (plain data over that defense's hyperparameters and the
training keys ``lr``/``weight_decay``, in the spec's ``space:`` form: a list is a choice,
``{low, high, log}`` a range, anything else a fixed value) and ``KEY_HPARAMS`` (what the
dashboard shows). ``orchestrator.spec.build_space`` finds them by the defense's name and turns
them into Ray Tune domains; no search space imports Ray."""
