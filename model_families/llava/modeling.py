"""Inputs of transformers' ``LlavaForConditionalGeneration`` from a batch of the instruction collator.

The collator gives one ``<image>`` id per prompt (family-free); LLaVA needs as many image tokens as the vision
tower gives features (576 for LLaVA-1.5, 16 for the tiny model): :func:`expand_image_tokens` repeats the slot in
place, for ids, attention mask and label masks alike. Images arrive in ``[0, 1]`` and are normalised with the
snapshot's image statistics (:func:`normalize_images`, CLIP's for LLaVA-1.5). Positions count only attended
tokens (:func:`position_ids`), so a left-padded prompt is encoded as it would be alone, in training and in
``generate`` alike. The loss is on the response only: the answer and its ``</s>`` (:func:`response_labels`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "expand_image_tokens", "normalize_images", "position_ids", "response_labels"]

IGNORE_INDEX = -100  # label of positions without loss (transformers' CrossEntropy ignore_index)


def expand_image_tokens(
    input_ids: Tensor, image_token_index: int, count: int, *masks: Tensor
) -> tuple[Tensor, ...]:
    """``input_ids`` (and each of ``masks``, same shape) with every row's one image slot repeated ``count``
    times in place; rows that already hold ``count`` image tokens (a processor's output) are returned as
    they are.

    Raises ``ValueError`` naming the first bad row when a row holds another number of image tokens (e.g. a
    processor expanded for another vision tower)."""
    per_row = (input_ids == image_token_index).sum(dim=1)
    if bool((per_row == count).all()):
        return (input_ids, *masks)
    if not bool((per_row == 1).all()):
        bad = int(torch.nonzero((per_row != 1) & (per_row != count))[0, 0]) if count != 1 else 0
        raise ValueError(
            f"row {bad} of the batch holds {int(per_row[bad])} image tokens (id {image_token_index}); the "
            f"vision tower gives {count} features per image: a prompt holds one image slot (expanded here) "
            f"or exactly {count} image tokens"
        )
    repeats = torch.where(input_ids == image_token_index, count, 1).flatten()
    rows = input_ids.shape[0]
    return tuple(t.flatten().repeat_interleave(repeats).view(rows, -1) for t in (input_ids, *masks))


def normalize_images(
    pixel_values: Tensor, mean: Sequence[float], std: Sequence[float], image_size: int, dtype: torch.dtype
) -> Tensor:
    """``(x - mean) / std`` per channel of ``(B, 3, S, S)`` images in ``[0, 1]``, cast to the model's dtype;
    ``S`` must be the vision tower's ``image_size`` (the datamodule renders or resizes to it)."""
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[-2:]) != (image_size, image_size):
        raise ValueError(
            f"images of shape {tuple(pixel_values.shape)}; the vision tower takes (B, 3, {image_size}, "
            f"{image_size}): set data.image_size={image_size}"
        )
    mean_t = torch.tensor(mean, device=pixel_values.device, dtype=pixel_values.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=pixel_values.device, dtype=pixel_values.dtype).view(1, -1, 1, 1)
    return ((pixel_values - mean_t) / std_t).to(dtype)


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions ``0, 1, ...`` over the attended tokens of each row (left padding gets 0)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def response_labels(input_ids: Tensor, response_mask: Tensor, response_tokens: Tensor) -> Tensor:
    """Labels of the response-only loss: ``input_ids`` on the first ``response_tokens[b]`` response positions
    of row ``b`` (the answer and its ``</s>``), :data:`IGNORE_INDEX` elsewhere (prompt, image tokens, EOS
    padding). The causal shift is the loss's (transformers shifts labels by one)."""
    offset = response_mask.long().cumsum(dim=1)  # 1, 2, ... over the response region
    keep = response_mask.bool() & (offset <= response_tokens.to(offset.device)[:, None])
    return torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
