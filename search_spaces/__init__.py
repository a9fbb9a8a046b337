"""One module per defense: ``SPACE`` (a Ray Tune search space over that defense's
hyperparameters and the training keys ``lr``/``weight_decay``) and ``KEY_HPARAMS`` (what the
dashboard shows). ``orchestrator.spec.space_for(name)`` finds them by the defense's name."""
