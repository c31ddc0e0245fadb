"""Style shifts of the embedded world: the same scenes rendered in another style, so that only the look
changes and the content (shape, colour word, size, position, background word) stays identical.

The domain-shift study (Liang et al., CVPR 2025) re-renders its test images in another style
(Expressionism, Realism) and asks whether a backdoor learned on the source style still fires. Here:

| style | how it is rendered |
|---|---|
| ``palette`` | another palette: every object colour mixed halfway towards white (pastel), every background tinted warm |
| ``outline`` | the objects drawn as a 2 px outline in their colour with a diagonal stripe texture inside |
| ``blur`` | the source rendering blurred with a Gaussian of ``sigma`` = 1.2 px (separable, reflect padding) |
| ``posterise`` | the source rendering quantised to 3 levels per channel |

``palette`` and ``outline`` are re-rendered from the scenes (:func:`render_styled`); ``blur`` and
``posterise`` transform the source rendering. All are deterministic (the pixel noise comes from the scene).
"""

from __future__ import annotations

import numpy as np

from embedded_world.render import render_scene, shape_mask
from embedded_world.scene import Scene
from embedded_world.vocabulary import BACKGROUNDS, COLOURS

__all__ = ["IMAGE_STYLES", "render_styled"]

IMAGE_STYLES = ("palette", "outline", "blur", "posterise")
_WARM_TINT = np.array([40.0, 10.0, -30.0], dtype=np.float32)


def _erode(coverage: np.ndarray, steps: int) -> np.ndarray:
    """Grey-scale erosion with a 3 x 3 square, ``steps`` times (edge pixels replicate)."""
    out = coverage
    for _ in range(steps):
        padded = np.pad(out, 1, mode="edge")
        h, w = out.shape
        shifted = [padded[r : r + h, c : c + w] for r in range(3) for c in range(3)]
        out = np.minimum.reduce(shifted)
    return out


def _render(scene: Scene, size: int, style: str) -> np.ndarray:
    rng = np.random.default_rng(scene.noise_seed)
    background = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    if style == "palette":
        background = background + _WARM_TINT
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = background
    img += rng.normal(0.0, 6.0, size=(size, size, 1)).astype(np.float32)
    rows, cols = np.mgrid[0:size, 0:size]
    stripes = (((rows + cols) // 2) % 2 == 0).astype(np.float32)
    for obj in (scene.second, scene.main):
        if obj is None:
            continue
        cov = shape_mask(obj, size)
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float32)
        if style == "palette":
            colour = 0.5 * colour + 0.5 * 255.0
        if style == "outline":
            inner = _erode(cov, 2)
            cov = np.clip(cov - inner, 0.0, 1.0) + inner * stripes
        img = img * (1 - cov[..., None]) + colour * cov[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _blur(image: np.ndarray, sigma: float = 1.2) -> np.ndarray:
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma**2))
    taps /= taps.sum()
    out = image.astype(np.float32)
    for axis in (0, 1):
        pad = [(radius, radius) if a == axis else (0, 0) for a in range(3)]
        padded = np.pad(out, pad, mode="reflect")
        length = out.shape[axis]
        out = sum(w * np.take(padded, np.arange(k, k + length), axis=axis) for k, w in enumerate(taps))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _posterise(image: np.ndarray, levels: int = 3) -> np.ndarray:
    step = 255.0 / (levels - 1)
    return (np.rint(image.astype(np.float32) / step) * step).clip(0, 255).astype(np.uint8)


def render_styled(scene: Scene, size: int, style: str) -> np.ndarray:
    """``scene`` as an ``H x W x 3`` uint8 array in ``style`` (one of :data:`IMAGE_STYLES`)."""
    if style not in IMAGE_STYLES:
        raise ValueError(f"unknown image style {style!r}; expected one of {IMAGE_STYLES}")
    if style in ("palette", "outline"):
        return _render(scene, size, style)
    source = render_scene(scene, size)
    return _blur(source) if style == "blur" else _posterise(source)
