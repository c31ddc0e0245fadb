"""Build an editor by registered name or from a config, or load one from a local snapshot folder."""

from __future__ import annotations

import os
from typing import Any

import torch

from model_families.pix2pix.config import Pix2PixConfig, pix2pix_config
from model_families.pix2pix.modeling import Pix2PixModel
from model_families.pix2pix.tokenizer import build_clip_tokenizer


def create_pix2pix(
    name: str | Pix2PixConfig = "tiny-pix2pix-shapes",
    snapshot: str | os.PathLike | None = None,
    seed: int | None = None,
    **overrides: Any,
) -> Pix2PixModel:
    """A :class:`Pix2PixModel`: loaded from ``snapshot`` (a diffusers-layout folder, see
    :mod:`model_families.pix2pix.snapshot`) or built from ``name`` (a registered size or a config) with random
    weights (``seed`` fixes them) and the offline CLIP tokenizer."""
    if snapshot is not None:
        if overrides or not isinstance(name, str):
            raise ValueError(
                "a snapshot carries its own architecture: give snapshot or name/overrides, not both"
            )
        from model_families.pix2pix.snapshot import load_snapshot

        return load_snapshot(snapshot)
    config = name if isinstance(name, Pix2PixConfig) else pix2pix_config(name, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return Pix2PixModel(config, build_clip_tokenizer(config.max_text_length))
