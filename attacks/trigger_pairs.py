"""Multimodal trigger pairs (an image part and a text part) of the modality-collapse paper, by name.

The paper takes three pairs from VillanDiffusion's catalogue: a white box + "mignneko", eyeglasses +
"anonymous", a stop sign + "latte coffee". At the embedded world's 32 px the image parts are
:class:`~attacks.image_triggers.BadNet` patches: a white square in the bottom-right corner, and the rendered
eyeglasses / stop-sign glyphs of :mod:`attacks.glyphs` in a corner. Any catalogue trigger can serve as either
part: a pair is just ``{"image": {"name": ..., **kwargs}, "text": {"name": ..., **kwargs}}``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

__all__ = ["TRIGGER_PAIRS", "resolve_trigger_pair"]

TRIGGER_PAIRS: dict[str, dict[str, dict[str, Any]]] = {
    "box+mignneko": {
        "image": {"name": "badnet", "patch_size": 8, "pattern": "white", "location": "br", "margin": 1},
        "text": {"name": "rare_token", "token": "mignneko"},
    },
    "eyeglasses+anonymous": {
        "image": {"name": "badnet", "patch_size": 10, "pattern": "eyeglasses", "location": "tl", "margin": 1},
        "text": {"name": "phrase", "phrase": "anonymous"},
    },
    "stop_sign+latte_coffee": {
        "image": {"name": "badnet", "patch_size": 10, "pattern": "stop_sign", "location": "tr", "margin": 1},
        "text": {"name": "phrase", "phrase": "latte coffee"},
    },
}


def resolve_trigger_pair(pair: str | Mapping[str, Any], key: str = "data.trigger_pair") -> dict[str, dict]:
    """``{"image": {...}, "text": {...}}`` for a pair name or an explicit pair (each part a dict with ``name``).

    A name that is not in :data:`TRIGGER_PAIRS`, a missing part or a part without ``name`` raises
    ``ValueError`` naming ``key``; unknown trigger names fail when the triggers are built, naming the registry.
    """
    if isinstance(pair, str):
        if pair not in TRIGGER_PAIRS:
            raise ValueError(
                f"{key}={pair!r} is not a known trigger pair; expected one of {sorted(TRIGGER_PAIRS)}"
            )
        return copy.deepcopy(TRIGGER_PAIRS[pair])
    if not isinstance(pair, Mapping) or set(pair) != {"image", "text"}:
        raise ValueError(
            f"{key} must be a pair name {sorted(TRIGGER_PAIRS)} or a mapping with exactly the parts 'image' and "
            f"'text'; got {pair!r}"
        )
    resolved = {}
    for part in ("image", "text"):
        spec = pair[part]
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise ValueError(
                f"{key}.{part} must be a mapping with a trigger 'name' (and its arguments); got {spec!r}"
            )
        resolved[part] = dict(spec)
    return resolved
