"""Models: architectures, loading (:mod:`~editing.models.loader`), the bundled demo model, tiny
random models, tokens and converted pretrained models."""
