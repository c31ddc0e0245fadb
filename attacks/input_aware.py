"""InputAware (Nguyen & Tran, NeurIPS 2020): a dynamic, sample-specific image trigger
x' = x + (G(x) - x) * M(x) from a pattern generator G and a mask network M.

The reference code trains G jointly with the victim. For pure data poisoning (a generative VLM the attacker
only poisons the data of) G and M are trained on a surrogate classifier first (the project's tiny CLIP can
serve; :mod:`attacks.input_aware_training`), then frozen and saved as the trigger's artifact: a folder with

* ``weights.safetensors``: the generator's and the mask network's weights;
* ``manifest.json``: format, the network config, the training config and seed, the surrogate's path and
  sha256, the sha256 of the weights file.

:class:`InputAware` (registry name ``input_aware``) loads an artifact and applies it: the trigger is a pure
function of the image and the saved weights, so it differs per image and is the same on every call and after
every reload. Its :meth:`~InputAware.config` names the artifact and the weights' sha256, and its fingerprint
covers the weights, so a poison manifest pins the exact generator.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from attacks.hashing import file_sha256
from attacks.hashing import fingerprint as _fingerprint
from attacks.image_triggers import ImageTrigger
from attacks.io import atomic_write_bytes, atomic_write_json

__all__ = [
    "ARTIFACT_FORMAT",
    "InputAware",
    "InputAwareNetworks",
    "load_input_aware",
    "save_input_aware",
]

ARTIFACT_FORMAT = "mmbackdoor.input_aware"
ARTIFACT_VERSION = 2
# version 1 predates ``mask_threshold`` in the networks' config: its masks were the raw sigmoid
READABLE_VERSIONS = {1: {"mask_threshold": False}, 2: {}}
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"


def _conv_net(channels: int, width: int, out_channels: int) -> nn.Sequential:
    """A small fully convolutional encoder-decoder (any image size divisible by 2)."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, out_channels, 3, padding=1),
        nn.Sigmoid(),
    )


class InputAwareNetworks(nn.Module):
    """The generator G (``channels`` -> ``channels``, a pattern in [0, 1]) and the mask network M
    (``channels`` -> 1, a blending mask in [0, 1]).

    Args:
        channels: image channels.
        width: feature channels of both networks.
        mask_threshold: pass M's output through the reference code's soft step
            ``0.5 + 0.5 tanh(20 m - 10)`` (``netM.threshold``, used in training and poisoning alike), so the mask is
            nearly binary: a few pixels take the pattern, the others stay the image's. False gives the raw
            sigmoid mask (artifacts of format version 1 were made so).
    """

    def __init__(self, channels: int = 3, width: int = 16, mask_threshold: bool = True) -> None:
        super().__init__()
        self.channels, self.width, self.mask_threshold = int(channels), int(width), bool(mask_threshold)
        self.generator = _conv_net(self.channels, self.width, self.channels)
        self.mask = _conv_net(self.channels, self.width, 1)

    def config(self) -> dict[str, Any]:
        return {"channels": self.channels, "width": self.width, "mask_threshold": self.mask_threshold}

    def patterns(self, images: Tensor) -> Tensor:
        """G(x)."""
        return self.generator(images)

    def masks(self, images: Tensor) -> Tensor:
        """M(x), one channel (thresholded when ``mask_threshold``)."""
        masks = self.mask(images)
        return 0.5 + 0.5 * torch.tanh(20.0 * masks - 10.0) if self.mask_threshold else masks

    def forward(self, images: Tensor) -> Tensor:
        """x + (G(x) - x) * M(x)."""
        return images + (self.patterns(images) - images) * self.masks(images)


def save_input_aware(
    path: str | os.PathLike,
    networks: InputAwareNetworks,
    *,
    seed: int,
    surrogate: str | os.PathLike,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write an artifact folder (weights, then the manifest, each atomically); an existing manifest is never
    overwritten. ``surrogate`` is the model G and M were trained on (a CLIP export folder or a file): its path
    and the sha256 of its weights are recorded."""
    folder = Path(path)
    if (folder / MANIFEST).exists():
        raise FileExistsError(f"input_aware artifact already exists, refusing to overwrite: {folder}")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in networks.state_dict().items()}
    if not all(bool(torch.isfinite(t).all()) for t in state.values()):
        raise ValueError(f"input_aware networks hold non-finite weights; not saving {folder}")
    atomic_write_bytes(folder / WEIGHTS, save(state))
    manifest = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "networks": networks.config(),
        "seed": int(seed),
        "surrogate": {"path": str(surrogate), "sha256": surrogate_sha256(surrogate)},
        "weights_sha256": file_sha256(folder / WEIGHTS),
        "training": dict(training or {}),
    }
    atomic_write_json(folder / MANIFEST, manifest)
    return folder


def surrogate_sha256(surrogate: str | os.PathLike) -> str:
    """sha256 of a surrogate's weights: ``model.safetensors`` of an export folder, or the file itself."""
    path = Path(surrogate)
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"input_aware surrogate weights not found: {weights}")
    return file_sha256(weights)


def load_input_aware(path: str | os.PathLike) -> tuple[InputAwareNetworks, dict[str, Any]]:
    """The frozen networks and the manifest of an artifact folder. A missing folder or file, another format,
    weights whose sha256 differs from the manifest's, or weights that do not fit the recorded networks raise an
    error naming the file."""
    folder = Path(path)
    manifest_path, weights_path = folder / MANIFEST, folder / WEIGHTS
    for file in (manifest_path, weights_path):
        if not file.is_file():
            raise FileNotFoundError(
                f"input_aware artifact {folder} lacks {file.name}; train one with scripts/train_input_aware.py"
            )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{manifest_path} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise ValueError(
            f"{manifest_path} is not an input_aware manifest (format {ARTIFACT_FORMAT!r} expected)"
        )
    if manifest.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{manifest_path}: version {manifest.get('version')!r}; expected one of {sorted(READABLE_VERSIONS)}"
        )
    digest = file_sha256(weights_path)
    if digest != manifest.get("weights_sha256"):
        raise ValueError(
            f"{weights_path} has sha256 {digest}, but {manifest_path} records {manifest.get('weights_sha256')}: "
            "the weights were changed or belong to another artifact"
        )
    networks = InputAwareNetworks(**{**READABLE_VERSIONS[manifest["version"]], **manifest["networks"]})
    state = load_file(str(weights_path))
    try:
        networks.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"{weights_path} does not fit the networks {manifest['networks']}: {error}"
        ) from None
    networks.eval().requires_grad_(False)
    return networks, manifest


class InputAware(ImageTrigger):
    """InputAware trigger x' = x + (G(x) - x) * M(x) from a saved artifact (see the module docstring).

    Args:
        artifact: folder written by :func:`save_input_aware` (``scripts/train_input_aware.py``).
        weights_sha256: the sha256 the artifact's weights must have (what :meth:`config` records, so a trigger
            rebuilt from a poison manifest refuses a changed artifact); None accepts the artifact as it is.
        seed: unused (the trigger is deterministic); kept for the catalogue's interface.
    """

    name = "input_aware"

    def __init__(
        self, artifact: str | os.PathLike | None = None, weights_sha256: str | None = None, seed: int = 0
    ) -> None:
        super().__init__(seed)
        if artifact is None:
            raise ValueError(
                "input_aware needs its trained generator: set attack_kwargs.artifact to a folder written by "
                "scripts/train_input_aware.py"
            )
        self.artifact = str(artifact)
        networks, manifest = load_input_aware(self.artifact)
        if weights_sha256 is not None and weights_sha256 != manifest["weights_sha256"]:
            raise ValueError(
                f"input_aware artifact {self.artifact} has weights sha256 {manifest['weights_sha256']}, not the "
                f"expected {weights_sha256} (the poison was made with another generator)"
            )
        self.networks = networks
        self.manifest = manifest

    def _params(self) -> dict[str, Any]:
        return {
            "artifact": self.artifact,
            "weights_sha256": self.manifest["weights_sha256"],
            "seed": self.seed,
        }

    def fingerprint(self) -> str:
        """``sha256:<hex>`` over :meth:`config` and the generator's and mask network's weights."""
        return _fingerprint(self.config(), dict(self.networks.state_dict()))

    def _trigger(self, images: Tensor, sample_ids: Tensor, fixed: dict[str, Tensor]) -> Tensor:
        channels = self.networks.channels
        if images.shape[1] != channels:
            raise ValueError(f"input_aware artifact {self.artifact} was trained on {channels}-channel images")
        if images.shape[-1] % 2 or images.shape[-2] % 2:
            raise ValueError(f"input_aware needs an even image size, got {tuple(images.shape[-2:])}")
        self.networks.to(images.device)
        with torch.no_grad():
            return self.networks.to(images.dtype)(images).clone()
