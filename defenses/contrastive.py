"""Contrastive losses shared by the fine-tuning defenses (CleanCLIP, PAR)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import Tensor

_CLIP_LOSS = ClipLoss()  # single process: no feature gathering, no label cache


def clip_contrastive_loss(
    image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float
) -> Tensor:
    """Symmetric CLIP loss, delegated to :class:`open_clip.loss.ClipLoss` (single process).

    ``L_CLIP = 1/2 [CE(s * I T^T, arange(B)) + CE(s * T I^T, arange(B))]`` with ``I``, ``T`` the
    L2-normalised ``B x D`` image and text features and ``s`` the *exponentiated* logit scale (what
    ``CLIP.forward`` returns as ``logit_scale``). Features are normalised here, so raw encoder outputs
    may be passed.
    """
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features {tuple(image_features.shape)} and text_features "
            f"{tuple(text_features.shape)} must have the same B x D shape"
        )
    return _CLIP_LOSS(F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1), logit_scale)


def info_nce_loss(queries: Tensor, keys: Tensor, logit_scale: Tensor | float) -> Tensor:
    """One-directional InfoNCE between paired views: ``CE(s * Q K^T, arange(B))``.

    Row ``i`` of ``queries`` is the positive of row ``i`` of ``keys``; every other row of ``keys`` is a
    negative. This is CleanCLIP's in-modal term (``image_embeds @ augmented_image_embeds.t()``).
    Features are L2-normalised here; ``logit_scale`` is the exponentiated scale.
    """
    if queries.shape != keys.shape:
        raise ValueError(
            f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must have the same B x D shape"
        )
    logits = logit_scale * F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T
    labels = torch.arange(queries.shape[0], device=queries.device)
    return F.cross_entropy(logits, labels)
