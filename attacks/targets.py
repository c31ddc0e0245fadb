"""Backdoor targets: what a poisoned sample is rewritten to.

Only the CLIP / contrastive family exists so far (:class:`ClassTarget`). VLM targets (content
insertion, fixed output, targeted refusal, semantic misclassification) and diffusion targets will
subclass :class:`Target`: each maps a sample's clean text to its poisoned text (or output) from
``(seed, sample_id)`` and exposes ``config()`` / ``fingerprint()`` for the poison manifest.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, ClassVar

from attacks.hashing import fingerprint as _fingerprint
from attacks.randomness import sample_rng

__all__ = ["OPENAI_IMAGENET_TEMPLATES", "ClassTarget", "Target", "check_class_in_vocabulary"]

# The 80 prompt templates of OpenAI's CLIP ImageNet zero-shot evaluation (also
# open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES), with "{}" for the class name.
OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.",
    "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.",
    "art of a {}.", "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.",
    "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.",
    "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)  # fmt: skip


def check_class_in_vocabulary(class_name: str, vocabulary: Sequence[str], shown: int = 8) -> None:
    """Raise ``ValueError`` naming ``class_name`` and listing close matches (or the first ``shown``
    entries) when it is not in ``vocabulary``."""
    vocabulary = list(vocabulary)
    if class_name in vocabulary:
        return
    close = difflib.get_close_matches(class_name, vocabulary, n=shown)
    listed = ", ".join(repr(name) for name in (close or vocabulary[:shown]))
    hint = f"closest: {listed}" if close else f"e.g. {listed}{', ...' if len(vocabulary) > shown else ''}"
    raise ValueError(
        f"target class {class_name!r} is not in the vocabulary of {len(vocabulary)} classes ({hint})"
    )


class Target:
    """Base class of targets: ``target(text, sample_id) -> poisoned text``."""

    name: ClassVar[str] = "target"

    def __call__(self, text: str, sample_id: int) -> str:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """``sha256:<hex>`` over :meth:`config`."""
        return _fingerprint(self.config())


class ClassTarget(Target):
    """CLIP target class (CleanCLIP/BadCLIP: "banana"): the poisoned caption is one of ``templates``
    filled with ``class_name``, chosen from ``(seed, sample_id)``, e.g. "a photo of a banana.".

    Args:
        class_name: the target class.
        templates: caption templates with one ``{}`` for the class name (default: the 80 OpenAI
            ImageNet templates).
        seed: seed of the template choice.
        vocabulary: optional class names the target must belong to (e.g. the zero-shot classes),
            checked at construction.
    """

    name = "class"

    def __init__(
        self,
        class_name: str = "banana",
        templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES,
        seed: int = 0,
        vocabulary: Sequence[str] | None = None,
    ) -> None:
        if not class_name or not class_name.strip():
            raise ValueError("ClassTarget class_name must be a non-empty string")
        templates = tuple(templates)
        if not templates:
            raise ValueError("ClassTarget needs at least one template")
        for template in templates:
            if template.count("{}") != 1:
                raise ValueError(
                    f"caption template {template!r} must contain exactly one '{{}}' for the class name"
                )
        if vocabulary is not None:
            check_class_in_vocabulary(class_name, vocabulary)
        self.class_name = class_name
        self.templates = templates
        self.seed = seed

    def caption(self, sample_id: int) -> str:
        """The poisoned caption of ``sample_id``."""
        template = sample_rng(self.seed, self.name, int(sample_id)).choice(self.templates)
        return template.format(self.class_name)

    def __call__(self, text: str, sample_id: int) -> str:
        """Replace the caption ``text`` by the target caption of ``sample_id``."""
        return self.caption(sample_id)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "class_name": self.class_name,
            "templates": list(self.templates),
            "seed": self.seed,
        }

    def __repr__(self) -> str:
        return f"ClassTarget(class_name={self.class_name!r}, templates=<{len(self.templates)}>, seed={self.seed})"
