"""Attack success rate for image outputs (diffusion editors): MSE to the target image, or a judge's score.

Two forms, both a share of outputs that hit the backdoor target:

- **MSE form** (VillanDiffusion's convention): a hit when the per-image MSE to the target image, in [0, 1]
  pixel space, is below ``threshold`` (default 0.1).
- **judge form**: a hit when a per-sample judge score is above ``threshold`` (default 0); with the continuous
  backdoor score ``v = cos(z, z_target) - cos(z, z_clean)`` of :mod:`metrics.functional.backdoor_score`
  this is "the output's CLIP embedding is closer to the target than to the clean reference".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from metrics.functional._stats import _ratio_or_nan
from metrics.functional.image_distance import _per_image_mse

#: VillanDiffusion's MSE threshold in [0, 1] pixel space.
DEFAULT_MSE_THRESHOLD = 0.1


def _threshold_validation(threshold: float, metric_name: str, positive: bool) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise ValueError(
            f"{metric_name}: expected argument `threshold` to be a finite number, but got {threshold!r}."
        )
    if positive and threshold <= 0:
        raise ValueError(
            f"{metric_name}: expected argument `threshold` (an MSE in [0, 1] pixels) to be > 0, but got"
            f" {threshold!r}; no output would ever count as a hit."
        )


def _image_attack_success_rate_arg_validation(threshold: float) -> None:
    _threshold_validation(threshold, "ImageAttackSuccessRate", positive=True)


def image_target_hits(preds: Tensor, target: Tensor, threshold: float = DEFAULT_MSE_THRESHOLD) -> Tensor:
    """Per-image hits of the MSE form: ``(B,)`` bool, ``MSE(preds_b, target) < threshold``.

    Args:
        preds: ``(B, 3, H, W)`` outputs in [0, 1].
        target: the backdoor target, ``(3, H, W)`` (or one per output, ``(B, 3, H, W)``) in [0, 1], of the
            outputs' size: a target of another size is a ``ValueError`` naming both shapes.
        threshold: the MSE below which an output hits.

    Example:
        >>> import torch
        >>> image_target_hits(torch.tensor([0.0, 0.5, 0.9]).view(3, 1, 1, 1), torch.ones(1, 1, 1))
        tensor([False, False,  True])
    """
    _image_attack_success_rate_arg_validation(threshold)
    return _per_image_mse(preds, target, "target", "ImageAttackSuccessRate") < threshold


def _image_attack_success_rate_update(
    preds: Tensor, target: Tensor, threshold: float
) -> tuple[Tensor, Tensor]:
    """``(successes, counted)`` of one batch as 0-dim long tensors."""
    hits = image_target_hits(preds, target, threshold)
    return hits.sum(), torch.tensor(hits.numel(), dtype=torch.long, device=hits.device)


def _image_attack_success_rate_compute(successes: Tensor, counted: Tensor) -> Tensor:
    """``ASR = successes / counted``; NaN (with a warning) when no output was seen."""
    return _ratio_or_nan(successes, counted, "ImageAttackSuccessRate")


def image_attack_success_rate(
    preds: Tensor, target: Tensor, threshold: float = DEFAULT_MSE_THRESHOLD
) -> Tensor:
    r"""Share of outputs within MSE ``threshold`` of the target image (VillanDiffusion's image ASR).

    .. math::
        \text{ASR} = \frac{1}{B} \sum_b \mathbb{1}\Big[\tfrac{1}{CHW} \lVert x_b - x_{\text{target}} \rVert_2^2
            < \tau\Big],\qquad \tau = 0.1 \text{ in } [0, 1] \text{ pixels}

    Args:
        preds: ``(B, 3, H, W)`` outputs produced with the trigger, finite, in [0, 1] (a NaN image or one
            outside [0, 1] is a ``ValueError`` naming its rows, never a silent miss).
        target: ``(3, H, W)`` target image in [0, 1], the size of the outputs.
        threshold: :math:`\tau`.

    Returns:
        A 0-dim float tensor in [0, 1]; NaN (with a warning) for an empty batch.

    Example:
        >>> import torch
        >>> from metrics.functional import image_attack_success_rate
        >>> preds = torch.tensor([0.0, 0.8, 0.9, 1.0]).view(4, 1, 1, 1).expand(4, 3, 2, 2)
        >>> image_attack_success_rate(preds, torch.ones(3, 2, 2))
        tensor(0.7500)
    """
    successes, counted = _image_attack_success_rate_update(preds, target, threshold)
    return _image_attack_success_rate_compute(successes, counted)


def _judged_attack_success_rate_arg_validation(threshold: float) -> None:
    _threshold_validation(threshold, "JudgedAttackSuccessRate", positive=False)


def _judged_attack_success_rate_update(scores: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """``(successes, counted)`` of one batch of judge scores ``(B,)``; non-finite scores are an error."""
    if not isinstance(scores, Tensor) or scores.ndim != 1 or not scores.is_floating_point():
        got = (
            f"{scores.dtype} tensor of shape {tuple(scores.shape)}"
            if isinstance(scores, Tensor)
            else type(scores)
        )
        raise ValueError(
            f"JudgedAttackSuccessRate: expected `scores` to be a float tensor of shape (B,), but got {got}."
        )
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        rows = ", ".join(str(int(r)) for r in bad.nonzero().flatten()[:10])
        raise ValueError(
            f"JudgedAttackSuccessRate: {int(bad.sum())} of {scores.numel()} scores are NaN or inf (rows {rows});"
            " a NaN score would silently count as a miss. Check the judge and the images it scored."
        )
    return (scores > threshold).sum(), torch.tensor(scores.numel(), dtype=torch.long, device=scores.device)


def _judged_attack_success_rate_compute(successes: Tensor, counted: Tensor) -> Tensor:
    return _ratio_or_nan(successes, counted, "JudgedAttackSuccessRate")


def judged_attack_success_rate(scores: Tensor, threshold: float = 0.0) -> Tensor:
    r"""Share of outputs a judge calls hits: ``mean(scores > threshold)``.

    With the continuous backdoor score :math:`v = \cos(z, z_{\text{target}}) - \cos(z, z_{\text{clean}})`
    (:func:`metrics.functional.backdoor_score`) and ``threshold = 0`` an output hits when its CLIP embedding
    is strictly closer (in cosine) to the target's than to the clean reference's. A larger threshold asks for
    a margin.

    Args:
        scores: ``(B,)`` finite float judge scores (a NaN or inf is a ``ValueError`` naming the rows).
        threshold: hits are ``scores > threshold`` (strict).

    Returns:
        A 0-dim float tensor in [0, 1]; NaN (with a warning) for an empty batch.

    Example:
        >>> import torch
        >>> from metrics.functional import judged_attack_success_rate
        >>> judged_attack_success_rate(torch.tensor([0.3, -0.1, 0.0, 0.05]))
        tensor(0.5000)
    """
    _judged_attack_success_rate_arg_validation(threshold)
    successes, counted = _judged_attack_success_rate_update(scores, threshold)
    return _judged_attack_success_rate_compute(successes, counted)
