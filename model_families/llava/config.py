"""Registered sizes of the LLaVA family: transformers ``LlavaConfig`` (CLIP vision tower, 2-layer GELU
projector, LLaMA language model) built offline, by name.

- ``tiny-llava-shapes``: the embedded world's model, at the scale of the tiny LLaDA-V
  (``configs/mdlm_shapes_clean.yaml``): 32 px images, CLIP patch 8 (16 patch tokens + CLS), vision width 64 with 3
  layers (the penultimate hidden state is used, as LLaVA does), LM width 64 with 2 layers and 4 heads.
- ``llava-1.5-7b``: the released ``llava-hf/llava-1.5-7b-hf`` sizes (CLIP ViT-L/14 at 336 px, 576 image tokens,
  Vicuna-7B). Config only: the real weights come from a local snapshot (:mod:`model_families.llava.snapshot`).

The number of image tokens a prompt must hold is fixed by the vision tower: ``(image_size // patch_size) ** 2``,
plus the CLS token with ``vision_feature_select_strategy="full"`` (``"default"`` drops it). ``image_seq_length``
must equal it (:func:`check_image_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, SiglipVisionConfig

__all__ = ["REGISTRY", "check_image_tokens", "image_statistics", "llava_config", "num_image_tokens"]

# LLaVA-1.5 normalises images with CLIP's statistics (its CLIPImageProcessor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SigLIP's image processor (and the tiny LLaDA-V, ``LladaVConfig.image_mean`` / ``image_std``) maps [0, 1] to
# [-1, 1]. For the tiny SigLIP tower trained from scratch this matters: with CLIP's statistics a tower-only probe
# learned shapes to 0.53 in 3000 steps, with these 0.67 (docs/llava.md).
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def image_statistics(config: LlavaConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The image ``(mean, std)`` a vision tower of ``config`` is trained with: SigLIP's for a SigLIP tower, CLIP's
    (LLaVA-1.5's) otherwise."""
    if config.vision_config.model_type == "siglip_vision_model":
        return SIGLIP_MEAN, SIGLIP_STD
    return CLIP_MEAN, CLIP_STD


def num_image_tokens(config: LlavaConfig) -> int:
    """Image features the vision tower gives per image: patches, plus CLS for a CLIP tower under the ``full``
    strategy (SigLIP has no CLS token)."""
    vision = config.vision_config
    patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
    has_cls = vision.model_type == "clip_vision_model"
    return patches + int(has_cls and config.vision_feature_select_strategy == "full")


def check_image_tokens(config: LlavaConfig, where: str = "LLaVA config") -> int:
    """``num_image_tokens(config)``; raise ``ValueError`` naming ``where`` when ``image_seq_length`` (the image
    tokens each prompt is expanded to) differs from what the vision tower produces."""
    expected = num_image_tokens(config)
    if int(config.image_seq_length) != expected:
        vision = config.vision_config
        raise ValueError(
            f"{where}: image_seq_length={config.image_seq_length} image tokens, but the vision tower "
            f"({vision.model_type}, {vision.image_size} px, patch {vision.patch_size}, strategy "
            f"{config.vision_feature_select_strategy!r}) gives {expected} features per image"
        )
    return expected


def _vision(kind: str, kwargs: dict[str, Any]) -> CLIPVisionConfig | SiglipVisionConfig:
    if kind == "clip":
        return CLIPVisionConfig(**kwargs)
    if kind == "siglip":
        return SiglipVisionConfig(**kwargs)
    raise ValueError(f"vision tower {kind!r}; expected 'clip' or 'siglip'")


def tiny_shapes(
    vocab_size: int,
    image_token_index: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    vision: dict | None = None,
    text: dict | None = None,
    vision_tower: str = "clip",
    **overrides: Any,
) -> LlavaConfig:
    """The embedded world's LLaVA (see the module docstring); ``vision`` / ``text`` override single keys of the
    vision / LLaMA configs, ``overrides`` keys of ``LlavaConfig``. A SigLIP tower (``vision_tower="siglip"``)
    takes the ``full`` strategy (no CLS token to drop)."""
    vision_kwargs = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_channels": 3,
        "image_size": 32,
        "patch_size": 8,
        "hidden_act": "quick_gelu" if vision_tower == "clip" else "gelu_pytorch_tanh",
        **({"projection_dim": 64} if vision_tower == "clip" else {}),
        **(vision or {}),
    }
    text_kwargs = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        **(text or {}),
    }
    vision_config = _vision(vision_tower, vision_kwargs)
    strategy = "default" if vision_tower == "clip" else "full"
    settings = {
        "image_token_index": image_token_index,
        "vision_feature_select_strategy": strategy,
        "vision_feature_layer": -2,
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": False,
        **overrides,
    }
    config = LlavaConfig(vision_config=vision_config, text_config=LlamaConfig(**text_kwargs), **settings)
    if "image_seq_length" not in overrides:
        config.image_seq_length = num_image_tokens(config)
    check_image_tokens(config, "tiny-llava-shapes")
    return config


def llava15_7b(**overrides: Any) -> LlavaConfig:
    """``llava-hf/llava-1.5-7b-hf``: CLIP ViT-L/14-336 (24 layers, width 1024, the penultimate layer's 576
    patch features), GELU projector 1024 -> 4096 -> 4096, Vicuna-7B v1.5 (32 layers, width 4096, vocabulary
    32064 with ``<image>`` = 32000 and ``<pad>`` = 32001), float16."""
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=32001,
    )
    settings = {
        "image_token_index": 32000,
        "image_seq_length": 576,
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": False,
        "dtype": "float16",
        **overrides,
    }
    config = LlavaConfig(vision_config=vision, text_config=text, **settings)
    check_image_tokens(config, "llava-1.5-7b")
    return config


REGISTRY: dict[str, Callable[..., LlavaConfig]] = {
    "tiny-llava-shapes": tiny_shapes,
    "llava-1.5-7b": llava15_7b,
}


def llava_config(name: str, **overrides: Any) -> LlavaConfig:
    """The registered config ``name`` (``tiny-llava-shapes``, ``llava-1.5-7b``) with ``overrides``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown LLaVA architecture {name!r}; expected one of {sorted(REGISTRY)}")
    return REGISTRY[name](**overrides)
