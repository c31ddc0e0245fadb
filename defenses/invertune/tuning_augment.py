"""Label-preserving views of the single tuning batch (an option of InverTune's activation tuning).

InverTune tunes on ONE batch of 64 clean images; ``L_preserve`` then only pins the tuned model to the
frozen one on those 64 images. With ``model.augment`` every tuning step instead sees a fresh view of
the same 64 images (the batch, the inverted trigger and ``F_theta0`` of the view), so the preserve term
covers a neighbourhood of the batch. Not in the paper or the authors' code; off by default.

Per image, independently (seeded ``torch.Generator``):
- horizontal flip with probability ``flip_p`` (and vertical with ``vflip_p``);
- a translation by up to ``max_shift`` pixels in each direction (reflect padding, then crop);
- additive Gaussian noise of standard deviation ``noise_std`` (then clamped to [0, 1]).

``trigger_first``: the triggered view is ``aug(trigger(X))`` with the same flips, shifts and noise as
the clean view ``aug(X)`` (the inverted trigger moves with the image, so tuning also covers triggers a
few pixels off the inverted one); otherwise it is ``trigger(aug(X))`` (the trigger stays in place).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from model_families.clip.robust_augment import augment_block, uniform_draw


@dataclass(frozen=True)
class TuningAugment:
    """Random flips, shifts and noise of a ``B x C x H x W`` batch in [0, 1] (see the module docstring)."""

    flip_p: float = 0.5
    vflip_p: float = 0.0
    max_shift: int = 2
    noise_std: float = 0.0
    trigger_first: bool = False

    def __post_init__(self) -> None:
        for name in ("flip_p", "vflip_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"model.augment.{name} must be in [0, 1], got {value}")
        if self.max_shift < 0:
            raise ValueError(f"model.augment.max_shift must be >= 0, got {self.max_shift}")
        if self.noise_std < 0:
            raise ValueError(f"model.augment.noise_std must be >= 0, got {self.noise_std}")

    @classmethod
    def from_dict(cls, config: dict | None) -> TuningAugment | None:
        """``None`` for an empty/absent block; unknown keys are an error naming them."""
        values = augment_block(cls, config)
        return None if values is None else cls(**values)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        batch, _, height, width = images.shape
        device = images.device
        draw = functools.partial(uniform_draw, generator, device)

        out = images
        for p, dim in ((self.flip_p, -1), (self.vflip_p, -2)):
            if p > 0:
                flip = (draw(batch) < p).view(-1, 1, 1, 1)
                out = torch.where(flip, out.flip(dim), out)
        if self.max_shift > 0:
            s = self.max_shift
            padded = F.pad(out, (s, s, s, s), mode="reflect")
            shifts = torch.randint(0, 2 * s + 1, (batch, 2), generator=generator).to(device)
            rows = (torch.arange(height, device=device)[None, :] + shifts[:, :1]).view(batch, 1, height, 1)
            cols = (torch.arange(width, device=device)[None, :] + shifts[:, 1:]).view(batch, 1, 1, width)
            index = rows * (width + 2 * s) + cols  # B x 1 x H x W flat indices into the padded image
            flat = padded.flatten(2)
            out = flat.gather(2, index.expand(-1, out.shape[1], -1, -1).flatten(2)).view_as(out)
        if self.noise_std > 0:
            noise = torch.randn(out.shape, generator=generator).to(out) * self.noise_std
            out = (out + noise).clamp(0.0, 1.0)
        return out
