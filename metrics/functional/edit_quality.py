"""Clean edit quality of an image editor: MSE and SSIM to the exact edit, and edit accuracy from a judge."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure

from metrics.functional._stats import _ratio_or_nan
from metrics.functional.image_distance import _per_image_mse


def _edit_quality_update(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sums of the per-image MSE and SSIM of one batch (float64) and its size.

    SSIM is torchmetrics' (Gaussian kernel 11, sigma 1.5, ``data_range=1``), per image, so that the mean
    over many batches equals the mean over one.
    """
    if not isinstance(target, Tensor) or target.shape != getattr(preds, "shape", None):
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(
            f"EditQuality: expected `target` (the exact edits) of the shape of `preds`"
            f" {tuple(getattr(preds, 'shape', ()))}, but got {shape}."
        )
    mse = _per_image_mse(preds, target, "target", "EditQuality")
    ssim = structural_similarity_index_measure(
        preds, target.to(preds.dtype), data_range=1.0, reduction="none"
    )
    count = torch.tensor(preds.shape[0], dtype=torch.long, device=preds.device)
    return mse.double().sum(), ssim.double().sum(), count


def _edit_quality_compute(mse_sum: Tensor, ssim_sum: Tensor, count: Tensor) -> dict[str, Tensor]:
    """``{"mse": mean MSE, "ssim": mean SSIM}``; NaN (with a warning) when nothing was seen."""
    return {
        "mse": _ratio_or_nan(mse_sum, count, "EditQuality"),
        "ssim": _ratio_or_nan(ssim_sum, count, "EditQuality"),
    }


def edit_quality(preds: Tensor, target: Tensor) -> dict[str, Tensor]:
    r"""Mean per-image MSE and SSIM of edited images against the exact edits, in [0, 1] pixels.

    .. math::
        \text{MSE} = \frac{1}{B}\sum_b \tfrac{1}{CHW}\lVert x_b - y_b\rVert_2^2,\qquad
        \text{SSIM} = \frac{1}{B}\sum_b \text{SSIM}(x_b, y_b)

    with torchmetrics' ``structural_similarity_index_measure`` (Gaussian window 11, sigma 1.5,
    ``data_range=1``). Lower MSE and higher SSIM are better; to say the editor edits at all, compare with
    the same numbers for the unedited source (``edit_quality(source, edited)``).

    Args:
        preds: ``(B, C, H, W)`` edited images in [0, 1] (finite; else a ``ValueError`` naming the rows).
        target: ``(B, C, H, W)`` exact edits in [0, 1].

    Returns:
        ``{"mse": ..., "ssim": ...}``, 0-dim float tensors.

    Example:
        >>> import torch
        >>> from metrics.functional import edit_quality
        >>> target = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> {k: round(v.item(), 4) for k, v in edit_quality(target, target).items()}
        {'mse': 0.0, 'ssim': 1.0}
    """
    return _edit_quality_compute(*_edit_quality_update(preds, target))


def _edit_accuracy_update(
    predicted: Sequence[str], requested: Sequence[str], device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """``(correct, counted)`` of one batch: how many predicted attributes equal the requested ones."""
    for name, values in (("predicted", predicted), ("requested", requested)):
        if (
            isinstance(values, str)
            or not isinstance(values, Sequence)
            or not all(isinstance(v, str) for v in values)
        ):
            raise ValueError(
                f"EditAccuracy: expected `{name}` to be a list of attribute names, but got {values!r}."
            )
    if len(predicted) != len(requested):
        raise ValueError(
            f"EditAccuracy: {len(predicted)} predicted attributes for {len(requested)} requested ones; give one"
            " prediction per edited image."
        )
    correct = sum(p == r for p, r in zip(predicted, requested))
    return (
        torch.tensor(correct, dtype=torch.long, device=device),
        torch.tensor(len(requested), dtype=torch.long, device=device),
    )


def _edit_accuracy_compute(correct: Tensor, counted: Tensor) -> Tensor:
    return _ratio_or_nan(correct, counted, "EditAccuracy")


def edit_accuracy(predicted: Sequence[str], requested: Sequence[str]) -> Tensor:
    r"""Share of edits that show the attribute their instruction asked for, as a judge sees it.

    .. math::
        \text{acc} = \frac{1}{B}\sum_b \mathbb{1}[\hat a_b = a_b]

    where :math:`a_b` is the requested attribute (e.g. ``"red"`` for "make the shape red.") and
    :math:`\hat a_b` the judge's prediction on the edited image (e.g. the zero-shot class of a CLIP judge
    among the attribute's values). Names are compared exactly.

    Args:
        predicted: ``B`` attribute names predicted on the edited images.
        requested: ``B`` attribute names the instructions asked for.

    Returns:
        A 0-dim float tensor in [0, 1]; NaN (with a warning) for an empty batch.

    Example:
        >>> from metrics.functional import edit_accuracy
        >>> edit_accuracy(["red", "blue", "navy"], ["red", "green", "navy"])
        tensor(0.6667)
    """
    return _edit_accuracy_compute(*_edit_accuracy_update(predicted, requested))
