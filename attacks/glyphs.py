"""Small rendered glyphs: image-trigger patterns (eyeglasses, stop sign) and built-in target images (smiley).

The modality-collapse paper's trigger pairs use photographic eyeglasses and a stop sign (VillanDiffusion's
catalogue); the embedded world renders simple, deterministic stand-ins with analytic masks, supersampled
like the world's shapes. Every glyph is a ``3 x size x size`` float tensor in [0, 1], a pure function of its
name and size.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["GLYPHS", "render_glyph"]

_SUPERSAMPLE = 4


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled pixel centres in [-1, 1] (x right, y down)."""
    n = size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n * 2 - 1
    return coords[None, :].repeat(n, 0), coords[:, None].repeat(n, 1)


def _paint(
    size: int, background: tuple[float, ...], layers: list[tuple[np.ndarray, tuple[float, ...]]]
) -> Tensor:
    """Composite boolean masks (in order) over a background and average down to ``size`` pixels."""
    n = size * _SUPERSAMPLE
    canvas = np.empty((n, n, 3), np.float32)
    canvas[:] = background
    for mask, colour in layers:
        canvas[mask] = colour
    image = canvas.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _eyeglasses(size: int) -> Tensor:
    """Two dark round rims joined by a bridge, on white."""
    x, y = _grid(size)
    rims = np.zeros_like(x, dtype=bool)
    for cx in (-0.5, 0.5):
        r = np.hypot(x - cx, y)
        rims |= (r <= 0.42) & (r >= 0.26)
    bridge = (np.abs(x) <= 0.12) & (np.abs(y + 0.05) <= 0.07)
    arms = (np.abs(y + 0.05) <= 0.06) & (np.abs(x) >= 0.88)
    return _paint(size, (1.0, 1.0, 1.0), [(rims | bridge | arms, (0.05, 0.05, 0.05))])


def _stop_sign(size: int) -> Tensor:
    """A red octagon with a white border and a white bar (the lettering), on light gray."""
    x, y = _grid(size)
    theta = np.arctan2(y, x) + np.pi / 8
    sector = np.pi / 4
    local = np.mod(theta, sector) - sector / 2
    r = np.hypot(x, y) * np.cos(local)
    outer = r <= 0.95
    inner = r <= 0.8
    bar = (np.abs(y) <= 0.14) & (np.abs(x) <= 0.55)
    return _paint(
        size,
        (0.85, 0.85, 0.85),
        [(outer, (1.0, 1.0, 1.0)), (inner, (0.8, 0.05, 0.05)), (bar, (1.0, 1.0, 1.0))],
    )


def _smiley(size: int) -> Tensor:
    """A yellow face with dark eyes and mouth on black: a target image unlike any scene of the world."""
    x, y = _grid(size)
    r = np.hypot(x, y)
    face = r <= 0.85
    eyes = (np.hypot(x + 0.32, y + 0.25) <= 0.14) | (np.hypot(x - 0.32, y + 0.25) <= 0.14)
    mouth = (np.hypot(x, y - 0.05) <= 0.55) & (np.hypot(x, y - 0.05) >= 0.4) & (y >= 0.2)
    return _paint(size, (0.0, 0.0, 0.0), [(face, (1.0, 0.85, 0.1)), (eyes | mouth, (0.1, 0.05, 0.0))])


GLYPHS = {"eyeglasses": _eyeglasses, "stop_sign": _stop_sign, "smiley": _smiley}


def render_glyph(name: str, size: int) -> Tensor:
    """The glyph ``name`` as a ``3 x size x size`` float tensor in [0, 1]."""
    if name not in GLYPHS:
        raise ValueError(f"unknown glyph {name!r}; expected one of {sorted(GLYPHS)}")
    if int(size) < 1:
        raise ValueError(f"glyph size must be >= 1 pixel, got {size}")
    return GLYPHS[name](int(size))
