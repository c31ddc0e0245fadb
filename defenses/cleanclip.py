"""CleanCLIP (Bansal et al., ICCV 2023): fine-tune on clean pairs with in-modal self-supervision.

    L = w_clip * L_CLIP(I, T) + w_img * L_NCE(I, I_aug) + w_txt * L_NCE(T, T_aug)

``L_CLIP`` is the symmetric CLIP loss and ``L_NCE(a, b) = CE(s * a b^T, arange(B))`` the one-directional
in-modal InfoNCE between a view and its augmentation (:mod:`defenses.contrastive`); ``s`` is the
exponentiated logit scale. Weights default to 1 (the spec; the CleanCLIP code averages the two in-modal
terms, i.e. 0.5 each). Real-scale recipe: AdamW lr 1e-5, batch 64, 10 epochs on 100K clean pairs.

Augmentations (seeded with a ``torch.Generator``):
- images (:func:`augment_images`): random resized crop (area 0.5-1), horizontal flip (p 0.5), brightness
  and contrast jitter (+-0.4), batched in [0, 1]; a stand-in for CleanCLIP's AutoAugment that works on
  float tensors on the model's device. Any ``images -> images`` callable can replace it.
- text (:func:`augment_text`): EDA's random deletion (each word dropped with p 0.1, at least one word
  kept) and random swap (one swap of two word positions); CleanCLIP uses full EDA, whose synonym
  replacement and insertion need WordNet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defenses.contrastive import clip_contrastive_loss, info_nce_loss

ImageAugmentation = Callable[[Tensor, torch.Generator], Tensor]
TextAugmentation = Callable[[Sequence[str], torch.Generator], list[str]]
Tokenizer = Callable[[list[str]], Tensor]


def _uniform(low: float, high: float, size: int, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(size, generator=generator)


def augment_images(
    images: Tensor,
    generator: torch.Generator,
    *,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    flip_p: float = 0.5,
    brightness: float = 0.4,
    contrast: float = 0.4,
) -> Tensor:
    """Batched random resized crop (square, area fraction in ``crop_scale``), horizontal flip,
    brightness and contrast jitter of [0, 1] images; every image draws its own parameters."""
    batch = images.shape[0]
    side = _uniform(*crop_scale, batch, generator).sqrt()  # crop side as a fraction of the image
    centre_x = (torch.rand(batch, generator=generator) * 2 - 1) * (1 - side)
    centre_y = (torch.rand(batch, generator=generator) * 2 - 1) * (1 - side)
    flip = torch.where(torch.rand(batch, generator=generator) < flip_p, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = side * flip
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = side
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    bright = _uniform(1 - brightness, 1 + brightness, batch, generator).to(images).view(-1, 1, 1, 1)
    contr = _uniform(1 - contrast, 1 + contrast, batch, generator).to(images).view(-1, 1, 1, 1)
    out = out * bright
    grey = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - grey) * contr + grey).clamp(0.0, 1.0)


def augment_text(
    captions: Sequence[str], generator: torch.Generator, *, p_drop: float = 0.1, n_swaps: int = 1
) -> list[str]:
    """EDA random deletion (each word with probability ``p_drop``, at least one kept) then ``n_swaps``
    random swaps of two word positions, per caption."""
    out = []
    for caption in captions:
        words = caption.split()
        if not words:
            out.append(caption)
            continue
        keep = (torch.rand(len(words), generator=generator) >= p_drop).tolist()
        kept = [w for w, k in zip(words, keep, strict=True) if k]
        if not kept:
            kept = [words[int(torch.randint(len(words), (1,), generator=generator))]]
        for _ in range(n_swaps if len(kept) > 1 else 0):
            i, j = torch.randint(len(kept), (2,), generator=generator).tolist()
            kept[i], kept[j] = kept[j], kept[i]
        out.append(" ".join(kept))
    return out


@dataclass(frozen=True)
class CleanCLIPLossOutput:
    total: Tensor
    clip: Tensor
    image_nce: Tensor
    text_nce: Tensor


def cleanclip_loss(
    image_features: Tensor,
    text_features: Tensor,
    aug_image_features: Tensor,
    aug_text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    clip_weight: float = 1.0,
    image_weight: float = 1.0,
    text_weight: float = 1.0,
) -> CleanCLIPLossOutput:
    """``w_clip L_CLIP(I, T) + w_img L_NCE(I, I_aug) + w_txt L_NCE(T, T_aug)`` on ``B x D`` features."""
    clip = clip_contrastive_loss(image_features, text_features, logit_scale)
    image_nce = info_nce_loss(image_features, aug_image_features, logit_scale)
    text_nce = info_nce_loss(text_features, aug_text_features, logit_scale)
    total = clip_weight * clip + image_weight * image_nce + text_weight * text_nce
    return CleanCLIPLossOutput(total=total, clip=clip, image_nce=image_nce, text_nce=text_nce)


class CleanCLIPObjective:
    """Computes the CleanCLIP loss of ``model`` on a batch of clean (image, caption) pairs.

    ``tokenizer`` maps captions to token ids (an open_clip tokenizer); ``normalize`` maps [0, 1] images
    to the model's input space. Augmentations draw from a generator seeded with ``seed``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        normalize: Callable[[Tensor], Tensor],
        *,
        clip_weight: float = 1.0,
        image_weight: float = 1.0,
        text_weight: float = 1.0,
        image_augmentation: ImageAugmentation = augment_images,
        text_augmentation: TextAugmentation = augment_text,
        seed: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.normalize = normalize
        self.weights = {"clip_weight": clip_weight, "image_weight": image_weight, "text_weight": text_weight}
        self.image_augmentation = image_augmentation
        self.text_augmentation = text_augmentation
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model: nn.Module, images: Tensor, captions: Sequence[str]) -> CleanCLIPLossOutput:
        device = images.device
        aug_images = self.image_augmentation(images, self.generator)
        aug_captions = self.text_augmentation(list(captions), self.generator)
        image_features = model.encode_image(self.normalize(torch.cat([images, aug_images])))
        text_features = model.encode_text(self.tokenizer([*captions, *aug_captions]).to(device))
        batch = images.shape[0]
        return cleanclip_loss(
            image_features[:batch],
            text_features[:batch],
            image_features[batch:],
            text_features[batch:],
            model.logit_scale.exp(),
            **self.weights,
        )
