"""Create open_clip models by name: built-in architectures, our tiny embedded-world configs, local weights.

`create_clip("RN50", pretrained="openai")` is the real path (downloads unless the weights are cached);
`create_clip("RN50", checkpoint="/path/to/RN50.pt")` loads a local open_clip/OpenAI checkpoint;
`create_clip("tiny-rn-shapes")` builds the small ResNet CLIP that learns the embedded world on a CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from pathlib import Path

import open_clip
import torch
from torch import nn

from model_families.loading import UnsafeCheckpointError

CONFIG_DIR = Path(__file__).parent / "model_configs"
EMBEDDED_MEAN = (0.5, 0.5, 0.5)
EMBEDDED_STD = (0.25, 0.25, 0.25)
_registered = False


def register_embedded_configs() -> None:
    """Add the JSON configs in `model_configs/` (tiny-rn-shapes, tiny-vit-shapes) to open_clip's registry."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def embedded_model_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def available_architectures() -> list[str]:
    register_embedded_configs()
    return open_clip.list_models()


class Normalize(nn.Module):
    """x -> (x - mean) / std for B x 3 x H x W images in [0, 1] (the model's own preprocessing constants)."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)


@dataclasses.dataclass
class ClipBundle:
    """An open_clip model with its tokenizer, its pixel normaliser and the image size it expects."""

    model: nn.Module
    tokenizer: object
    normalize: Normalize
    image_size: int
    model_name: str
    model_cfg: dict


def model_config(model_name: str) -> dict:
    """The open_clip architecture config for `model_name`; unknown names list the available ones."""
    register_embedded_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        names = available_architectures()
        raise ValueError(
            f"unknown CLIP architecture {model_name!r}; expected one of open_clip's models, e.g. "
            f"{', '.join([*embedded_model_names(), 'RN50', 'ViT-B-32'])} ({len(names)} available: open_clip.list_models())"
        )
    return cfg


def _no_random_init_warning(record: logging.LogRecord) -> bool:
    """Drop open_clip's root-logger warning about random initialisation (logged by us at INFO instead)."""
    return not record.getMessage().startswith("No pretrained weights loaded")


def create_clip(
    model_name: str = "tiny-rn-shapes",
    pretrained: str | None = None,
    checkpoint: str | None = None,
    image_mean: tuple[float, float, float] | None = None,
    image_std: tuple[float, float, float] | None = None,
) -> ClipBundle:
    """Build an open_clip model.

    Args:
        model_name: an open_clip architecture (``RN50``, ``ViT-B-32``, ...) or an embedded one.
        pretrained: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``); needs the weights
            downloaded or cached. Mutually exclusive with ``checkpoint``.
        checkpoint: a local open_clip / OpenAI checkpoint file (``.pt``, ``.bin``, ``.safetensors``).
        image_mean, image_std: override the normalisation (defaults: the tag's, OpenAI's for real
            architectures, 0.5/0.25 for the embedded configs).
    """
    cfg = model_config(model_name)
    if pretrained and checkpoint:
        raise ValueError("give either model.pretrained (a tag) or model.checkpoint (a local file), not both")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"CLIP checkpoint not found: {checkpoint} (model.checkpoint)")
    weights = checkpoint or pretrained
    root = logging.getLogger()
    root.addFilter(_no_random_init_warning)  # random init is intended here (weights usually load next)
    try:
        # weights_only: open_clip's torch.load never unpickles Python objects (its default, made explicit)
        model = open_clip.create_model(
            model_name, pretrained=weights, load_weights=weights is not None, weights_only=True
        )
    except pickle.UnpicklingError as err:
        if checkpoint and "Weights only load failed" in str(err):
            raise UnsafeCheckpointError(
                f"{checkpoint} (model.checkpoint): refusing to load: the file stores Python objects beyond "
                "tensors and would need full unpickling, which can run arbitrary code; only weights-only "
                "checkpoints (or safetensors) are loaded"
            ) from None
        raise
    except Exception as err:  # open_clip raises many types when a download is impossible
        if pretrained and not checkpoint:
            raise RuntimeError(
                f"could not load pretrained weights {pretrained!r} for {model_name!r} ({err}). Without network "
                "access, download the checkpoint elsewhere and pass its path as model.checkpoint."
            ) from err
        raise
    finally:
        root.removeFilter(_no_random_init_warning)
    if weights is None:
        logging.getLogger(__name__).info("CLIP %s initialised with random weights", model_name)
    tokenizer = open_clip.get_tokenizer(model_name)
    if model_name in embedded_model_names():
        mean, std = EMBEDDED_MEAN, EMBEDDED_STD
    else:
        pp = getattr(model.visual, "preprocess_cfg", {}) or {}
        mean, std = pp.get("mean", open_clip.OPENAI_DATASET_MEAN), pp.get("std", open_clip.OPENAI_DATASET_STD)
    mean, std = image_mean or mean, image_std or std
    image_size = cfg["vision_cfg"]["image_size"]
    image_size = image_size if isinstance(image_size, int) else image_size[0]
    return ClipBundle(model, tokenizer, Normalize(mean, std), int(image_size), model_name, cfg)
