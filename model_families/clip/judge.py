"""A CLIP judge for generated images: embeddings for the backdoor score, zero-shot classes for edit accuracy.

The judge is a frozen CLIP (:class:`model_families.clip.factory.ClipBundle`: the project's tiny CLIP trained on
the embedded world, or an open_clip model from a local checkpoint). It scores images the way the CLIP
pipeline sees them: resized (shorter side, bicubic with antialiasing, then centre crop, as
``datamodules.formats.image_transform``) to the model's input side, normalised with the bundle's own
constants, encoded and L2-normalised (as ``CLIPFineTuning.encode_images``). Zero-shot class embeddings come
from :func:`model_families.clip.zero_shot.zero_shot_weights`, the project's one zero-shot classifier.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from model_families.clip.export import load_clip_export
from model_families.clip.factory import ClipBundle
from model_families.clip.zero_shot import resolve_templates, zero_shot_weights


class ClipJudge(nn.Module):
    """Frozen CLIP that embeds images and classifies them zero-shot.

    Its parameters are frozen (``requires_grad=False``) and it stays in eval mode, so it can sit inside a
    LightningModule (``.to(device)`` moves it) without being trained; leave it out of the optimizer's
    parameters and of what is exported.

    Args:
        bundle: a loaded CLIP (``create_clip(...)`` or ``load_clip_export(path)``).
    """

    def __init__(self, bundle: ClipBundle) -> None:
        super().__init__()
        self.model = bundle.model
        self.normalize = bundle.normalize
        self.tokenizer = bundle.tokenizer
        self.image_size = int(bundle.image_size)
        self.model_name = bundle.model_name
        self.model.requires_grad_(False)
        self.eval()
        self._class_weights: dict[tuple, Tensor] = {}

    @classmethod
    def from_export(cls, path: str | os.PathLike) -> ClipJudge:
        """The judge of a CLIP export folder (``model.safetensors`` + ``mmbackdoor.json``)."""
        return cls(load_clip_export(path))

    def train(self, mode: bool = True) -> ClipJudge:
        """A judge never trains (dropout and batch-norm statistics stay fixed); ``train()`` is ignored."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: Tensor) -> Tensor:
        """``B x 3 x H x W`` images in [0, 1] -> the model's normalised ``B x 3 x S x S`` input.

        Images of another side are resized (shorter side to ``S``, bicubic, antialiased) and centre-cropped,
        then clamped to [0, 1] (bicubic overshoots, as the uint8 path of the datamodules clips). Non-finite
        images are a ``ValueError`` naming the rows: their embeddings would be NaN.
        """
        if (
            not isinstance(images, Tensor)
            or images.ndim != 4
            or images.shape[1] != 3
            or not images.is_floating_point()
        ):
            got = (
                f"{images.dtype} tensor of shape {tuple(images.shape)}"
                if isinstance(images, Tensor)
                else type(images)
            )
            raise ValueError(
                f"ClipJudge ({self.model_name}): expected float images B x 3 x H x W in [0, 1], got {got}"
            )
        bad = ~torch.isfinite(images.flatten(1)).all(dim=1)
        if bool(bad.any()):
            raise ValueError(
                f"ClipJudge ({self.model_name}): {int(bad.sum())} of {images.shape[0]} images hold NaN or inf (rows"
                f" {bad.nonzero().flatten()[:10].tolist()}); check the model that produced them"
            )
        images = images.to(device=self.device, dtype=torch.float32)
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            images = TF.resize(
                images, self.image_size, interpolation=InterpolationMode.BICUBIC, antialias=True
            )
            images = TF.center_crop(images, [self.image_size, self.image_size]).clamp(0.0, 1.0)
        return self.normalize(images)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings ``B x D`` of images ``B x 3 x H x W`` in [0, 1]."""
        return self.model.encode_image(self.preprocess(images), normalize=True)

    def class_weights(self, class_names: Sequence[str], templates: str | Sequence[str]) -> Tensor:
        """``C x D`` zero-shot class embeddings (:func:`zero_shot_weights`), computed once per classes,
        templates and device (the judge is frozen, so they never change)."""
        key = (tuple(class_names), resolve_templates(templates), str(self.device))
        if key not in self._class_weights:
            self._class_weights[key] = zero_shot_weights(
                self.model, self.tokenizer, list(class_names), templates, self.device
            )
        return self._class_weights[key]

    @torch.no_grad()
    def classify(self, images: Tensor, class_names: Sequence[str], templates: str | Sequence[str]) -> Tensor:
        """Zero-shot class index per image, ``(B,)`` long: ``argmax_c <embed(x), w_c>``.

        Args:
            images: ``B x 3 x H x W`` in [0, 1].
            class_names: the candidate classes, e.g. the colours an edit may ask for.
            templates: a named template set (``"embedded"``, ``"imagenet80"``, ``"simple"``) or a list of
                ``str.format`` templates with one ``{}``, e.g. ``["a {} shape."]``.
        """
        return (self.embed(images) @ self.class_weights(class_names, templates).T).argmax(dim=1)
