"""Image triggers: batched tensor transforms that plant a backdoor pattern.

Every trigger maps float images ``B x C x H x W`` in [0, 1] (any device, any floating dtype) to
triggered images of the same shape, device and dtype, clamped to [0, 1]. Images of lower precision
than float32 (bfloat16, float16) are triggered in float32 and rounded to their dtype once, so the
result is the float32 result rounded.

Randomness comes in two kinds, both derived from the trigger's ``seed``:

* per-sample parts (a BadNet noise patch or random location, per-image blend noise) depend only on
  ``(seed, sample_id)``, so a sample gets the same trigger whatever batch it lands in
  (see :mod:`attacks.randomness`);
* fixed parts (the WaNet warp grid, fixed blend noise, the low-frequency pattern) are drawn once and
  kept as buffers, so they move with ``.to(device)`` and are saved in ``state_dict()``. They are
  created for ``image_size`` when it is given, else lazily for the first batch seen; a batch of
  another size is then an error rather than a silently different pattern.

Sizes of patches can be given in pixels (``int``) or as a fraction of the image side (``float`` in
(0, 1)): the published 16 px patch on 224 px images is ``16 / 224 ~= 0.071``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.glyphs import GLYPHS, render_glyph
from attacks.hashing import fingerprint as _fingerprint
from attacks.randomness import sample_normal, sample_uniform

__all__ = [
    "SIG",
    "BadNet",
    "Blended",
    "ImageTrigger",
    "LowFrequency",
    "WaNet",
    "checkerboard",
    "load_pattern_image",
    "resolve_size",
]

PatternSource = str | os.PathLike | Tensor


def resolve_size(size: int | float, height: int, width: int, name: str = "patch_size") -> int:
    """Pixels for ``size``: an ``int`` is taken as pixels, a ``float`` in (0, 1) as a fraction of the
    shorter image side (rounded, at least 1 px). E.g. ``0.071`` at 224 px gives 16 px."""
    if isinstance(size, bool) or not isinstance(size, int | float):
        raise TypeError(f"{name} must be an int (pixels) or a float in (0, 1) (fraction); got {size!r}")
    if isinstance(size, float):
        if not 0.0 < size < 1.0:
            raise ValueError(
                f"{name}={size!r}: a float is a fraction of the image side and must be in (0, 1); "
                "give pixels as an int"
            )
        pixels = max(1, round(size * min(height, width)))
    else:
        pixels = size
    if pixels < 1 or pixels > min(height, width):
        raise ValueError(f"{name}={size!r} gives {pixels} px, which does not fit a {height}x{width} image")
    return pixels


def load_pattern_image(path: str | os.PathLike) -> Tensor:
    """Load an image file as a float32 ``3 x h x w`` tensor in [0, 1] (converted to RGB)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trigger pattern image not found: {str(path)!r}")
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _as_hw(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    height, width = (int(v) for v in image_size)
    return (height, width)


def _check_unit_interval(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1]; got {value!r}")
    return value


class ImageTrigger(nn.Module):
    """Base class of image triggers.

    Subclasses implement ``_trigger(images, sample_ids, fixed)`` (the unclamped triggered batch as a
    new tensor, which is then clamped in place; ``images`` is at least float32) and ``_params()`` (their constructor arguments).
    Those with fixed random patterns register their buffer names with ``_register_lazy_buffers`` and
    implement ``_fixed_shapes`` and ``_build_fixed``.

    Args:
        seed: seed of every random part of the trigger.
    """

    name: ClassVar[str] = "image_trigger"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int; got {seed!r}")
        self.seed = seed
        self._lazy_buffers: tuple[str, ...] = ()

    # ----------------------------------------------------------------------------------- public API
    def forward(self, images: Tensor, sample_ids: Tensor | Sequence[int] | None = None) -> Tensor:
        """Triggered copy of ``images`` (``B x C x H x W`` floats in [0, 1]), clamped to [0, 1].

        ``sample_ids`` (``B`` ints, default ``arange(B)``) identify the samples for the per-sample
        random parts; pass dataset indices so each sample's trigger does not depend on its batch.
        """
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
            got = (
                f"{images.dtype} tensor of shape {tuple(images.shape)}"
                if isinstance(images, Tensor)
                else type(images)
            )
            raise ValueError(f"{self.name} expects float images B x C x H x W in [0, 1]; got {got}")
        ids = self._sample_ids(images, sample_ids)
        # Low-precision images (bfloat16, float16) are triggered in float32 and rounded once at the
        # end: a warp grid or a sinusoid held in bfloat16 is off by whole pixels (NaN at 224 px).
        work = images.to(torch.promote_types(images.dtype, torch.float32))
        fixed = self._fixed_tensors(work)
        # _trigger returns a new tensor, so clamping in place saves an allocation.
        return self._trigger(work, ids, fixed).clamp_(0.0, 1.0).to(images.dtype)

    def config(self) -> dict[str, Any]:
        """JSON-serialisable configuration: ``build_image_trigger(**trigger.config())`` rebuilds it."""
        return {"name": self.name, **self._params()}

    def fingerprint(self) -> str:
        """``sha256:<hex>`` over :meth:`config` and the trigger's pattern tensors (fixed patterns and
        loaded images), for poison manifests.

        Raises ``RuntimeError`` when a fixed pattern has not been drawn yet: construct the trigger
        with ``image_size=...`` or apply it to a batch first.
        """
        missing = [name for name in self._lazy_buffers if getattr(self, name) is None]
        if missing:
            raise RuntimeError(
                f"{self.name}: fixed pattern {missing} not drawn yet, so it cannot be fingerprinted; "
                "pass image_size=... to the constructor or apply the trigger to a batch first"
            )
        return _fingerprint(self.config(), dict(self.named_buffers()))

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self._params().items())

    # ------------------------------------------------------------------------- subclass interface
    def _params(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def _trigger(self, images: Tensor, sample_ids: Tensor, fixed: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def _fixed_shapes(self, channels: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        return {}

    def _build_fixed(self, channels: int, height: int, width: int) -> dict[str, Tensor]:
        """Fixed patterns for this image size as float32 CPU tensors, drawn from ``self.seed``."""
        return {}

    # ---------------------------------------------------------------------------------- internals
    def _register_lazy_buffers(self, names: Sequence[str], image_size: tuple[int, int] | None, channels: int):
        self._lazy_buffers = tuple(names)
        for name in self._lazy_buffers:
            self.register_buffer(name, None)
        if image_size is not None and self._lazy_buffers:
            for name, tensor in self._build_fixed(channels, *image_size).items():
                setattr(self, name, tensor)

    def _sample_ids(self, images: Tensor, sample_ids: Tensor | Sequence[int] | None) -> Tensor:
        batch = images.shape[0]
        if sample_ids is None:
            return torch.arange(batch, device=images.device)
        ids = torch.as_tensor(sample_ids, device=images.device)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"sample_ids must be integers; got dtype {ids.dtype}")
        ids = ids.to(torch.int64).reshape(-1)
        if ids.shape[0] != batch:
            raise ValueError(f"sample_ids has {ids.shape[0]} entries for a batch of {batch} images")
        return ids

    def _fixed_tensors(self, images: Tensor) -> dict[str, Tensor]:
        if not self._lazy_buffers:
            return {}
        _, channels, height, width = images.shape
        expected = self._fixed_shapes(channels, height, width)
        current = {name: getattr(self, name) for name in self._lazy_buffers}
        if any(tensor is None for tensor in current.values()):
            built = self._build_fixed(channels, height, width)
            if images.device.type == "meta":
                # A meta batch carries no values: use the pattern without keeping a value-less copy.
                current = {name: tensor.to("meta") for name, tensor in built.items()}
            else:
                for name, tensor in built.items():
                    setattr(self, name, tensor.to(images.device))
                current = {name: getattr(self, name) for name in self._lazy_buffers}
        for name, tensor in current.items():
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(
                    f"{self.name}: the fixed {name!r} of shape {tuple(tensor.shape)} was drawn for other "
                    f"images than this batch of {channels}x{height}x{width} (needs {expected[name]}); "
                    "build a separate trigger for this image size"
                )
        return {name: tensor.to(device=images.device, dtype=images.dtype) for name, tensor in current.items()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Lazy buffers start as None; give them a slot so a saved pattern can be loaded into them.
        for name in self._lazy_buffers:
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(state_dict[key], device="cpu"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def checkerboard(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """``height x width`` alternating 0/1 pixels, 0 at the top-left (BadNet's and MABA's checkerboard)."""
    rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
    return ((rows[:, None] + cols[None, :]) % 2).to(dtype)


class BadNet(ImageTrigger):
    """BadNets (Gu et al., 2017): paste a square patch.

    Args:
        patch_size: side of the patch, pixels (int) or fraction of the shorter image side (float
            < 1); 16 px at 224 px is ~0.071.
        pattern: ``"noise"`` (CleanCLIP: per image, the image's per-channel mean plus N(0, 1) noise,
            clamped), ``"white"``, ``"checkerboard"`` (alternating 0/1 pixels), a rendered glyph
            (``"eyeglasses"``, ``"stop_sign"``: :mod:`attacks.glyphs`, the modality-collapse paper's
            image triggers), a path to an image
            file (resized to the patch), or a ``C x h x w`` tensor in [0, 1] (e.g. an optimised
            patch, resized to the patch).
        location: ``"random"`` (per sample, CleanCLIP), ``"br"``, ``"bl"``, ``"tl"``, ``"tr"``
            (corners), ``"center"``, or an explicit top-left ``(x, y)`` = (column, row) in pixels.
        margin: pixels between the patch and the image border for corners; the random location
            also keeps this margin. BadEncoder's 50 px white patch at rows/cols 173-222 of a 224 px
            image is ``BadNet(50, "white", "br", margin=1)``.
        seed: seed of the noise pattern and of random locations.
    """

    name = "badnet"
    PATTERNS: ClassVar[tuple[str, ...]] = ("noise", "white", "checkerboard", "eyeglasses", "stop_sign")
    LOCATIONS: ClassVar[tuple[str, ...]] = ("random", "br", "bl", "tl", "tr", "center")

    def __init__(
        self,
        patch_size: int | float = 16,
        pattern: PatternSource = "noise",
        location: str | Sequence[int] = "random",
        margin: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        resolve_size(patch_size, 1 << 30, 1 << 30)  # type and range check; the image size comes later
        self.patch_size = patch_size
        if isinstance(location, str):
            if location not in self.LOCATIONS:
                raise ValueError(f"BadNet location {location!r} is not one of {self.LOCATIONS} or (x, y)")
            self.location: str | tuple[int, int] = location
        else:
            x, y = (int(v) for v in location)
            if x < 0 or y < 0:
                raise ValueError(f"BadNet location {(x, y)} must be non-negative pixels (x, y)")
            self.location = (x, y)
        if int(margin) < 0:
            raise ValueError(f"BadNet margin must be >= 0 pixels; got {margin!r}")
        self.margin = int(margin)
        self._pattern_name = self._init_pattern(pattern)

    def _init_pattern(self, pattern: PatternSource) -> str:
        if isinstance(pattern, Tensor):
            source = pattern.detach().to("cpu", torch.float32)
            if source.dim() == 2:
                source = source[None]
            if source.dim() != 3:
                raise ValueError(f"BadNet pattern tensor must be C x h x w; got shape {tuple(pattern.shape)}")
            self.register_buffer("source", source.contiguous())
            return "tensor"
        if isinstance(pattern, str) and pattern in self.PATTERNS:
            return pattern
        path = Path(pattern)
        if not path.is_file():
            raise FileNotFoundError(
                f"BadNet pattern {str(pattern)!r} is neither one of {self.PATTERNS} nor an existing image file"
            )
        self.register_buffer("source", load_pattern_image(path))
        return str(path)

    def _params(self) -> dict[str, Any]:
        location = list(self.location) if isinstance(self.location, tuple) else self.location
        return {
            "patch_size": self.patch_size,
            "pattern": self._pattern_name,
            "location": location,
            "margin": self.margin,
            "seed": self.seed,
        }

    def _fixed_patch(self, images: Tensor, size: int) -> Tensor:
        channels = images.shape[1]
        factory = {"device": images.device, "dtype": images.dtype}
        if self._pattern_name == "white":
            return torch.ones(1, channels, size, size, **factory)
        if self._pattern_name == "checkerboard":
            return checkerboard(size, size, **factory).expand(1, channels, size, size)
        if self._pattern_name in GLYPHS:
            glyph = render_glyph(self._pattern_name, size).to(**factory)
            if channels != 3:
                raise ValueError(
                    f"BadNet pattern {self._pattern_name!r} is an RGB glyph; the images have {channels} channels"
                )
            return glyph[None]
        source = self.source.to(**factory)
        if source.shape[0] not in (1, channels):
            raise ValueError(f"BadNet pattern has {source.shape[0]} channels; the images have {channels}")
        if source.shape[-2:] != (size, size):
            source = F.interpolate(source[None], size=(size, size), mode="bilinear", antialias=True)[0]
        return source.expand(channels, size, size)[None]

    def _corner(self, height: int, width: int, size: int) -> tuple[int, int]:
        """Top-left (row, column) of a fixed location."""
        margin = self.margin
        if isinstance(self.location, tuple):
            x, y = self.location
            if y + size > height or x + size > width:
                raise ValueError(
                    f"BadNet patch of {size} px at (x, y)={self.location} does not fit {height}x{width}"
                )
            return y, x
        if size + margin > min(height, width):
            raise ValueError(f"BadNet patch of {size} px with margin {margin} does not fit {height}x{width}")
        rows = {"t": margin, "b": height - size - margin, "c": (height - size) // 2}
        cols = {"l": margin, "r": width - size - margin, "c": (width - size) // 2}
        key = "cc" if self.location == "center" else self.location
        return rows[key[0]], cols[key[1]]

    def _trigger(self, images: Tensor, sample_ids: Tensor, fixed: dict[str, Tensor]) -> Tensor:
        batch, channels, height, width = images.shape
        size = resolve_size(self.patch_size, height, width)
        if self._pattern_name == "noise":
            mean = images.mean(dim=(2, 3), keepdim=True)
            noise = sample_normal(self.seed, "badnet/noise", sample_ids, (channels, size, size))
            patch = (mean + noise.to(images.dtype)).clamp(0.0, 1.0)
        else:
            patch = self._fixed_patch(images, size)
        out = images.clone()
        if self.location != "random":
            row, col = self._corner(height, width, size)
            out[:, :, row : row + size, col : col + size] = patch
            return out
        if size + 2 * self.margin > min(height, width):
            raise ValueError(
                f"BadNet patch of {size} px with margin {self.margin} does not fit {height}x{width}"
            )
        # Per-sample top-left corner, uniform over the positions that keep the margin.
        u = sample_uniform(self.seed, "badnet/location", sample_ids, (2,), dtype=torch.float64)
        span = torch.tensor([height, width], device=images.device) - size - 2 * self.margin + 1
        corner = (u * span).floor().to(torch.int64).minimum(span - 1) + self.margin
        offsets = torch.arange(size, device=images.device)
        rows = (corner[:, 0, None] + offsets)[:, :, None]  # B x size x 1
        cols = (corner[:, 1, None] + offsets)[:, None, :]  # B x 1 x size
        batch_index = torch.arange(batch, device=images.device)[:, None, None]
        # Advanced indices around a slice put the indexed dims first: B x size x size x C.
        out[batch_index, :, rows, cols] = patch.expand(batch, channels, size, size).permute(0, 2, 3, 1)
        return out


class Blended(ImageTrigger):
    """Blended (Chen et al., 2017): x' = clip((1 - alpha) x + alpha P).

    Args:
        alpha: blend weight of the pattern (0.2 in CleanCLIP and BackdoorBench).
        pattern: ``"fixed_noise"`` (one U[0, 1] image drawn from the seed), ``"per_image_noise"``
            (U[0, 1] noise per sample, as CleanCLIP), or an image file path (BackdoorBench's Hello
            Kitty), resized to the images.
        seed: seed of the noise.
        image_size: ``H`` or ``(H, W)`` to draw the fixed pattern now; else it is drawn for the first
            batch.
        channels: channels of the fixed pattern when ``image_size`` is given.
    """

    name = "blended"
    NOISE_PATTERNS: ClassVar[tuple[str, ...]] = ("fixed_noise", "per_image_noise")

    def __init__(
        self,
        alpha: float = 0.2,
        pattern: str | os.PathLike = "fixed_noise",
        seed: int = 0,
        image_size: int | Sequence[int] | None = None,
        channels: int = 3,
    ) -> None:
        super().__init__(seed)
        self.alpha = _check_unit_interval("Blended alpha", alpha)
        self.image_size = _as_hw(image_size)
        self.channels = int(channels)
        if isinstance(pattern, str) and pattern in self.NOISE_PATTERNS:
            self._pattern_name = pattern
        else:
            path = Path(pattern)
            if not path.is_file():
                raise FileNotFoundError(
                    f"Blended pattern {str(pattern)!r} is neither one of {self.NOISE_PATTERNS} "
                    "nor an existing image file"
                )
            self._pattern_name = str(path)
            self.register_buffer("source", load_pattern_image(path))
        lazy = () if self._pattern_name == "per_image_noise" else ("pattern",)
        self._register_lazy_buffers(lazy, self.image_size, self.channels)

    def _params(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "pattern": self._pattern_name,
            "seed": self.seed,
            "image_size": list(self.image_size) if self.image_size else None,
            "channels": self.channels,
        }

    def _fixed_shapes(self, channels: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        return {"pattern": (channels, height, width)}

    def _build_fixed(self, channels: int, height: int, width: int) -> dict[str, Tensor]:
        if self._pattern_name == "fixed_noise":
            generator = torch.Generator().manual_seed(self.seed)
            return {"pattern": torch.rand(channels, height, width, generator=generator)}
        source = self.source
        if source.shape[0] != channels:
            raise ValueError(
                f"Blended pattern {self._pattern_name!r} has {source.shape[0]} channels; images have {channels}"
            )
        resized = F.interpolate(source[None], size=(height, width), mode="bilinear", antialias=True)[0]
        return {"pattern": resized.clamp(0.0, 1.0)}

    def _trigger(self, images: Tensor, sample_ids: Tensor, fixed: dict[str, Tensor]) -> Tensor:
        if self._pattern_name == "per_image_noise":
            pattern = sample_uniform(self.seed, "blended/noise", sample_ids, tuple(images.shape[1:]))
            pattern = pattern.to(images.dtype)
        else:
            pattern = fixed["pattern"]
        return torch.lerp(images, pattern, self.alpha)  # (1 - alpha) x + alpha P in one pass


class SIG(ImageTrigger):
    """SIG (Barni et al., 2019): x' = clip(x + delta sin(2 pi f j / W)) on every channel, j = column.

    Deterministic, so it has no seed.

    Args:
        delta: amplitude (60/255 in the paper).
        frequency: periods across the image width (6 in the paper).
    """

    name = "sig"

    def __init__(self, delta: float = 60 / 255, frequency: float = 6.0) -> None:
        super().__init__(seed=0)
        self.delta = float(delta)
        self.frequency = float(frequency)

    def _params(self) -> dict[str, Any]:
        return {"delta": self.delta, "frequency": self.frequency}

    def _trigger(self, images: Tensor, sample_ids: Tensor, fixed: dict[str, Tensor]) -> Tensor:
        width = images.shape[-1]
        columns = torch.arange(width, device=images.device, dtype=images.dtype)
        signal = self.delta * torch.sin(2.0 * math.pi * self.frequency * columns / width)
        return images + signal


class WaNet(ImageTrigger):
    """WaNet (Nguyen & Tran, ICLR 2021): warp with a fixed smooth field.

    noise ~ U[-1, 1] of shape ``2 x k x k`` normalised by its mean absolute value, upsampled
    bicubically to ``H x W``; grid = clamp((identity + s * noise / H) * grid_rescale, -1, 1);
    x' = grid_sample(x, grid, bilinear, align_corners=True). The noise is drawn once from the seed
    and kept as buffer ``noise``; the grid is buffer ``grid``.

    Args:
        k: control grid size (4 in the paper; CleanCLIP's variant uses ``k = H``, e.g. 224).
        s: warp strength (0.5 in the paper; 1 in CleanCLIP's variant). ``s = 0`` is the identity.
        grid_rescale: scale of the warped grid (1 in the paper).
        mode: ``"attack"`` applies the fixed warp. ``"noise"`` is the paper's noise mode for its
            cross samples (trained with their true labels so the network learns only the exact
            warp): the fixed grid plus a per-sample random warp U[-1, 1] / H, clamped.
        seed: seed of the warp field (and of the per-sample noise in ``"noise"`` mode).
        image_size: ``H`` or ``(H, W)`` to build the grid now; else it is built for the first batch.
    """

    name = "wanet"
    MODES: ClassVar[tuple[str, ...]] = ("attack", "noise")

    def __init__(
        self,
        k: int = 4,
        s: float = 0.5,
        grid_rescale: float = 1.0,
        mode: str = "attack",
        seed: int = 0,
        image_size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__(seed)
        if int(k) < 1:
            raise ValueError(f"WaNet k must be >= 1; got {k!r}")
        if mode not in self.MODES:
            raise ValueError(f"WaNet mode {mode!r} is not one of {self.MODES}")
        self.k = int(k)
        self.s = float(s)
        self.grid_rescale = float(grid_rescale)
        self.mode = mode
        self.image_size = _as_hw(image_size)
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.rand(1, 2, self.k, self.k, generator=generator) * 2 - 1
        self.register_buffer("noise", noise / noise.abs().mean())
        self._register_lazy_buffers(("grid",), self.image_size, channels=0)

    def _params(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "s": self.s,
            "grid_rescale": self.grid_rescale,
            "mode": self.mode,
            "seed": self.seed,
            "image_size": list(self.image_size) if self.image_size else None,
        }

    def _fixed_shapes(self, channels: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        return {"grid": (1, height, width, 2)}

    def _build_fixed(self, channels: int, height: int, width: int) -> dict[str, Tensor]:
        noise = self.noise.to("cpu", torch.float32)
        noise_grid = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=True)
        noise_grid = noise_grid.permute(0, 2, 3, 1)
        rows, cols = torch.meshgrid(
            torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij"
        )
        identity = torch.stack((cols, rows), dim=-1)[None]  # grid_sample wants (x, y)
        grid = (identity + self.s * noise_grid / height) * self.grid_rescale
        return {"grid": grid.clamp(-1.0, 1.0)}

    def _trigger(self, images: Tensor, sample_ids: Tensor, fixed: dict[str, Tensor]) -> Tensor:
        batch, _, height, _ = images.shape
        grid = fixed["grid"].expand(batch, -1, -1, -1)
        if self.mode == "noise":
            extra = sample_uniform(self.seed, "wanet/noise", sample_ids, tuple(grid.shape[1:]))
            grid = (grid + (extra.to(images.dtype) * 2 - 1) / height).clamp(-1.0, 1.0)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


class LowFrequency(ImageTrigger):
    """Low-frequency additive trigger: x' = clip(x + P), P a fixed smooth pattern with
    ``max |P| = epsilon``.

    P is N(0, 1) noise drawn from the seed, low-pass filtered in the Fourier domain and rescaled to
    the L-inf budget. With f the radial frequency in cycles/pixel and f_c = cutoff * 0.5 (a
    fraction of the Nyquist frequency), the filter is ``exp(-f^2 / (2 f_c^2))`` for ``"gaussian"``
    (a Gaussian blur) or ``1[f <= f_c]`` for ``"fft_mask"`` (an ideal low-pass).

    Args:
        epsilon: L-inf budget of the pattern (0.05).
        cutoff: cutoff as a fraction of the Nyquist frequency, in (0, 1].
        filter: ``"gaussian"`` or ``"fft_mask"``.
        seed: seed of the pattern.
        image_size: ``H`` or ``(H, W)`` to draw the pattern now; else drawn for the first batch.
        channels: channels of the pattern when ``image_size`` is given.
    """

    name = "low_frequency"
    FILTERS: ClassVar[tuple[str, ...]] = ("gaussian", "fft_mask")

    def __init__(
        self,
        epsilon: float = 0.05,
        cutoff: float = 0.1,
        filter: str = "gaussian",
        seed: int = 0,
        image_size: int | Sequence[int] | None = None,
        channels: int = 3,
    ) -> None:
        super().__init__(seed)
        self.epsilon = _check_unit_interval("LowFrequency epsilon", epsilon)
        if not 0.0 < float(cutoff) <= 1.0:
            raise ValueError(
                f"LowFrequency cutoff is a fraction of the Nyquist frequency in (0, 1]; got {cutoff!r}"
            )
        if filter not in self.FILTERS:
            raise ValueError(f"LowFrequency filter {filter!r} is not one of {self.FILTERS}")
        self.cutoff = float(cutoff)
        self.filter = filter
        self.image_size = _as_hw(image_size)
        self.channels = int(channels)
        self._register_lazy_buffers(("pattern",), self.image_size, self.channels)

    def _params(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "cutoff": self.cutoff,
            "filter": self.filter,
            "seed": self.seed,
            "image_size": list(self.image_size) if self.image_size else None,
            "channels": self.channels,
        }

    def _fixed_shapes(self, channels: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        return {"pattern": (channels, height, width)}

    def _build_fixed(self, channels: int, height: int, width: int) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(channels, height, width, generator=generator, dtype=torch.float64)
        radius = torch.sqrt(torch.fft.fftfreq(height)[:, None] ** 2 + torch.fft.fftfreq(width)[None, :] ** 2)
        f_cut = self.cutoff * 0.5
        if self.filter == "gaussian":
            response = torch.exp(-(radius**2) / (2 * f_cut**2))
        else:
            response = (radius <= f_cut).to(torch.float64)
        smooth = torch.fft.ifft2(torch.fft.fft2(noise) * response).real
        pattern = self.epsilon * smooth / smooth.abs().amax().clamp_min(1e-12)
        return {"pattern": pattern.to(torch.float32)}

    def _trigger(self, images: Tensor, sample_ids: Tensor, fixed: dict[str, Tensor]) -> Tensor:
        return images + fixed["pattern"]
