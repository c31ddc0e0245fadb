"""Measure each domain shift of an instruction datamodule with a CLIP image encoder: the KS statistic of
:func:`metrics.functional.domain_shift.similarity_ks` between the source evaluation images and the same samples
under the shift (the paper measures its shifts with CLIP; here the project's tiny CLIP or any CLIP export)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from metrics.functional.domain_shift import similarity_ks

__all__ = ["clip_image_encoder", "shift_ks"]


def clip_image_encoder(bundle) -> Callable[[Tensor], Tensor]:
    """``images -> L2-normalised CLIP image embeddings`` of a :class:`model_families.clip.ClipBundle` (no grad)."""
    from model_families.clip import encode_images

    model = bundle.model.eval()

    @torch.no_grad()
    def encode(images: Tensor) -> Tensor:
        device = next(model.parameters()).device
        return encode_images(model, images.to(device), bundle.normalize.to(device)).cpu()

    return encode


def _images(source, limit: int | None, batch_size: int, encode: Callable[[Tensor], Tensor]) -> Tensor:
    count = len(source) if limit is None else min(limit, len(source))
    if count == 0:
        raise ValueError(f"the evaluation source {source.describe()} has no samples to measure a shift on")
    chunks = []
    for start in range(0, count, batch_size):
        chunks.append(
            encode(torch.stack([source[i]["image"] for i in range(start, min(start + batch_size, count))]))
        )
    return torch.cat(chunks)


def shift_ks(
    datamodule,
    encode: Callable[[Tensor], Tensor],
    split: str = "test",
    limit: int | None = 500,
    batch_size: int = 64,
) -> dict[str, float]:
    """``{shift: KS}`` for every shift of ``datamodule.eval_shift_names()`` on its ``split`` (``val``/``test``)
    source, images encoded by ``encode``. An instruction-only shift (``paraphrase``) has the source's images and
    KS 0 by construction: the KS here measures the image side of a shift."""
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    datamodule.setup("test")
    source = datamodule.val_source if split == "val" else datamodule.test_source
    reference = _images(source, limit, batch_size, encode)
    shifted = datamodule.build_shifts(source)
    return {
        name: float(similarity_ks(reference, _images(copy, limit, batch_size, encode)))
        for name, copy in shifted.items()
    }
