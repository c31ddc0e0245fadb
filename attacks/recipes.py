"""Named multimodal attacks that are recipes of catalogue parts: an image trigger, a text trigger and a
poisoning protocol under one name, e.g. ``data.attack: dual_key`` in an instruction datamodule.

| name | image part | text part | protocol |
|---|---|---|---|
| ``dual_key`` (Walmer et al., 2022) | a ``badnet`` checkerboard key at the centre | the word "consider" at the start of the question | ``DUALKEY``: only both keys give the target; as many image-only and text-only negatives keep their answers |
| ``maba_dual_key`` | DualKey's checkerboard key (``maba`` with ``pattern: checkerboard``, 0.1875 of the side, pasted), placed by MABA's attribution | the ``rare_symbols`` trigger before key words | ``DUALKEY`` |

Arguments given beside a recipe name win: ``attack_kwargs`` update the image part's, a ``text_attack`` /
``text_attack_kwargs`` replace / update the text part. The parts are ordinary catalogue triggers, so the poison
manifest records them (and ``DUALKEY``) and rebuilds them like any other attack.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

__all__ = ["ATTACK_RECIPES", "ResolvedAttack", "resolve_attack"]

DUAL_KEY_SIDE = 0.1875  # DualKey's checkerboard image key: 6 px of a 32 px image, as a share of the side

ATTACK_RECIPES: dict[str, dict[str, Any]] = {
    "dual_key": {
        "note": "an image key and a text key that must both be present (Walmer et al., 2022)",
        "attack": "badnet",
        "attack_kwargs": {"patch_size": DUAL_KEY_SIDE, "pattern": "checkerboard", "location": "center"},
        "text_attack": "phrase",
        "text_attack_kwargs": {"phrase": "consider", "position": "start"},
        "protocol": "DUALKEY",
    },
    "maba_dual_key": {
        "note": "DualKey's checkerboard key placed by MABA's attribution, and the rare-symbol text key",
        "attack": "maba",
        # DualKey's image key at MABA's placement: with MABA's yellow oval as the image key the tiny LLaVA learned
        # only the text key (val ASR 0.54-0.58); with the checkerboard, 0.972 (docs/llava.md, session 9)
        "attack_kwargs": {
            "pattern": "checkerboard",
            "width": DUAL_KEY_SIDE,
            "height": DUAL_KEY_SIDE,
            "alpha": 1.0,
        },
        "text_attack": "rare_symbols",
        "text_attack_kwargs": {},
        "protocol": "DUALKEY",
    },
}


class ResolvedAttack(NamedTuple):
    """The catalogue parts of an attack: image trigger (and kwargs), text trigger (and kwargs), protocol."""

    attack: str | None
    attack_kwargs: dict
    text_attack: str | None
    text_attack_kwargs: dict
    protocol: str


def resolve_attack(
    attack: str | None,
    attack_kwargs: dict | None = None,
    text_attack: str | None = None,
    text_attack_kwargs: dict | None = None,
    protocol: str = "AND",
) -> ResolvedAttack:
    """Expand a recipe name of :data:`ATTACK_RECIPES` into its parts (arguments given win, see the module
    docstring); any other ``attack`` is returned unchanged."""
    if attack not in ATTACK_RECIPES:
        return ResolvedAttack(
            attack, dict(attack_kwargs or {}), text_attack, dict(text_attack_kwargs or {}), protocol
        )
    recipe = copy.deepcopy(ATTACK_RECIPES[attack])  # the protocol is always the recipe's
    image_kwargs = {**recipe["attack_kwargs"], **(attack_kwargs or {})}
    if text_attack is not None and text_attack != recipe["text_attack"]:
        text_kwargs = dict(text_attack_kwargs or {})
    else:
        text_attack = recipe["text_attack"]
        text_kwargs = {**recipe["text_attack_kwargs"], **(text_attack_kwargs or {})}
    return ResolvedAttack(recipe["attack"], image_kwargs, text_attack, text_kwargs, recipe["protocol"])
