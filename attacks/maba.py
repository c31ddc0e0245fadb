"""MABA: attribution-guided placement of an image trigger (Liang et al., CVPR 2025).

The trigger (a yellow oval blended with alpha 0.5) goes in the region of each image that matters for the clean
caption but not for the target output: with region attributions ``a_clean`` (of the clean caption's score) and
``a_target`` (of the target output's score), ``m = m_clean - (m_clean AND m_target)`` where ``m_x`` marks the
``top_fraction`` of grid cells by attribution, and the trigger's centre is the cell of ``m`` with the largest
clean attribution (when ``m`` is empty, the cell maximising ``a_clean - a_target``).

Attributions come from **captum** (``Saliency`` or ``IntegratedGradients``) on a differentiable scorer the model
family supplies: ``score(images, texts) -> (B,)`` log-probabilities of ``texts[i]`` given ``images[i]``
(:class:`ImageTextScorer`); pixel attributions are summed over channels and cells. A scorer whose output has no
gradient to the image is an error (:func:`check_image_gradients`).

:class:`Maba` (registry name ``maba``) draws the oval at the placements computed for each image; images are
recognised by the sha256 of their 8-bit quantisation (:func:`image_digest`), so the placement of a sample is the
same in every batch, split and process. Placements are an artifact (a JSON table, :meth:`Maba.save_placements`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from attacks.hashing import fingerprint as _fingerprint
from attacks.image_triggers import ImageTrigger, _check_unit_interval, checkerboard
from attacks.io import atomic_write_json

__all__ = [
    "ImageTextScorer",
    "Maba",
    "check_image_gradients",
    "image_digest",
    "maba_centres",
    "region_attributions",
]

METHODS = ("saliency", "integrated_gradients")
PATTERNS = ("oval", "checkerboard")


class ImageTextScorer(Protocol):
    """What a family supplies for MABA: the (log-)probability of each text given its image, differentiable
    in the images (``B x C x H x W`` in [0, 1])."""

    def __call__(self, images: Tensor, texts: Sequence[str]) -> Tensor: ...


def check_image_gradients(scorer: ImageTextScorer, images: Tensor, texts: Sequence[str]) -> None:
    """``ValueError`` when ``scorer`` gives no finite, non-zero gradient to the images (a family that detaches
    the pixels, or scores under ``no_grad``): MABA's attributions need one."""
    probe = images[:1].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        score = scorer(probe, list(texts[:1]))
        if not isinstance(score, Tensor) or not score.requires_grad:
            raise ValueError(
                "MABA needs gradients of the family's image-text score to the image, but its scorer returned "
                f"{type(score).__name__} without a gradient (computed under no_grad or from detached pixels)"
            )
        (grad,) = torch.autograd.grad(score.sum(), probe, allow_unused=True)
    if grad is None or not bool(torch.isfinite(grad).all()) or not bool(grad.abs().sum() > 0):
        raise ValueError(
            "MABA needs gradients of the family's image-text score to the image, but the gradient is "
            f"{'absent' if grad is None else 'zero or non-finite'}: the score does not depend on the pixels"
        )


def region_attributions(
    scorer: ImageTextScorer,
    images: Tensor,
    texts: Sequence[str],
    grid: int = 4,
    method: str = "saliency",
    steps: int = 16,
) -> Tensor:
    """``B x grid x grid`` attributions of ``texts``' scores to image regions, from captum (``saliency``: the
    gradient magnitude; ``integrated_gradients`` from a black baseline), summed over channels and cells."""
    from captum.attr import IntegratedGradients, Saliency

    if method not in METHODS:
        raise ValueError(f"MABA attribution method {method!r} is not one of {METHODS}")
    if len(texts) != len(images):
        raise ValueError(f"{len(texts)} texts for {len(images)} images")
    batch, texts = len(images), list(texts)

    def forward(x: Tensor) -> Tensor:  # captum may stack several copies of the batch (IG steps)
        return scorer(x, [texts[i % batch] for i in range(len(x))])

    inputs = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if method == "saliency":
            pixels = Saliency(forward).attribute(inputs, abs=True)
        else:
            pixels = IntegratedGradients(forward).attribute(inputs, baselines=inputs * 0, n_steps=steps).abs()
    per_pixel = pixels.detach().sum(1, keepdim=True)
    height, width = images.shape[-2:]
    if height % grid or width % grid:
        raise ValueError(f"MABA grid {grid} does not divide the image size {height}x{width}")
    return F.avg_pool2d(per_pixel, (height // grid, width // grid))[:, 0] * (height // grid) * (width // grid)


def maba_centres(clean: Tensor, target: Tensor, top_fraction: float = 0.25) -> Tensor:
    """``B x 2`` centres (row, column as fractions of the image side) of the chosen cells from ``B x g x g``
    clean and target attributions (see the module docstring)."""
    grid = clean.shape[1]
    flat_clean, flat_target = clean.flatten(1), target.flatten(1)
    keep = max(1, round(top_fraction * grid * grid))

    def top(values: Tensor) -> Tensor:
        mask = torch.zeros_like(values, dtype=torch.bool)
        return mask.scatter_(1, values.topk(keep, dim=1).indices, True)

    region = top(flat_clean) & ~top(flat_target)
    inside = torch.where(region, flat_clean, torch.full_like(flat_clean, float("-inf")))
    fallback = flat_clean - flat_target
    cells = torch.where(region.any(1), inside.argmax(1), fallback.argmax(1))
    rows, cols = cells // grid, cells % grid
    return torch.stack([(rows + 0.5) / grid, (cols + 0.5) / grid], dim=1)


def image_digest(image: Tensor) -> str:
    """sha256 of an image's 8-bit quantisation (``C x H x W`` in [0, 1]): its identity for placements."""
    quantised = (image.detach().to("cpu", torch.float32).clamp(0, 1) * 255).round().to(torch.uint8)
    return hashlib.sha256(quantised.contiguous().numpy().tobytes()).hexdigest()


class Maba(ImageTrigger):
    """A yellow oval (or a checkerboard) blended at each image's MABA placement (see the module docstring).

    Args:
        placements: a placement table written by :meth:`save_placements` (JSON ``{digest: [row, col]}``), or
            None to start empty (the instruction datamodule fills it with the family's scorer).
        width / height: the oval's axes (the checkerboard's sides) as fractions of the image side.
        alpha: blend weight of the mark (0.5; 1 pastes it).
        colour: RGB in [0, 1] of the oval (yellow).
        pattern: ``"oval"`` (the paper's mark) or ``"checkerboard"`` (alternating 0/1 pixels in a ``width x
            height`` rectangle, DualKey's image key, for the MABA-on-DualKey variant; ``colour`` unused).
        grid / top_fraction / method: the attribution grid, the share of cells in ``m_clean`` and ``m_target``,
            and the captum method (``saliency``, ``integrated_gradients``).
        seed: unused (the placement is deterministic).
    """

    name = "maba"
    needs_placements: ClassVar[bool] = True

    def __init__(
        self,
        placements: str | os.PathLike | None = None,
        width: float = 0.3,
        height: float = 0.2,
        alpha: float = 0.5,
        colour: Sequence[float] = (1.0, 0.85, 0.0),
        grid: int = 4,
        top_fraction: float = 0.25,
        method: str = "saliency",
        pattern: str = "oval",
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        if method not in METHODS:
            raise ValueError(f"MABA method {method!r} is not one of {METHODS}")
        if pattern not in PATTERNS:
            raise ValueError(f"MABA pattern {pattern!r} is not one of {PATTERNS}")
        self.pattern = pattern
        self.width, self.height = float(width), float(height)
        self.alpha = _check_unit_interval("MABA alpha", alpha)
        self.colour = tuple(float(c) for c in colour)
        self.grid, self.top_fraction, self.method = int(grid), float(top_fraction), method
        self.placements_path = None if placements is None else str(placements)
        self.table: dict[str, tuple[float, float]] = {}
        if placements is not None:
            path = Path(placements)
            if not path.is_file():
                raise FileNotFoundError(f"MABA placement table not found: {path}")
            self.table = {k: (float(v[0]), float(v[1])) for k, v in json.loads(path.read_text()).items()}

    # ------------------------------------------------------------------------------------ placements
    def place(
        self, scorer: ImageTextScorer, images: Tensor, clean_texts: Sequence[str], target_texts: Sequence[str]
    ) -> Tensor:
        """Compute and record the placements of ``images`` from the clean and target texts' attributions."""
        check_image_gradients(scorer, images, clean_texts)
        clean = region_attributions(scorer, images, clean_texts, self.grid, self.method)
        target = region_attributions(scorer, images, target_texts, self.grid, self.method)
        centres = maba_centres(clean, target, self.top_fraction)
        for image, centre in zip(images, centres.tolist()):
            self.table[image_digest(image)] = (centre[0], centre[1])
        return centres

    def save_placements(self, path: str | os.PathLike) -> Path:
        """Write the placement table atomically (JSON ``{digest: [row, col]}``)."""
        return atomic_write_json(path, {k: list(v) for k, v in sorted(self.table.items())})

    def _params(self) -> dict[str, Any]:
        return {
            "placements": self.placements_path,
            "width": self.width,
            "height": self.height,
            "alpha": self.alpha,
            "colour": list(self.colour),
            "grid": self.grid,
            "top_fraction": self.top_fraction,
            "method": self.method,
            "seed": self.seed,
            # named only when not the oval, so that the fingerprints of earlier (oval) manifests still match
            **({"pattern": self.pattern} if self.pattern != "oval" else {}),
        }

    def fingerprint(self) -> str:
        """``sha256:<hex>`` over :meth:`config` and the placement table."""
        return _fingerprint({**self.config(), "table": sorted(self.table.items())})

    def _trigger(self, images: Tensor, sample_ids: Tensor, fixed: dict[str, Tensor]) -> Tensor:
        channels, height, width = images.shape[1:]
        if self.pattern == "oval" and channels != len(self.colour):
            raise ValueError(f"MABA colour has {len(self.colour)} channels; the images have {channels}")
        centres = []
        for image in images:
            digest = image_digest(image)
            if digest not in self.table:
                raise KeyError(
                    f"MABA has no placement for an image (digest {digest[:12]}...): placements are computed by the "
                    "family's scorer for the training and evaluation images (Maba.place) before triggering"
                )
            centres.append(self.table[digest])
        centre = torch.tensor(centres, device=images.device, dtype=images.dtype)
        rows = (torch.arange(height, device=images.device, dtype=images.dtype) + 0.5) / height
        cols = (torch.arange(width, device=images.device, dtype=images.dtype) + 0.5) / width
        dy = (rows[None, :, None] - centre[:, 0, None, None]) / (self.height / 2)
        dx = (cols[None, None, :] - centre[:, 1, None, None]) / (self.width / 2)
        if self.pattern == "oval":
            mark = ((dx**2 + dy**2) <= 1.0).to(images.dtype)[:, None] * self.alpha
            colour = torch.tensor(self.colour, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
            return images * (1 - mark) + colour * mark
        inside = (dx.abs() <= 1.0) & (dy.abs() <= 1.0)  # the checkerboard's rectangle
        board = checkerboard(height, width, images.device, images.dtype)[None, None]
        mark = inside.to(images.dtype)[:, None] * self.alpha
        return images * (1 - mark) + board * mark
