"""Scenes of the embedded world and their deterministic sampling from (seed, split, index)."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from embedded_world.vocabulary import BACKGROUNDS, COLOURS, MOVES, SHAPES, SIZES

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object: a shape class, a colour, a size name and a centre (x, y) in [0, 1] image fractions."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    rotation: float = 0.0

    @property
    def radius(self) -> float:
        return SIZES[self.size]


@dataclasses.dataclass(frozen=True)
class Scene:
    """A main object, an optional small second object and a background; `noise_seed` seeds pixel noise."""

    main: ShapeObject
    background: str
    noise_seed: int
    second: ShapeObject | None = None

    @property
    def label(self) -> int:
        return SHAPES.index(self.main.shape)

    def replace_main(self, **changes) -> Scene:
        return dataclasses.replace(self, main=dataclasses.replace(self.main, **changes))


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for one sample: independent streams per (seed, split, index), so splits are disjoint."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def _fits(x: float, y: float, r: float) -> bool:
    return r <= x <= 1 - r and r <= y <= 1 - r


def sample_scene(rng: np.random.Generator, second_object_prob: float = 0.25) -> Scene:
    """Draw a scene: uniform shape, colour, size, background; centre placed so the object stays inside."""
    background = str(rng.choice(list(BACKGROUNDS)))
    size = str(rng.choice(["medium", "large"]))
    r = SIZES[size]
    x, y = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
    main = ShapeObject(
        shape=str(rng.choice(SHAPES)),
        colour=str(rng.choice(list(COLOURS))),
        size=size,
        x=float(x),
        y=float(y),
        rotation=float(rng.uniform(-0.25, 0.25)),
    )
    second = None
    if rng.uniform() < second_object_prob:
        r2 = SIZES["small"]
        # place the second object in the corner farthest from the main object, without overlap
        x2 = r2 + 0.02 if main.x > 0.5 else 1 - r2 - 0.02
        y2 = r2 + 0.02 if main.y > 0.5 else 1 - r2 - 0.02
        if np.hypot(x2 - main.x, y2 - main.y) > main.radius + r2:
            others = [s for s in SHAPES if s != main.shape]
            colours = [c for c in COLOURS if c != main.colour]
            second = ShapeObject(str(rng.choice(others)), str(rng.choice(colours)), "small", x2, y2)
    return Scene(main=main, background=background, noise_seed=int(rng.integers(2**31)), second=second)


def feasible_moves(scene: Scene) -> list[str]:
    """Moves ('left', 'right', 'up', 'down') after which the main object stays fully inside the image."""
    out = []
    for name, (dx, dy) in MOVES.items():
        if _fits(scene.main.x + dx, scene.main.y + dy, scene.main.radius):
            out.append(name)
    return out
