"""Helpers shared by the InverTune steps: image batches, validation, modes. The zero-shot classifier
itself (``encode_images``, ``zero_shot_logits``, ``zero_shot_predict``) is the CLIP family's
(:mod:`model_families.clip.zero_shot`), imported here for the steps."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from model_families.clip.zero_shot import Normalize, encode_images, zero_shot_logits, zero_shot_predict

__all__ = [
    "ImageData",
    "Normalize",
    "batch_images",
    "check_class_text_embeds",
    "check_target",
    "encode_images",
    "eval_mode",
    "frozen_parameters",
    "iter_image_batches",
    "model_device",
    "zero_shot_logits",
    "zero_shot_predict",
]


ImageData = Tensor | Iterable[Tensor | Sequence[Tensor] | Mapping[str, Tensor]]
"""A ``N x 3 x H x W`` tensor, or an iterable (e.g. a DataLoader) of image batches. A batch may be a
tensor, a tuple/list whose first element is the images, or a mapping with an ``"image"`` key."""


def model_device(model: nn.Module, fallback: Tensor | None = None) -> torch.device:
    """The device of the model's first parameter (or of ``fallback`` for parameter-free models)."""
    param = next(iter(model.parameters()), None)
    if param is not None:
        return param.device
    return fallback.device if fallback is not None else torch.device("cpu")


def batch_images(batch: Tensor | Sequence[Tensor] | Mapping[str, Tensor], name: str) -> Tensor:
    """The images of one batch: the tensor itself, the first element of a tuple, or ``batch["image"]``;
    anything else is a ``ValueError`` naming ``name``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        if "image" not in batch:
            raise ValueError(f"{name}: a mapping batch needs an 'image' key, got keys {sorted(batch)}")
        return batch["image"]
    if isinstance(batch, Sequence) and len(batch) > 0 and isinstance(batch[0], Tensor):
        return batch[0]
    raise ValueError(f"{name}: cannot read images from a batch of type {type(batch).__name__}")


def iter_image_batches(
    data: ImageData,
    batch_size: int,
    *,
    name: str = "images",
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Yield ``b x 3 x H x W`` image batches from a tensor (split into ``batch_size`` chunks, shuffled
    with ``generator`` when given) or from an iterable of batches (yielded as they come).

    Raises ``ValueError`` naming ``name`` when the data hold no image.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(data, Tensor):
        if data.ndim != 4 or data.shape[0] == 0:
            raise ValueError(f"{name} is empty or not a N x C x H x W tensor: shape {tuple(data.shape)}")
        order = torch.randperm(data.shape[0], generator=generator) if generator is not None else None
        for start in range(0, data.shape[0], batch_size):
            if order is None:
                yield data[start : start + batch_size]
            else:
                yield data[order[start : start + batch_size].to(data.device)]
        return
    seen = 0
    for batch in data:
        images = batch_images(batch, name)
        if images.ndim != 4:
            raise ValueError(f"{name}: expected B x C x H x W batches, got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            continue
        seen += images.shape[0]
        yield images
    if seen == 0:
        raise ValueError(f"{name} is empty: the clean image set holds no image")


def check_class_text_embeds(class_text_embeds: Tensor) -> int:
    """Validate a ``C x D`` class text embedding matrix and return ``C``."""
    if class_text_embeds.ndim != 2 or class_text_embeds.shape[0] == 0:
        raise ValueError(
            f"class_text_embeds must be a non-empty C x D tensor, got shape {tuple(class_text_embeds.shape)}"
        )
    return class_text_embeds.shape[0]


def check_target(target: int, num_classes: int) -> int:
    """Validate a class index against the vocabulary size."""
    if not 0 <= int(target) < num_classes:
        raise ValueError(
            f"target index {target} is outside the class vocabulary of {num_classes} classes "
            f"(expected 0 <= target < {num_classes})"
        )
    return int(target)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every parameter (inputs still get gradients)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily put ``model`` in eval mode, restoring each submodule's mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, mode in modes:
            m.train(mode)
