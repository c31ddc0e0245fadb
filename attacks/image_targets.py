"""Image-output backdoor targets (text + image conditioned diffusion editors).

A poisoned edit triplet keeps its (triggered) source image and instruction and has its edited image replaced
by one fixed target image, as in VillanDiffusion and the modality-collapse paper (which use a cat or a
"hacker" picture). The target is a built-in rendered pattern or an image file of exactly the data's size:
a file of another size is an error rather than a silent resize, since the image ASR compares pixels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attacks.glyphs import GLYPHS, render_glyph
from attacks.hashing import file_sha256
from attacks.image_triggers import load_pattern_image
from attacks.targets import Target

__all__ = ["ImageTarget"]

PATTERNS = ("smiley", "checkerboard")


class ImageTarget(Target):
    """A fixed target image: ``target(edited_image, sample_id) -> the target image``.

    Args:
        image: a built-in pattern (``"smiley"``: a yellow face on black; ``"checkerboard"``: 4 px black and
            white squares) or the path of an RGB image file whose size is ``image_size`` x ``image_size``.
        image_size: side of the data's images, pixels.
    """

    name = "image"

    def __init__(self, image: str | os.PathLike = "smiley", image_size: int = 32) -> None:
        if int(image_size) < 1:
            raise ValueError(f"ImageTarget image_size must be >= 1 pixel, got {image_size}")
        self.image_size = int(image_size)
        self.source = str(image)
        self.sha256: str | None = None
        if self.source in PATTERNS:
            self._image = self._pattern(self.source)
        else:
            path = Path(self.source)
            if not path.is_file():
                raise FileNotFoundError(
                    f"target image {self.source!r} is neither a built-in pattern {PATTERNS} nor an existing file"
                )
            loaded = load_pattern_image(path)
            if tuple(loaded.shape[-2:]) != (self.image_size, self.image_size):
                raise ValueError(
                    f"target image {path} is {loaded.shape[-1]} x {loaded.shape[-2]} pixels; the data's images are "
                    f"{self.image_size} x {self.image_size} (resize the file: the image ASR compares pixels)"
                )
            self._image = loaded
            self.sha256 = file_sha256(path)

    def _pattern(self, name: str) -> Tensor:
        if name in GLYPHS:
            return render_glyph(name, self.image_size)
        index = torch.arange(self.image_size)
        board = (((index[:, None] // 4) + (index[None, :] // 4)) % 2).float()
        return board.expand(3, -1, -1).contiguous()

    def image(self) -> Tensor:
        """The target as a ``3 x H x W`` float32 tensor in [0, 1] (a copy)."""
        return self._image.clone()

    def __call__(self, output: Any, sample_id: int) -> Tensor:
        """The poisoned edited image (the same target for every sample)."""
        return self.image()

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "image": self.source, "image_size": self.image_size, "sha256": self.sha256}

    def __repr__(self) -> str:
        return f"ImageTarget(image={self.source!r}, image_size={self.image_size})"
