"""Saliency-based adversarial defenses, baselines, attacks and evaluation in pure PyTorch.

This package never imports Ray: it is a library a researcher can use in a notebook."""
