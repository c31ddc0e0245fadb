"""Defense algorithms as plain, framework-free functions and modules.

- :mod:`defenses.invertune`: InverTune (target identification, trigger inversion, activation tuning).
- :mod:`defenses.cleanclip`: the CleanCLIP fine-tuning objective.
- :mod:`defenses.par`: the PAR (Perturb and Recover) fine-tuning objective.
- :mod:`defenses.contrastive`: the CLIP / InfoNCE losses they share.

Images are float ``B x 3 x H x W`` tensors in [0, 1] before model normalisation; a ``normalize``
callable maps them to the model's input space.
"""

from defenses.contrastive import clip_contrastive_loss, info_nce_loss

__all__ = ["clip_contrastive_loss", "info_nce_loss"]
