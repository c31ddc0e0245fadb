"""The optimised-patch artifact (BadCLIP-style) and the trigger that pastes it.

An artifact is a folder written by :func:`save_patch_artifact` (``scripts/optimize_patch.py`` makes one):

* ``patch.safetensors``: one tensor ``patch``, ``C x h x w`` float32 in [0, 1];
* ``patch_manifest.json``: format version, the patch's sha256 and shape, the image size it was optimised
  for, where it goes (``location``, ``margin``), the optimisation config and seed, the clean model it was
  optimised on (path, resolved path, sha256) and the final losses;
* ``patch.png``: a preview (not read back).

The manifest is written last, so a folder with a manifest holds a complete patch. Loading checks the
patch file against the manifest's sha256 and shape: a replaced or edited patch, a missing file or a
manifest of another format is an error naming the file, never a silently different trigger.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attacks.hashing import file_sha256
from attacks.image_triggers import BadNet
from attacks.io import atomic_save_image, atomic_write_bytes, atomic_write_json

__all__ = [
    "MANIFEST_FILE",
    "PATCH_FILE",
    "OptimizedPatch",
    "PatchArtifact",
    "load_patch_artifact",
    "save_patch_artifact",
]

PATCH_FILE = "patch.safetensors"
MANIFEST_FILE = "patch_manifest.json"
PREVIEW_FILE = "patch.png"
FORMAT_VERSION = 1
_REQUIRED = ("format_version", "patch_sha256", "patch_shape", "image_size", "location", "margin")
_HOW = "make it with scripts/optimize_patch.py"


@dataclass(frozen=True)
class PatchArtifact:
    """A loaded artifact: the patch (``C x h x w`` in [0, 1]) and its manifest."""

    patch: Tensor
    manifest: dict[str, Any]
    folder: Path


def save_patch_artifact(
    folder: str | os.PathLike,
    patch: Tensor,
    *,
    image_size: int | Sequence[int],
    location: str | Sequence[int],
    margin: int = 0,
    record: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``patch`` and its manifest into ``folder`` atomically (patch first, manifest last).

    ``record`` is free provenance (config, seed, clean model, losses) stored in the manifest. An existing
    artifact is an error unless ``overwrite=True``; a non-finite patch or values outside [0, 1] are refused.
    """
    from safetensors.torch import save

    folder = Path(folder)
    if (folder / MANIFEST_FILE).exists() and not overwrite:
        raise FileExistsError(
            f"patch artifact already exists, refusing to overwrite: {folder / MANIFEST_FILE}"
        )
    patch = patch.detach().to("cpu", torch.float32).contiguous()
    _check_patch(patch, f"patch for {folder}")
    data = save({"patch": patch})
    atomic_write_bytes(folder / PATCH_FILE, data)
    atomic_save_image(patch, folder / PREVIEW_FILE)
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    manifest = {
        **dict(record or {}),
        "format_version": FORMAT_VERSION,
        "patch_sha256": file_sha256(folder / PATCH_FILE),
        "patch_shape": list(patch.shape),
        "image_size": [int(height), int(width)],
        "location": location if isinstance(location, str) else [int(v) for v in location],
        "margin": int(margin),
    }
    atomic_write_json(folder / MANIFEST_FILE, manifest)
    return folder


def load_patch_artifact(folder: str | os.PathLike) -> PatchArtifact:
    """Read and verify an artifact folder (see the module docstring); errors name the file and the key."""
    from model_families.loading import load_safetensors_file, read_json_file  # no import cycle at load

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"optimised patch artifact not found: {str(folder)!r} is not a folder ({_HOW})"
        )
    manifest_path, patch_path = folder / MANIFEST_FILE, folder / PATCH_FILE
    for path in (manifest_path, patch_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"optimised patch artifact {str(folder)!r}: {path.name} is missing ({_HOW})"
            )
    manifest = read_json_file(manifest_path, _REQUIRED, what="optimised patch manifest")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{manifest_path}: format_version {manifest['format_version']!r} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    digest = file_sha256(patch_path)
    if digest != manifest["patch_sha256"]:
        raise ValueError(
            f"{patch_path} does not match its manifest: sha256 {digest} but {manifest_path} records "
            f"patch_sha256 {manifest['patch_sha256']} (the patch was replaced or edited; {_HOW})"
        )
    tensors = load_safetensors_file(patch_path)
    if set(tensors) != {"patch"}:
        raise ValueError(f"{patch_path}: expected one tensor named 'patch', found {sorted(tensors)}")
    patch = tensors["patch"].to(torch.float32)
    if list(patch.shape) != list(manifest["patch_shape"]):
        raise ValueError(
            f"{patch_path}: patch of shape {list(patch.shape)} but {manifest_path} records "
            f"patch_shape {manifest['patch_shape']}"
        )
    _check_patch(patch, str(patch_path))
    return PatchArtifact(patch=patch, manifest=manifest, folder=folder)


def _check_patch(patch: Tensor, where: str) -> None:
    if patch.dim() != 3 or patch.shape[-1] != patch.shape[-2]:
        raise ValueError(f"{where}: expected a square C x h x w patch, got shape {tuple(patch.shape)}")
    if not torch.isfinite(patch).all():
        raise ValueError(f"{where}: the patch holds non-finite values")
    low, high = float(patch.min()), float(patch.max())
    if low < 0.0 or high > 1.0 or math.isnan(low):
        raise ValueError(f"{where}: patch values must be in [0, 1], got [{low:.4g}, {high:.4g}]")


class OptimizedPatch(BadNet):
    """BadCLIP-style optimised patch (Liang et al., CVPR 2024): paste a patch loaded from an artifact.

    The patch was optimised on a clean CLIP (:func:`attacks.badclip.optimize_patch`,
    ``scripts/optimize_patch.py``) and is pasted like a fixed-pattern :class:`BadNet`, at its own size and,
    unless overridden, at the location it was optimised for. Images must have the size recorded in the
    manifest (a patch optimised for 32 px images is another trigger on 224 px ones).

    Args:
        patch: the artifact folder (``patch.safetensors`` + ``patch_manifest.json``).
        location: ``None`` (the manifest's, default) or any :class:`BadNet` location.
        margin: ``None`` (the manifest's) or pixels to the border for corner locations.
        seed: seed of a ``"random"`` location.
    """

    name = "patch_optimized"

    def __init__(
        self,
        patch: str | os.PathLike,
        location: str | Sequence[int] | None = None,
        margin: int | None = None,
        seed: int = 0,
    ) -> None:
        artifact = load_patch_artifact(patch)
        manifest = artifact.manifest
        super().__init__(
            patch_size=int(artifact.patch.shape[-1]),
            pattern=artifact.patch,
            location=manifest["location"] if location is None else location,
            margin=manifest["margin"] if margin is None else margin,
            seed=seed,
        )
        self.patch_path = str(patch)
        self.image_size = tuple(int(v) for v in manifest["image_size"])

    def _params(self) -> dict[str, Any]:
        params = super()._params()
        return {
            "patch": self.patch_path,
            "location": params["location"],
            "margin": self.margin,
            "seed": self.seed,
        }

    def _trigger(self, images: Tensor, sample_ids: Tensor, fixed: dict[str, Tensor]) -> Tensor:
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"patch_optimized: {self.patch_path} was optimised for {self.image_size[0]}x"
                f"{self.image_size[1]} images, got {images.shape[-2]}x{images.shape[-1]}; optimise a patch "
                "for this image size"
            )
        return super()._trigger(images, sample_ids, fixed)
