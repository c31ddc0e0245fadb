"""PAR, Perturb and Recover (Singh, Croce and Hein, arXiv 2412.00727): fine-tune the poisoned model
while pushing its embeddings of perturbed inputs away from those of a frozen copy ``f_p``:

    L = L_CLIP(f(x~), g(t)) - 1/2 [thr(||f(x~) - f_p(x~)||^2) + thr(||g(t~) - g_p(t~)||^2)]
    thr(z) = z if z <= tau else 0,   tau = 2.15

Embeddings are L2-normalised (so ``||.||^2 <= 4``). As in the authors' code the squared distance is
averaged over the batch *before* thresholding (``reduction="batch_mean"``); ``"per_sample"``
thresholds each sample's distance and then averages. ``L_CLIP`` is computed on the perturbed images, as
in the code. ``x~`` (:func:`perturb_images`): Gaussian noise sigma 0.2 with probability 0.5, then random
erasing with probability 0.5 (torchvision's defaults: area 0.02-0.33, aspect 0.3-3.3, value 0).
Text perturbation: the authors' code feeds both text towers the *unperturbed* captions (``t~ = t``),
the default here; pass ``text_perturbation`` (e.g. :func:`defenses.cleanclip.augment_text`) to perturb
them. Real-scale recipe: AdamW lr 3e-6, weight decay 1e-4.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defenses.contrastive import clip_contrastive_loss

Reduction = Literal["batch_mean", "per_sample"]
TextPerturbation = Callable[[Sequence[str], torch.Generator], list[str]]
Tokenizer = Callable[[list[str]], Tensor]


def random_erasing(
    images: Tensor,
    generator: torch.Generator,
    *,
    p: float = 0.5,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
    value: float = 0.0,
    attempts: int = 10,
) -> Tensor:
    """Random erasing (Zhong et al., 2020) per image, torchvision's algorithm: with probability ``p``
    fill a rectangle of area fraction in ``scale`` and log-uniform aspect ratio in ``ratio``
    (up to ``attempts`` draws to fit) with ``value``."""
    out = images.clone()
    height, width = images.shape[-2:]
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for index in range(images.shape[0]):
        if float(torch.rand(1, generator=generator)) >= p:
            continue
        for _ in range(attempts):
            area = height * width * float(torch.empty(1).uniform_(*scale, generator=generator))
            aspect = math.exp(float(torch.empty(1).uniform_(*log_ratio, generator=generator)))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < h < height and 0 < w < width:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                out[index, :, top : top + h, left : left + w] = value
                break
    return out


def perturb_images(
    images: Tensor,
    generator: torch.Generator,
    *,
    noise_std: float = 0.2,
    noise_p: float = 0.5,
    erase_p: float = 0.5,
) -> Tensor:
    """PAR's ``x~``: per image, with probability ``noise_p`` add N(0, noise_std^2) noise (clipped to
    [0, 1]), then random erasing with probability ``erase_p``."""
    batch = images.shape[0]
    noisy = torch.rand(batch, generator=generator) < noise_p
    noise = torch.randn(images.shape, generator=generator) * noise_std
    out = torch.where(
        noisy.view(-1, 1, 1, 1).to(images.device), (images + noise.to(images)).clamp(0, 1), images
    )
    return random_erasing(out, generator, p=erase_p)


def threshold(z: Tensor, tau: float = 2.15) -> Tensor:
    """``thr(z) = z if z <= tau else 0`` (element-wise)."""
    return torch.where(z <= tau, z, torch.zeros_like(z))


def thresholded_distance(
    features: Tensor, frozen_features: Tensor, *, tau: float = 2.15, reduction: Reduction = "batch_mean"
) -> Tensor:
    """``thr(||u - v||^2)`` between L2-normalised ``B x D`` features, reduced as ``reduction`` says."""
    squared = (
        (F.normalize(features, dim=-1) - F.normalize(frozen_features, dim=-1).to(features)).pow(2).sum(dim=-1)
    )
    if reduction == "batch_mean":
        return threshold(squared.mean(), tau)
    if reduction == "per_sample":
        return threshold(squared, tau).mean()
    raise ValueError(f"reduction must be 'batch_mean' or 'per_sample', got {reduction!r}")


@dataclass(frozen=True)
class PARLossOutput:
    total: Tensor
    clip: Tensor
    image_distance: Tensor
    text_distance: Tensor


def par_loss(
    image_features: Tensor,
    text_features: Tensor,
    frozen_image_features: Tensor,
    frozen_text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    tau: float = 2.15,
    reduction: Reduction = "batch_mean",
    perturbed_text_features: Tensor | None = None,
) -> PARLossOutput:
    """``L_CLIP(I~, T) - 1/2 [thr(||I~ - I~_p||^2) + thr(||T~ - T~_p||^2)]`` on ``B x D`` features.

    ``image_features``: tuned model on perturbed images ``x~``; ``text_features``: tuned model on the
    captions ``t``; ``frozen_*``: the frozen poisoned copy on ``x~`` and ``t~``. When the captions are
    perturbed, ``perturbed_text_features`` (tuned model on ``t~``) enter the distance term; by default
    ``t~ = t`` and ``text_features`` do.
    """
    clip = clip_contrastive_loss(image_features, text_features, logit_scale)
    distance_text = text_features if perturbed_text_features is None else perturbed_text_features
    image_distance = thresholded_distance(image_features, frozen_image_features, tau=tau, reduction=reduction)
    text_distance = thresholded_distance(distance_text, frozen_text_features, tau=tau, reduction=reduction)
    total = clip - 0.5 * (image_distance + text_distance)
    return PARLossOutput(total=total, clip=clip, image_distance=image_distance, text_distance=text_distance)


class PARObjective:
    """Computes the PAR loss of ``model`` against ``frozen_model`` (the poisoned model before tuning,
    kept frozen by the caller) on a batch of clean (image, caption) pairs."""

    def __init__(
        self,
        frozen_model: nn.Module,
        tokenizer: Tokenizer,
        normalize: Callable[[Tensor], Tensor],
        *,
        tau: float = 2.15,
        reduction: Reduction = "batch_mean",
        text_perturbation: TextPerturbation | None = None,
        seed: int = 0,
    ) -> None:
        self.frozen_model = frozen_model
        self.tokenizer = tokenizer
        self.normalize = normalize
        self.tau = tau
        self.reduction = reduction
        self.text_perturbation = text_perturbation
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model: nn.Module, images: Tensor, captions: Sequence[str]) -> PARLossOutput:
        device = images.device
        perturbed = self.normalize(perturb_images(images, self.generator))
        tokens = self.tokenizer(list(captions)).to(device)
        if self.text_perturbation is None:
            perturbed_tokens = tokens
        else:
            perturbed_tokens = self.tokenizer(self.text_perturbation(list(captions), self.generator)).to(
                device
            )
        image_features = model.encode_image(perturbed)
        text_features = model.encode_text(tokens)
        perturbed_text_features = None if perturbed_tokens is tokens else model.encode_text(perturbed_tokens)
        with torch.no_grad():
            frozen_image = self.frozen_model.encode_image(perturbed)
            frozen_text = self.frozen_model.encode_text(perturbed_tokens)
        return par_loss(
            image_features,
            text_features,
            frozen_image,
            frozen_text,
            model.logit_scale.exp(),
            tau=self.tau,
            reduction=self.reduction,
            perturbed_text_features=perturbed_text_features,
        )
