"""Robustness augmentation for training a clean CLIP from scratch on the embedded world.

A CLIP pretrained on hundreds of millions of pairs does not change its prediction when a few pixels are
covered or a faint pattern is blended in. A tiny model trained on 8000 synthetic scenes does, and it falls
back on one class: a *clean* model then shows a high "ASR" for any trigger (the control row of the attack
table), and no defense can bring ASR below that floor. Training the clean model with these perturbations
gives it the pretrained model's indifference to them, so the control ASR measures the trigger, not the
model's fragility. Used for clean training only; poisoned fine-tuning and the defenses do not use it
(InverTune's optional views of its tuning batch are ``defenses/invertune/tuning_augment.py``).

Per image, independently (probabilities ``*_p``):

- **noise**: ``x + N(0, noise_std^2)``;
- **patch**: a random square of side ``U(patch_size)`` pixels at a random place is filled with uniform noise
  (covers the BadNet-style triggers' footprint without ever showing one);
- **blend**: ``(1 - a) x + a n`` with ``a ~ U(0, blend_alpha)`` and ``n`` a fresh uniform-noise image or a
  random sinusoid (the footprints of Blended and SIG).

All on the images' device, from a seeded ``torch.Generator`` (CPU), so runs are reproducible.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor


def augment_block(cls: type, config: dict | None, key: str = "model.augment") -> dict | None:
    """A copy of the ``key`` config block for dataclass ``cls`` (None when empty or absent); a key that is not
    one of ``cls``'s fields is a ``ValueError`` naming it and the expected ones."""
    if not config:
        return None
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{key}: unknown keys {unknown}; expected some of {sorted(known)}")
    return dict(config)


def uniform_draw(generator: torch.Generator, device: torch.device, *shape: int) -> Tensor:
    """``U[0, 1)`` numbers drawn from a CPU ``generator`` and moved to ``device``: the same views on
    every device for one seed (shared by the augmentations of clean training and of InverTune)."""
    return torch.rand(*shape, generator=generator).to(device)


@dataclass(frozen=True)
class RobustnessAugment:
    """The perturbations above; ``RobustnessAugment.from_dict(cfg)`` validates a config block."""

    noise_p: float = 0.3
    noise_std: float = 0.05
    patch_p: float = 0.3
    patch_size: tuple[int, int] = (2, 8)
    blend_p: float = 0.3
    blend_alpha: float = 0.25

    def __post_init__(self) -> None:
        for name in ("noise_p", "patch_p", "blend_p", "blend_alpha"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"model.augment.{name} must be in [0, 1], got {value}")
        if self.noise_std < 0:
            raise ValueError(f"model.augment.noise_std must be >= 0, got {self.noise_std}")
        low, high = self.patch_size
        if not 1 <= low <= high:
            raise ValueError(
                f"model.augment.patch_size must be [min, max] with 1 <= min <= max, got {self.patch_size}"
            )

    @classmethod
    def from_dict(cls, config: dict | None) -> RobustnessAugment | None:
        values = augment_block(cls, config)
        if values is None:
            return None
        if "patch_size" in values:
            values["patch_size"] = tuple(int(v) for v in values["patch_size"])
        return cls(**values)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Perturb a ``B x 3 x H x W`` batch of [0, 1] images."""
        batch, _, height, width = images.shape
        device = images.device
        draw = functools.partial(uniform_draw, generator, device)

        out = images
        noisy = (draw(batch) < self.noise_p).view(-1, 1, 1, 1)
        noise = torch.randn(images.shape, generator=generator).to(images) * self.noise_std
        out = torch.where(noisy, out + noise, out)

        patched = draw(batch) < self.patch_p
        if bool(patched.any()):
            low, high = self.patch_size
            side = torch.randint(low, min(high, height, width) + 1, (batch,), generator=generator).to(device)
            top = (draw(batch) * (height - side + 1)).floor()
            left = (draw(batch) * (width - side + 1)).floor()
            rows = torch.arange(height, device=device).view(1, -1, 1)
            cols = torch.arange(width, device=device).view(1, 1, -1)
            inside = (
                (rows >= top.view(-1, 1, 1))
                & (rows < (top + side).view(-1, 1, 1))
                & (cols >= left.view(-1, 1, 1))
                & (cols < (left + side).view(-1, 1, 1))
                & patched.view(-1, 1, 1)
            )
            out = torch.where(inside[:, None], draw(*images.shape).to(images), out)

        blended = (draw(batch) < self.blend_p).view(-1, 1, 1, 1)
        if bool(blended.any()):
            alpha = (draw(batch) * self.blend_alpha).view(-1, 1, 1, 1).to(images)
            uniform = draw(*images.shape).to(images)
            freq = 1 + (draw(batch) * 11).floor().view(-1, 1, 1, 1)
            cols = torch.arange(width, device=device).view(1, 1, 1, -1)
            sinusoid = (0.5 + 0.5 * torch.sin(2 * math.pi * cols * freq / width)).expand_as(images).to(images)
            pattern = torch.where((draw(batch) < 0.5).view(-1, 1, 1, 1), uniform, sinusoid)
            out = torch.where(blended, (1 - alpha) * out + alpha * pattern, out)
        return out.clamp(0.0, 1.0)
