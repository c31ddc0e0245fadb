"""Captions, question/answer pairs and edit instructions of the embedded world."""

from __future__ import annotations

import dataclasses

import numpy as np

from embedded_world.scene import Scene, feasible_moves
from embedded_world.vocabulary import BACKGROUNDS, COLOURS, SHAPES, position_words

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {colour} {shape}.",
    "a {size} {colour} {shape} on a {background} background.",
    "a {colour} {shape} in the {position} of the image.",
    "there is a {shape} that is {colour}.",
    "a photo of a {shape}.",
    "a {shape} on a {background} background.",
    "a drawing of a {size} {shape}.",
    "an image of a {colour} {shape}.",
)
"""Compositional caption templates; `{second}` text is appended when the scene has a second object."""

ZERO_SHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a drawing of a {}.",
    "an image of a {}.",
    "a {} on a background.",
)
"""Prompt templates for zero-shot classification on the embedded world (the 80 ImageNet ones are for real data)."""

QUESTIONS: dict[str, str] = {
    "shape": "what shape is in the image?",
    "colour": "what colour is the shape?",
    "describe": "describe the image.",
    "count": "how many shapes are there?",
}

TEMPLATE_WORDS: tuple[str, ...] = tuple(
    sorted(
        {
            w.strip(".,?")
            for t in (*CAPTION_TEMPLATES, *ZERO_SHOT_TEMPLATES, *QUESTIONS.values())
            for w in t.replace("{", " {").split()
            if not w.startswith("{")
        }
        | {
            "and",
            "small",
            "one",
            "two",
            "make",
            "move",
            "the",
            "shape",
            "into",
            "turn",
            "change",
            "background",
            "to",
            "bigger",
            "smaller",
            "of",
            "image",
            "in",
        }
    )
)


def _fields(scene: Scene) -> dict[str, str]:
    m = scene.main
    return {
        "shape": m.shape,
        "colour": m.colour,
        "size": m.size,
        "background": scene.background,
        "position": position_words(m.x, m.y),
    }


def canonical_caption(scene: Scene) -> str:
    """The one deterministic description of a scene (the answer to 'describe the image.')."""
    text = f"a {scene.main.size} {scene.main.colour} {scene.main.shape} on a {scene.background} background"
    if scene.second is not None:
        text += f" and a small {scene.second.colour} {scene.second.shape}"
    return text + "."


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption from a random template; mentions the second object when there is one."""
    text = str(rng.choice(CAPTION_TEMPLATES)).format(**_fields(scene))
    if scene.second is not None:
        text = text[:-1] + f" and a small {scene.second.colour} {scene.second.shape}."
    return text


def qa_pairs(scene: Scene) -> list[tuple[str, str]]:
    """Question/answer pairs: shape, colour, description, count."""
    return [
        (QUESTIONS["shape"], scene.main.shape),
        (QUESTIONS["colour"], scene.main.colour),
        (QUESTIONS["describe"], canonical_caption(scene)),
        (QUESTIONS["count"], "two" if scene.second is not None else "one"),
    ]


@dataclasses.dataclass(frozen=True)
class Edit:
    """An instruction and the scene it produces when applied exactly."""

    instruction: str
    edited: Scene
    kind: str


EDIT_KINDS: tuple[str, ...] = ("recolour", "reshape", "background", "resize", "move")
"""The kinds of edit of the embedded world."""

LEGACY_EDIT_TEMPLATES: dict[str, str] = {
    "recolour": "make the shape {}.",
    "reshape": "turn the shape into a {}.",
    "background": "change the background to {}.",
    "resize": "make the shape {}.",
    "move": "move the shape {}.",
}
"""The one instruction per kind of :func:`sample_edit` (and :class:`ShapesWorld`'s ``edit_instruction``)."""


EDIT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour": ("make the shape {}.", "turn the shape {}.", "colour the shape {}."),
    "background": ("change the background to {}.", "make the background {}.", "turn the background {}."),
    "reshape": ("turn the shape into a {}.", "change the shape into a {}.", "make the shape a {}."),
    "resize": ("make the shape {}.", "draw the shape {}."),
    "move": ("move the shape {}.", "shift the shape {}."),
}
"""Training phrasings of each edit kind's instruction (``{}``: the value word)."""

HELDOUT_EDIT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour": ("paint the shape {}.",),
    "background": ("paint the background {}.",),
    "reshape": ("redraw the shape as a {}.",),
    "resize": ("render the shape {}.",),
    "move": ("slide the shape {}.",),
}
"""Phrasings never used in training: the held-out instructions of the test split."""

EDIT_ATTRIBUTES: dict[str, str] = {
    "recolour": "colour",
    "background": "background",
    "reshape": "shape",
    "resize": "size",
    "move": "position",
}
"""The attribute each edit kind changes (what an edit-accuracy judge checks)."""


def apply_edit(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[Scene, str]:
    """Apply one edit of ``kind`` with a value drawn from ``rng``: ``(edited scene, value word)``.

    The value is the new colour / shape / background, ``bigger`` / ``smaller``, or the move's direction; the
    edited scene is rendered exactly afterwards. ``move`` needs a feasible move (:func:`feasible_moves`).
    """
    if kind == "recolour":
        colour = str(rng.choice([c for c in COLOURS if c != scene.main.colour]))
        return scene.replace_main(colour=colour), colour
    if kind == "reshape":
        shape = str(rng.choice([s for s in SHAPES if s != scene.main.shape]))
        return scene.replace_main(shape=shape), shape
    if kind == "background":
        bg = str(rng.choice([b for b in BACKGROUNDS if b != scene.background]))
        return dataclasses.replace(scene, background=bg), bg
    if kind == "resize":
        bigger = scene.main.size == "medium"
        edited = scene.replace_main(size="large" if bigger else "medium")
        m = edited.main
        if not (m.radius <= m.x <= 1 - m.radius and m.radius <= m.y <= 1 - m.radius):
            edited = edited.replace_main(
                x=min(max(m.x, m.radius), 1 - m.radius), y=min(max(m.y, m.radius), 1 - m.radius)
            )
        return edited, "bigger" if bigger else "smaller"
    if kind == "move":
        from embedded_world.vocabulary import MOVES

        moves = feasible_moves(scene)
        if not moves:
            raise ValueError("no feasible move: the main object would leave the image in every direction")
        move = str(rng.choice(moves))
        dx, dy = MOVES[move]
        return scene.replace_main(x=scene.main.x + dx, y=scene.main.y + dy), move
    raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")


def sample_edit(scene: Scene, rng: np.random.Generator) -> Edit:
    """An edit: recolour, move, resize, reshape or change the background, rendered exactly afterwards."""
    kinds = ["recolour", "reshape", "background", "resize"]
    if feasible_moves(scene):
        kinds.append("move")
    kind = str(rng.choice(kinds))
    edited, value = apply_edit(scene, kind, rng)
    return Edit(LEGACY_EDIT_TEMPLATES[kind].format(value), edited, kind)
