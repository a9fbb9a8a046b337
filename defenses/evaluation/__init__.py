"""Evaluating a defense: the attack cascade on the points still robust and the robustness
curve (``benchmark``), the gradient-masking checks whose attacks count too (``masking``), the
detectors' metrics (``detection``) and the result types (``results``)."""
