"""DiSP: Diffusion Self-Purification (Wan et al., 2026) for masked diffusion VLMs.

- ``saliency``: vision-token saliency (Fisher-Jacobian quadratic form at the first generation step,
  Hutchinson estimators batched with ``torch.func``) and the attention-based ablation score.
- ``masking``: choosing the top-rho tokens (saliency / random / attention) and masking them (mask
  embedding) or deleting them, at inference time.
- ``purify``: self-purification of a (poisoned) training set by the compromised model itself: batched,
  sharded over DDP ranks, resumable, written atomically next to a manifest.
"""

from defenses.disp.saliency import ESTIMATORS, attention_saliency, vision_token_saliency

__all__ = ["ESTIMATORS", "attention_saliency", "vision_token_saliency"]
