"""Saliency: the maps (``maps``: gradients, guided backprop, Grad-CAM, ...), the learnt masking
model of the saliency detectors (``masking``) and what those detectors look at and train
(``detector_net``)."""
