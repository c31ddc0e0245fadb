"""Registry of attacks by name: implemented triggers and the planned ones."""

from __future__ import annotations

from typing import Any, NamedTuple

from attacks.generative_targets import GENERATIVE_TARGETS
from attacks.image_targets import ImageTarget
from attacks.image_triggers import SIG, BadNet, Blended, ImageTrigger, LowFrequency, WaNet
from attacks.input_aware import InputAware
from attacks.maba import Maba
from attacks.optimized_patch import OptimizedPatch
from attacks.recipes import ATTACK_RECIPES
from attacks.targets import ClassTarget, Target
from attacks.text_triggers import CharSequence, Phrase, RareSymbols, RareToken, TextTrigger

__all__ = [
    "IMAGE_TRIGGERS",
    "PLANNED_ATTACKS",
    "TARGETS",
    "TEXT_TRIGGERS",
    "AttackInfo",
    "build_image_trigger",
    "build_target",
    "build_text_trigger",
    "list_attacks",
]

IMAGE_TRIGGERS: dict[str, type[ImageTrigger]] = {
    cls.name: cls for cls in (BadNet, Blended, SIG, WaNet, LowFrequency, OptimizedPatch, InputAware, Maba)
}
"""``patch_optimized`` loads an artifact made by ``scripts/optimize_patch.py`` (:mod:`attacks.badclip`)."""
TEXT_TRIGGERS: dict[str, type[TextTrigger]] = {
    cls.name: cls for cls in (RareToken, Phrase, CharSequence, RareSymbols)
}
# the CLIP class target, the generative-VLM targets (content insertion, fixed output, refusal, ...) and the
# image-output target of image editors
TARGETS: dict[str, type[Target]] = {
    ClassTarget.name: ClassTarget,
    ImageTarget.name: ImageTarget,
    **GENERATIVE_TARGETS,
}

# Named so that asking for them fails loudly instead of silently doing something else.
PLANNED_ATTACKS: dict[str, str] = {}
_PLANNED_MODALITY: dict[str, str] = {}


class AttackInfo(NamedTuple):
    """A row of :func:`list_attacks`."""

    name: str
    modality: str
    status: str
    note: str


def _build(kind: str, registry: dict[str, type], name: str, kwargs: dict[str, Any]):
    if name in registry:
        return registry[name](**kwargs)
    if name in ATTACK_RECIPES:
        raise ValueError(
            f"{name!r} is a multimodal attack recipe (an image part, a text part and a protocol), not a single "
            f"{kind}: set it as data.attack of an instruction datamodule (attacks.recipes.resolve_attack)"
        )
    if name in PLANNED_ATTACKS:
        raise NotImplementedError(
            f"{kind} {name!r} is planned but not yet available: {PLANNED_ATTACKS[name]}"
        )
    raise ValueError(f"unknown {kind} {name!r}; available: {', '.join(sorted(registry))}")


def build_image_trigger(name: str, **kwargs: Any) -> ImageTrigger:
    """Image trigger by registry name, e.g. ``build_image_trigger("badnet", patch_size=16)``;
    ``build_image_trigger(**trigger.config())`` rebuilds a trigger."""
    return _build("image trigger", IMAGE_TRIGGERS, name, kwargs)


def build_text_trigger(name: str, **kwargs: Any) -> TextTrigger:
    """Text trigger by registry name, e.g. ``build_text_trigger("rare_token", token="cf")``."""
    return _build("text trigger", TEXT_TRIGGERS, name, kwargs)


def build_target(name: str, **kwargs: Any) -> Target:
    """Target by registry name, e.g. ``build_target("class", class_name="banana")`` or
    ``build_target("content_insertion", text="banana")``."""
    return _build("target", TARGETS, name, kwargs)


def _summary(cls: type) -> str:
    """First paragraph of the class docstring on one line."""
    paragraph = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(paragraph.split())


def list_attacks() -> list[AttackInfo]:
    """Every attack component by name: ``(name, modality, status, note)``, status ``available`` or
    ``planned``; the recipes of :mod:`attacks.recipes` are listed with modality ``image+text``."""
    rows = [AttackInfo(name, "image", "available", _summary(cls)) for name, cls in IMAGE_TRIGGERS.items()]
    rows += [AttackInfo(name, "text", "available", _summary(cls)) for name, cls in TEXT_TRIGGERS.items()]
    rows += [AttackInfo(name, "image+text", "available", r["note"]) for name, r in ATTACK_RECIPES.items()]
    rows += [
        AttackInfo(name, _PLANNED_MODALITY[name], "planned", note) for name, note in PLANNED_ATTACKS.items()
    ]
    return rows
