"""A warp trigger estimate for InverTune (an option; not in the paper or the authors' code).

WaNet (Nguyen & Tran, ICLR 2021) moves pixels instead of painting them, which a mask and pattern
``x' = m * t + (1 - m) * x`` cannot express. The warp estimate has WaNet's own form: a displacement field
upsampled bicubically from a ``2 x g x g`` control grid ``c``,

    flow = upsample_bicubic(c) (H x W x 2, normalised coordinates),
    x'   = grid_sample(x, clamp(identity + flow, -1, 1)) (bilinear, border padding).

:func:`invert_warp` fits ``c`` on the defender's clean non-target images with Adam:

    L = CE(cos(f(x'), T) / tau, target) + w_disp * mean_px |flow|,

the alignment loss of the mask/pattern inversion plus the mean displacement in pixels, which keeps the
warp small (the smooth field already keeps it natural). Activation tuning can use the fitted warp as a
further trigger estimate (``model.tune_with_warp``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defenses.invertune.trigger_inversion import align_loss
from defenses.invertune.zero_shot import Normalize, encode_images, eval_mode, frozen_parameters


class InvertedWarp(nn.Module):
    """A smooth warp ``x' = grid_sample(x, identity + upsample(control))`` of ``image_size`` images.

    ``control`` (``1 x 2 x grid x grid``, normalised coordinates) starts as N(0, ``init_std``) drawn with
    ``seed`` (a tiny non-zero field: bilinear sampling has a kink exactly at the pixel centres)."""

    def __init__(
        self, image_size: tuple[int, int], *, grid: int = 4, init_std: float = 1e-3, seed: int = 0
    ) -> None:
        super().__init__()
        if grid < 2:
            raise ValueError(f"the warp's control grid must be >= 2, got {grid}")
        height, width = image_size
        self.image_size = (int(height), int(width))
        generator = torch.Generator().manual_seed(seed)
        self.control = nn.Parameter(torch.randn(1, 2, grid, grid, generator=generator) * init_std)
        identity = F.affine_grid(torch.eye(2, 3)[None], (1, 1, height, width), align_corners=True)
        self.register_buffer("identity", identity, persistent=False)
        # normalised units -> pixels per axis (x, y) with align_corners=True
        self.register_buffer(
            "pixels_per_unit", torch.tensor([(width - 1) / 2, (height - 1) / 2]), persistent=False
        )
        self.history: list[dict[str, float]] = []

    def flow(self) -> Tensor:
        """``1 x H x W x 2`` displacement in normalised coordinates (x, y)."""
        field = F.interpolate(self.control, size=self.image_size, mode="bicubic", align_corners=True)
        return field.permute(0, 2, 3, 1)

    def displacement_px(self) -> Tensor:
        """Mean absolute displacement in pixels over both axes and all positions."""
        return (self.flow().abs() * self.pixels_per_unit).mean()

    def forward(self, images: Tensor) -> Tensor:
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"the warp was fitted for {self.image_size} images, got {tuple(images.shape[-2:])}"
            )
        grid = (self.identity + self.flow()).clamp(-1, 1).to(images.dtype)
        grid = grid.expand(images.shape[0], -1, -1, -1)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)


def invert_warp(
    model: nn.Module,
    images: Iterable[Tensor],
    target: int,
    class_text_embeds: Tensor,
    normalize: Normalize,
    image_size: tuple[int, int],
    *,
    grid: int = 4,
    epochs: int = 30,
    lr: float = 0.01,
    displacement_weight: float = 0.1,
    temperature: float = 0.07,
    seed: int = 0,
) -> InvertedWarp:
    """Fit an :class:`InvertedWarp` that sends the clean non-target ``images`` (re-iterable batches in
    [0, 1]) to ``target`` (module docstring); the model stays frozen and in eval mode. One Adam step per
    batch; ``history`` records ``{epoch, step, align, displacement_px, total}``."""
    if epochs < 1:
        raise ValueError(f"warp epochs must be >= 1, got {epochs}")
    if displacement_weight < 0:
        raise ValueError(f"the warp's displacement weight must be >= 0, got {displacement_weight}")
    if lr <= 0:
        raise ValueError(f"the warp's learning rate must be > 0, got {lr}")
    device = class_text_embeds.device
    warp = InvertedWarp(image_size, grid=grid, seed=seed).to(device)
    optimizer = torch.optim.Adam(warp.parameters(), lr=lr)
    step = 0
    with eval_mode(model), frozen_parameters(model):
        for epoch in range(epochs):
            for batch in images:
                x = batch.to(device)
                align = align_loss(
                    encode_images(model, warp(x), normalize), class_text_embeds, target, temperature
                )
                displacement = warp.displacement_px()
                total = align + displacement_weight * displacement
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                warp.history.append(
                    {
                        "epoch": float(epoch),
                        "step": float(step),
                        "align": align.item(),
                        "displacement_px": displacement.item(),
                        "total": total.item(),
                    }
                )
                step += 1
    if step == 0:
        raise ValueError("invert_warp got no images: the clean non-target set is empty")
    return warp.eval().requires_grad_(False)
