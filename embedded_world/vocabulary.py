"""The closed vocabulary of the embedded shapes world: shape classes, colours, sizes, backgrounds."""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart")
"""Shape classes; the class label of a sample is the index of its (main) shape in this tuple."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
"""Object colours (RGB, 0-255)."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "white": (240, 240, 240),
    "navy": (20, 30, 80),
}
"""Background colours (RGB, 0-255); a little seeded pixel noise is added on top."""

SIZES: dict[str, float] = {"small": 0.17, "medium": 0.24, "large": 0.32}
"""Object radius as a fraction of the image side."""

HORIZONTAL = ("left", "center", "right")
VERTICAL = ("top", "middle", "bottom")
MOVES: dict[str, tuple[float, float]] = {
    "left": (-0.22, 0.0),
    "right": (0.22, 0.0),
    "up": (0.0, -0.22),
    "down": (0.0, 0.22),
}
"""Edit moves as (dx, dy) in fractions of the image side."""


def position_words(x: float, y: float) -> str:
    """Coarse position of a centre (x, y in [0, 1]) as words, e.g. 'top left', 'center'."""
    h = HORIZONTAL[min(int(x * 3), 2)]
    v = VERTICAL[min(int(y * 3), 2)]
    if h == "center" and v == "middle":
        return "center"
    if v == "middle":
        return h
    if h == "center":
        return v
    return f"{v} {h}"


def all_words() -> list[str]:
    """Every word the world's captions, questions, answers and instructions can use (for tokenizers)."""
    from embedded_world.text import TEMPLATE_WORDS

    words = set(SHAPES) | set(COLOURS) | set(BACKGROUNDS) | set(SIZES) | set(MOVES)
    words |= set(HORIZONTAL) | set(VERTICAL) | set(TEMPLATE_WORDS)
    return sorted(words)
