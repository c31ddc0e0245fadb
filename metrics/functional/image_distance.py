"""Per-image distances between images in [0, 1]: the shared input check and the per-image MSE.

Used by the image-output ASR (distance to the backdoor target) and by the clean edit quality (distance to
the exact edit). Images are float ``B x C x H x W`` tensors in [0, 1] pixel space, the space in which
VillanDiffusion's ASR threshold (MSE < 0.1) is defined.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Slack for the [0, 1] range check (float round-off of a clamp or a decode).
RANGE_TOLERANCE = 1e-6


def _rows(mask: Tensor) -> str:
    rows = mask.nonzero().flatten()
    return ", ".join(str(int(r)) for r in rows[:10]) + (", ..." if rows.numel() > 10 else "")


def _images_validation(images: Tensor, name: str, metric_name: str) -> None:
    """``images`` must be a finite float ``B x C x H x W`` tensor in [0, 1]; else a ``ValueError`` naming the rows.

    A NaN image would count as a miss (``nan < t`` is false), which reads as "the attack failed" or "the
    defense worked"; an image in [-1, 1] or [0, 255] makes the MSE threshold meaningless.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = (
            f"{images.dtype} tensor of shape {tuple(images.shape)}"
            if isinstance(images, Tensor)
            else type(images)
        )
        raise ValueError(
            f"{metric_name}: expected `{name}` to be float images B x C x H x W in [0, 1], but got {got}."
        )
    flat = images.detach().flatten(1)
    bad = ~torch.isfinite(flat).all(dim=1)
    if bool(bad.any()):
        raise ValueError(
            f"{metric_name}: {int(bad.sum())} of {images.shape[0]} images of `{name}` hold NaN or inf (rows"
            f" {_rows(bad)}); scored, they would silently count as misses. Check the model that produced them."
        )
    if flat.numel():
        out = (flat.amin(dim=1) < -RANGE_TOLERANCE) | (flat.amax(dim=1) > 1 + RANGE_TOLERANCE)
        if bool(out.any()):
            raise ValueError(
                f"{metric_name}: {int(out.sum())} of {images.shape[0]} images of `{name}` leave [0, 1] (rows"
                f" {_rows(out)}; min {float(flat.min()):.4g}, max {float(flat.max()):.4g}); image metrics are"
                " defined on [0, 1] pixels (convert [-1, 1] with x / 2 + 0.5, [0, 255] with x / 255)."
            )


def _reference_validation(images: Tensor, reference: Tensor, name: str, metric_name: str) -> Tensor:
    """Check ``reference`` (``C x H x W`` for all images, or ``B x C x H x W``) and broadcast it to ``images``."""
    if isinstance(reference, Tensor) and reference.ndim == 3:
        reference = reference.unsqueeze(0)
    _images_validation(reference, name, metric_name)
    if reference.shape[1:] != images.shape[1:] or reference.shape[0] not in (1, images.shape[0]):
        raise ValueError(
            f"{metric_name}: `{name}` of shape {tuple(reference.shape)} does not fit images of shape"
            f" {tuple(images.shape)}: expected {tuple(images.shape[1:])} or {tuple(images.shape)} (the same"
            " channels and size as the outputs)."
        )
    return reference.expand_as(images)


def _per_image_mse(images: Tensor, reference: Tensor, reference_name: str, metric_name: str) -> Tensor:
    """:func:`per_image_mse` with the names the errors use."""
    _images_validation(images, "preds", metric_name)
    reference = _reference_validation(images, reference, reference_name, metric_name)
    return (images - reference.to(images.dtype)).square().flatten(1).mean(dim=1)


def per_image_mse(images: Tensor, reference: Tensor) -> Tensor:
    r"""Mean squared error of each image to a reference, in [0, 1] pixel space.

    .. math::
        \text{MSE}_b = \frac{1}{CHW} \sum_{c,h,w} (x_{bchw} - r_{bchw})^2

    Args:
        images: ``(B, C, H, W)`` finite float images in [0, 1].
        reference: one ``(C, H, W)`` image for all (a backdoor target) or ``(B, C, H, W)`` (the exact edits).

    Returns:
        ``(B,)`` float tensor.

    Example:
        >>> import torch
        >>> per_image_mse(torch.zeros(2, 1, 2, 2), torch.tensor([[[0.0, 0.0], [0.0, 1.0]]]))
        tensor([0.2500, 0.2500])
    """
    return _per_image_mse(images, reference, "reference", "per_image_mse")
