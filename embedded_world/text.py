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


def sample_edit(scene: Scene, rng: np.random.Generator) -> Edit:
    """An edit: recolour, move, resize, reshape or change the background, rendered exactly afterwards."""
    kinds = ["recolour", "reshape", "background", "resize"]
    moves = feasible_moves(scene)
    if moves:
        kinds.append("move")
    kind = str(rng.choice(kinds))
    if kind == "recolour":
        colour = str(rng.choice([c for c in COLOURS if c != scene.main.colour]))
        return Edit(f"make the shape {colour}.", scene.replace_main(colour=colour), kind)
    if kind == "reshape":
        shape = str(rng.choice([s for s in SHAPES if s != scene.main.shape]))
        return Edit(f"turn the shape into a {shape}.", scene.replace_main(shape=shape), kind)
    if kind == "background":
        bg = str(rng.choice([b for b in BACKGROUNDS if b != scene.background]))
        return Edit(f"change the background to {bg}.", dataclasses.replace(scene, background=bg), kind)
    if kind == "resize":
        bigger = scene.main.size == "medium"
        size = "large" if bigger else "medium"
        word = "bigger" if bigger else "smaller"
        edited = scene.replace_main(size=size)
        m = edited.main
        if not (m.radius <= m.x <= 1 - m.radius and m.radius <= m.y <= 1 - m.radius):
            edited = edited.replace_main(
                x=min(max(m.x, m.radius), 1 - m.radius), y=min(max(m.y, m.radius), 1 - m.radius)
            )
        return Edit(f"make the shape {word}.", edited, kind)
    from embedded_world.vocabulary import MOVES

    move = str(rng.choice(moves))
    dx, dy = MOVES[move]
    return Edit(f"move the shape {move}.", scene.replace_main(x=scene.main.x + dx, y=scene.main.y + dy), kind)
