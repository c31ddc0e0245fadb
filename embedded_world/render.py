"""Anti-aliased rendering of scenes with analytic shape masks (NumPy, supersampled)."""

from __future__ import annotations

import numpy as np

from embedded_world.scene import Scene, ShapeObject
from embedded_world.vocabulary import BACKGROUNDS, COLOURS

_SUPERSAMPLE = 3


def _regular_polygon(r: np.ndarray, theta: np.ndarray, n: int, radius: float) -> np.ndarray:
    """Inside test for a regular n-gon with circumradius `radius` (polar form of its edges)."""
    sector = 2 * np.pi / n
    local = np.mod(theta, sector) - sector / 2
    return r * np.cos(local) <= radius * np.cos(np.pi / n)


def shape_mask(obj: ShapeObject, size: int, supersample: int = _SUPERSAMPLE) -> np.ndarray:
    """Coverage in [0, 1] of `obj` on a size x size grid (fraction of supersampled points inside)."""
    n = size * supersample
    coords = (np.arange(n) + 0.5) / n
    dx = coords[None, :] - obj.x
    dy = coords[:, None] - obj.y
    c, s = np.cos(obj.rotation), np.sin(obj.rotation)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotate into the object's frame (v points down)
    R = obj.radius
    r = np.hypot(u, v)
    theta = np.arctan2(-v, u)  # counter-clockwise angle with y up
    if obj.shape == "circle":
        inside = r <= R * 0.9
    elif obj.shape == "square":
        inside = np.maximum(np.abs(u), np.abs(v)) <= R * 0.78
    elif obj.shape == "triangle":
        inside = _regular_polygon(r, theta - np.pi / 2, 3, R * 1.1)
        inside &= v <= R * 0.55
    elif obj.shape == "hexagon":
        inside = _regular_polygon(r, theta, 6, R * 0.95)
    elif obj.shape == "diamond":
        inside = np.abs(u) / 0.7 + np.abs(v) <= R
    elif obj.shape == "cross":
        arm = R * 0.3
        inside = ((np.abs(u) <= arm) & (np.abs(v) <= R)) | ((np.abs(v) <= arm) & (np.abs(u) <= R))
    elif obj.shape == "star":
        # five points: radius interpolates between outer (R) and inner (0.45 R) with the angle
        k = np.mod(theta - np.pi / 2, 2 * np.pi / 5) / (2 * np.pi / 5)
        tri = np.abs(2 * k - 1)  # 1 at a point, 0 between two points
        inside = r <= R * (0.42 + 0.58 * tri**1.5)
    elif obj.shape == "heart":
        hx, hy = u / (R * 0.85), -(v / (R * 0.85)) + 0.15
        inside = (hx**2 + hy**2 - 1) ** 3 - hx**2 * hy**3 <= 0
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    cov = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    return cov.astype(np.float32)


def render_scene(scene: Scene, size: int = 32) -> np.ndarray:
    """Render a scene to an H x W x 3 uint8 array (deterministic: pixel noise comes from scene.noise_seed)."""
    rng = np.random.default_rng(scene.noise_seed)
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    img += rng.normal(0.0, 6.0, size=(size, size, 1)).astype(np.float32)
    for obj in (scene.second, scene.main):
        if obj is None:
            continue
        cov = shape_mask(obj, size)[..., None]
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float32)
        img = img * (1 - cov) + colour * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
