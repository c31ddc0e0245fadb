"""The defender's clean images as InverTune's steps read them: all of them, or those not of a class.

A clean set is a re-iterable source of image batches (a DataLoader, a list of tensors or of dicts with
an ``"image"`` key). The class of a clean image is either the suspect's zero-shot prediction
(``source="predicted"``: no labels needed) or its label (``source="label"``: batches with a ``"label"``
key).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
from torch import Tensor, nn

from defenses.invertune.zero_shot import Normalize, batch_images, zero_shot_logits, zero_shot_predict

log = logging.getLogger(__name__)

ReferenceSource = Literal["predicted", "label"]


class CleanImages:
    """Re-iterable view of a loader's image batches on ``device``, optionally without the images of
    class ``exclude`` (by ``source``: the suspect ``model``'s zero-shot predictions over the class
    embeddings ``text``, or the batches' labels)."""

    def __init__(
        self,
        loader: Iterable,
        device: torch.device,
        *,
        exclude: int | None = None,
        source: ReferenceSource = "predicted",
        model: nn.Module | None = None,
        text: Tensor | None = None,
        normalize: Normalize | None = None,
    ) -> None:
        self.loader, self.device, self.exclude, self.source = loader, device, exclude, source
        self.model, self.text, self.normalize = model, text, normalize

    def classes(self, batch, images: Tensor) -> Tensor:
        """The class of every image of ``batch`` (its label, or the suspect's prediction)."""
        if self.source == "label":
            if not isinstance(batch, dict) or "label" not in batch:
                raise ValueError("reference_source='label' needs batches with a 'label' key")
            return batch["label"].to(self.device)
        return zero_shot_predict(self.model, images, self.text, self.normalize)

    def __iter__(self) -> Iterator[Tensor]:
        for batch in self.loader:
            images = batch_images(batch, "clean images").to(self.device)
            if self.exclude is not None:
                images = images[self.classes(batch, images) != self.exclude]
            if images.shape[0]:
                yield images

    def size(self) -> tuple[int, tuple[int, ...]]:
        """(number of images, shape ``C x H x W`` of one image); an empty set is a ``ValueError``."""
        num_images, image_shape = 0, None
        for images in self:
            num_images += images.shape[0]
            image_shape = tuple(images.shape[1:])
        if num_images == 0 or image_shape is None:
            raise ValueError("the defender's clean image set is empty: InverTune needs clean images")
        return num_images, image_shape


def reference_images(view: CleanImages, target: int, max_images: int) -> Tensor:
    """Up to ``max_images`` clean images of class ``target`` (by ``view``'s source), read from
    ``view.loader``.

    With ``source="predicted"`` and no clean image predicted as ``target``, the images with the highest
    zero-shot score for ``target`` are used instead (logged as a warning)."""
    device = view.device
    found: list[Tensor] = []
    count = 0
    best_images, best_scores = None, None
    for batch in view.loader:
        images = batch_images(batch, "clean images").to(device)
        found.append(images[view.classes(batch, images) == target])
        count += found[-1].shape[0]
        if count >= max_images:
            break
        if view.source == "predicted":
            with torch.no_grad():
                features = view.model.encode_image(view.normalize(images))
                scores = zero_shot_logits(features, view.text).softmax(dim=-1)[:, target]
            pool = images if best_images is None else torch.cat([best_images, images])
            pool_scores = scores if best_scores is None else torch.cat([best_scores, scores])
            top = pool_scores.topk(min(max_images, pool_scores.numel())).indices
            best_images, best_scores = pool[top], pool_scores[top]
    if count == 0 and best_images is not None:
        log.warning(
            "no clean image is predicted as the target class %d; using the %d images with the highest "
            "zero-shot score for it as L_emb references",
            target,
            best_images.shape[0],
        )
        return best_images
    if not found:
        return torch.empty(0, device=device)
    return torch.cat(found)[:max_images]
