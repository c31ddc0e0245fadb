"""The zero-shot classifier of the CLIP family, the one every module and defense uses.

Class weights: class-name prompts -> mean of normalised text embeddings, renormalised
(:func:`zero_shot_weights`); logits: cosine similarities of the normalised image embeddings to them
(:func:`zero_shot_logits`); the class: their argmax (:func:`zero_shot_predict`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import Tensor, nn

from embedded_world.text import ZERO_SHOT_TEMPLATES

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "embedded": ZERO_SHOT_TEMPLATES,
    "imagenet80": tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES),
    "simple": ("a photo of a {}.",),
    "product": (
        "a photo of a {}.",
        "a black and white product photo of a {}.",
        "{}, studio shot on a plain background.",
        "a grayscale picture of a {}.",
        "a small image of a {} from a fashion catalogue.",
        "a low resolution photo of a {}.",
    ),
}
"""Named prompt-template sets: ``embedded`` for the shapes world, ``product`` for the Fashion-MNIST world (its
training captions use the same templates, :mod:`datamodules.fashion_mnist`), ``imagenet80`` = CLIP's 80
ImageNet ones."""


Normalize = Callable[[Tensor], Tensor]
"""Maps [0, 1] images to the model's input space (mean/std of the model's preprocess config)."""


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A named set (see TEMPLATE_SETS) or an explicit list of ``str.format`` templates with one ``{}``."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ValueError(
                f"unknown template set {templates!r}; expected one of {sorted(TEMPLATE_SETS)} or a list"
            )
        return TEMPLATE_SETS[templates]
    out = tuple(templates)
    if not out or any("{}" not in t for t in out):
        raise ValueError(f"zero-shot templates must be non-empty and each contain '{{}}', got {out!r}")
    return out


@torch.no_grad()
def zero_shot_weights(model, tokenizer, class_names: Sequence[str], templates, device=None) -> torch.Tensor:
    """C x D class embeddings: w_c = normalize(mean_t normalize(f_text(template_t(c)))).

    Uses open_clip's own `build_zero_shot_classifier` (which returns D x C); transposed here.
    """
    if not class_names:
        raise ValueError("class_names is empty: zero-shot classification needs at least one class")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    weights = open_clip.build_zero_shot_classifier(
        model, tokenizer, list(class_names), list(resolve_templates(templates)), device=device
    )
    model.train(was_training)
    return weights.T.contiguous()


def encode_images(model: nn.Module, images: Tensor, normalize: Normalize) -> Tensor:
    """L2-normalised image embeddings ``f(x) / ||f(x)||`` of [0, 1] images (gradients flow)."""
    return F.normalize(model.encode_image(normalize(images)), dim=-1)


def zero_shot_logits(image_features: Tensor, class_text_embeds: Tensor) -> Tensor:
    """Cosine similarities ``B x C`` between (normalised) image features and class text embeddings."""
    return F.normalize(image_features, dim=-1) @ F.normalize(class_text_embeds, dim=-1).T.to(image_features)


@torch.no_grad()
def zero_shot_predict(
    model: nn.Module, images: Tensor, class_text_embeds: Tensor, normalize: Normalize
) -> Tensor:
    """Top-1 zero-shot class: ``argmax_c cos(f(x), t_c)`` for each image."""
    return zero_shot_logits(encode_images(model, images, normalize), class_text_embeds).argmax(dim=-1)
