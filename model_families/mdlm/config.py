"""Configuration of a LLaDA-V-style masked diffusion vision-language model.

The model is a SigLIP vision tower, an ``mlp2x_gelu`` projector and a LLaMA-architecture language model with
bidirectional attention (LLaDA). :class:`LladaVConfig` keeps the two sub-configurations as plain dicts of
transformers ``SiglipVisionConfig`` / ``LlamaConfig`` keyword arguments, so a config is a small JSON document.

``to_json_dict`` / ``from_json_dict`` read and write the flat ``config.json`` layout of the released LLaDA-V
checkpoint (a LLaMA config with ``mm_*`` fields, as read by the authors' ``llava`` package). The released file
names the vision tower (``mm_vision_tower``) instead of describing it; we add a ``vision_config`` entry with the
full SigLIP architecture so that a snapshot can be rebuilt offline, and fall back to the known so400m
architecture when a released file has none.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, SiglipVisionConfig

# LLaVA's placeholder id for an image in ``input_ids`` (``llava.constants.IMAGE_TOKEN_INDEX``).
LLAVA_IMAGE_TOKEN_INDEX = -200

SIGLIP_SO400M_384: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
}

LLADA_8B: dict[str, Any] = {
    "vocab_size": 126464,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
}

# LLaMA fields copied between ``text`` and the flat config.json.
_TEXT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "attention_dropout",
    "initializer_range",
    "tie_word_embeddings",
    "head_dim",
)
_PROJECTOR_TYPES = ("mlp2x_gelu",)
_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass
class LladaVConfig:
    """Architecture and special tokens of a LLaDA-V-style model.

    Args:
        vision: ``SiglipVisionConfig`` keyword arguments of the *full* SigLIP tower (e.g. 27 layers for
            so400m). The model keeps the layers up to ``mm_vision_select_layer`` and drops the rest, as LLaVA does.
        text: ``LlamaConfig`` keyword arguments of the language model (attention is made bidirectional).
        mm_projector_type: only ``"mlp2x_gelu"`` (Linear -> GELU -> Linear).
        mm_vision_select_layer: hidden state used as image features; -2 is the penultimate layer.
        use_image_newline: append a learned ``image_newline`` embedding after every row of vision tokens.
        image_aspect_ratio / mm_patch_merge_type / image_grid_pinpoints: kept for fidelity with the released
            config; this implementation always encodes one square crop (see ``modeling.py``).
        image_token_index: id of the image placeholder in ``input_ids`` (LLaVA uses -200, outside the vocab).
        mask_token_id / eos_token_id / eot_token_id / bos_token_id / pad_token_id / start_header_id /
            end_header_id: special token ids (LLaDA's: 126336, 126081, 126348, 126080, 126081, 126346, 126347).
        image_mean / image_std: per-channel normalisation applied to images given in [0, 1].
    """

    vision: dict[str, Any]
    text: dict[str, Any]
    mask_token_id: int
    eos_token_id: int
    eot_token_id: int
    image_token_index: int
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    start_header_id: int | None = None
    end_header_id: int | None = None
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    use_image_newline: bool = False
    image_aspect_ratio: str = "pad"
    mm_patch_merge_type: str = "flat"
    image_grid_pinpoints: list | str | None = None
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    mm_vision_tower: str = "google/siglip2-so400m-patch14-384"
    attn_implementation: str = "sdpa"
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mm_projector_type not in _PROJECTOR_TYPES:
            raise ValueError(
                f"mm_projector_type={self.mm_projector_type!r} is not supported; expected one of {_PROJECTOR_TYPES}"
            )
        if self.attn_implementation not in _ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation={self.attn_implementation!r}; expected one of {_ATTN_IMPLEMENTATIONS}"
            )
        if self.mm_vision_select_feature != "patch":
            raise ValueError(
                f"mm_vision_select_feature={self.mm_vision_select_feature!r}; SigLIP has no CLS token, "
                "only 'patch' is supported"
            )
        if not isinstance(getattr(torch, str(self.torch_dtype), None), torch.dtype):
            raise ValueError(f"torch_dtype={self.torch_dtype!r} is not a torch dtype name (e.g. 'bfloat16')")
        n_layers = self.vision["num_hidden_layers"]
        if not -n_layers <= self.mm_vision_select_layer < 0:
            raise ValueError(
                f"mm_vision_select_layer={self.mm_vision_select_layer} must be a negative index into the "
                f"{n_layers} + 1 hidden states, in [-{n_layers}, -1]"
            )

    # ------------------------------------------------------------------ derived sizes
    @property
    def image_size(self) -> int:
        """Side of the square input image in pixels (from the vision config)."""
        return int(self.vision["image_size"])

    @property
    def grid_size(self) -> int:
        """Number of patches per image side (SigLIP's stride-patch convolution floors: 384 // 14 = 27)."""
        return self.image_size // int(self.vision["patch_size"])

    @property
    def num_vision_tokens(self) -> int:
        """Projected patch tokens per image (``grid_size ** 2``; image_newline tokens not counted)."""
        return self.grid_size**2

    @property
    def num_image_positions(self) -> int:
        """Sequence positions taken by one image: patch tokens plus one newline per row when enabled."""
        return self.num_vision_tokens + (self.grid_size if self.use_image_newline else 0)

    @property
    def vision_layers_kept(self) -> int:
        """Encoder layers kept: hidden state ``select_layer`` of the full tower is the last kept layer's output."""
        return self.vision["num_hidden_layers"] + 1 + self.mm_vision_select_layer

    def llama_config(self) -> LlamaConfig:
        """transformers ``LlamaConfig`` of the language model, with causal masking switched off."""
        cfg = LlamaConfig(
            **self.text,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            # No padding_idx: LLaDA pads with EOS, whose embedding must keep training.
            pad_token_id=None,
            attn_implementation=self.attn_implementation,
        )
        cfg.is_causal = False
        cfg.use_cache = False
        return cfg

    def siglip_config(self) -> SiglipVisionConfig:
        """transformers ``SiglipVisionConfig`` of the *truncated* tower (layers after the selected one dropped)."""
        kwargs = dict(self.vision)
        kwargs["num_hidden_layers"] = self.vision_layers_kept
        kwargs["vision_use_head"] = False
        return SiglipVisionConfig(**kwargs, attn_implementation=self.attn_implementation)

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, tokenizer: Any = None, **overrides: Any) -> LladaVConfig:
        """Tiny model for the embedded shapes world: 32 px images, patch 4 (64 vision tokens), vision width 32,
        LM width 64, 2 layers, 4 heads; vocabulary and special ids from the embedded tokenizer."""
        if tokenizer is None:
            from model_families.mdlm.tokenizer import load_embedded_tokenizer

            tokenizer = load_embedded_tokenizer()
        from model_families.mdlm.tokenizer import special_token_ids

        ids = special_token_ids(tokenizer)
        config = {
            "vision": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_channels": 3,
                "image_size": 32,
                "patch_size": 4,
                "hidden_act": "gelu_pytorch_tanh",
                "layer_norm_eps": 1e-6,
            },
            "text": {
                "vocab_size": len(tokenizer),
                "hidden_size": 64,
                "intermediate_size": 192,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "hidden_act": "silu",
                "max_position_embeddings": 512,
                "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0,
                "tie_word_embeddings": False,
            },
            "mask_token_id": ids["mask"],
            "eos_token_id": ids["eos"],
            "eot_token_id": ids["eot"],
            "bos_token_id": ids["bos"],
            "pad_token_id": ids["pad"],
            "start_header_id": ids["start_header"],
            "end_header_id": ids["end_header"],
            "image_token_index": ids["image"],
            "mm_vision_tower": "embedded-siglip-tiny",
        }
        config.update(overrides)
        return cls(**config)

    @classmethod
    def released(cls, **overrides: Any) -> LladaVConfig:
        """Sizes of the released LLaDA-V: SigLIP2 so400m patch14 384 + LLaDA-8B-Instruct (untied head).

        The released model encodes images with ``anyres_max_4`` / ``spatial_unpad``; this preset keeps those
        names in the config but the model runs single-crop with a newline after each row (see modeling.py).
        """
        config = {
            "vision": dict(SIGLIP_SO400M_384),
            "text": dict(LLADA_8B),
            "mask_token_id": 126336,
            "eos_token_id": 126081,
            "eot_token_id": 126348,
            "bos_token_id": 126080,
            "pad_token_id": 126081,
            "start_header_id": 126346,
            "end_header_id": 126347,
            "image_token_index": LLAVA_IMAGE_TOKEN_INDEX,
            "use_image_newline": True,
            "image_aspect_ratio": "anyres_max_4",
            "mm_patch_merge_type": "spatial_unpad",
            "torch_dtype": "bfloat16",
        }
        config.update(overrides)
        return cls(**config)

    # ------------------------------------------------------------------ serialisation
    def to_json_dict(self) -> dict[str, Any]:
        """Flat dict in the layout of the released LLaDA-V ``config.json`` (plus ``vision_config``)."""
        out: dict[str, Any] = {"architectures": ["LlavaLLaDAModelLM"], "model_type": "llava_llada"}
        out.update({k: v for k, v in self.text.items() if k in _TEXT_KEYS})
        out.update(
            {
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id,
                "mask_token_id": self.mask_token_id,
                "eot_token_id": self.eot_token_id,
                "start_header_id": self.start_header_id,
                "end_header_id": self.end_header_id,
                "image_token_index": self.image_token_index,
                "mm_vision_tower": self.mm_vision_tower,
                "mm_projector_type": self.mm_projector_type,
                "mm_hidden_size": self.vision["hidden_size"],
                "mm_vision_select_layer": self.mm_vision_select_layer,
                "mm_vision_select_feature": self.mm_vision_select_feature,
                "mm_patch_merge_type": self.mm_patch_merge_type,
                "image_aspect_ratio": self.image_aspect_ratio,
                "image_grid_pinpoints": self.image_grid_pinpoints,
                "use_image_newline": self.use_image_newline,
                "mm_use_im_start_end": False,
                "mm_use_im_patch_token": False,
                "use_mm_proj": True,
                "image_mean": list(self.image_mean),
                "image_std": list(self.image_std),
                "vision_config": dict(self.vision),
                "attn_implementation": self.attn_implementation,
                "torch_dtype": self.torch_dtype,
            }
        )
        out.update(self.extra)
        return copy.deepcopy(out)

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> LladaVConfig:
        """Inverse of :meth:`to_json_dict`; also reads a released LLaDA-V ``config.json``.

        Unknown keys are kept in ``extra`` and written back unchanged.
        """
        data = copy.deepcopy(data)
        required = (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
            "intermediate_size",
        )
        missing = [k for k in required if k not in data]
        if missing:
            raise KeyError(f"config is missing the language-model fields {missing}")
        text = {k: data.pop(k) for k in _TEXT_KEYS if k in data}
        text.setdefault("num_key_value_heads", text["num_attention_heads"])
        text.setdefault("tie_word_embeddings", False)
        vision = data.pop("vision_config", None) or dict(SIGLIP_SO400M_384)
        vision = {
            k: v for k, v in vision.items() if k not in ("model_type", "architectures", "vision_use_head")
        }
        mm_hidden = data.pop("mm_hidden_size", vision["hidden_size"])
        if mm_hidden != vision["hidden_size"]:
            raise ValueError(
                f"mm_hidden_size={mm_hidden} differs from vision_config.hidden_size={vision['hidden_size']}"
            )
        merge = data.pop("mm_patch_merge_type", "flat")
        kwargs: dict[str, Any] = {
            "vision": vision,
            "text": text,
            "mask_token_id": data.pop("mask_token_id", 126336),
            "eos_token_id": data.pop("eos_token_id", 126081),
            "eot_token_id": data.pop("eot_token_id", 126348),
            "image_token_index": data.pop("image_token_index", LLAVA_IMAGE_TOKEN_INDEX),
            "bos_token_id": data.pop("bos_token_id", None),
            "pad_token_id": data.pop("pad_token_id", None),
            "start_header_id": data.pop("start_header_id", None),
            "end_header_id": data.pop("end_header_id", None),
            "mm_projector_type": data.pop("mm_projector_type", "mlp2x_gelu"),
            "mm_vision_select_layer": data.pop("mm_vision_select_layer", -2),
            "mm_vision_select_feature": data.pop("mm_vision_select_feature", "patch"),
            "mm_patch_merge_type": merge,
            # LLaVA creates image_newline exactly when the merge type contains "unpad".
            "use_image_newline": data.pop("use_image_newline", "unpad" in merge),
            "image_aspect_ratio": data.pop("image_aspect_ratio", "pad"),
            "image_grid_pinpoints": data.pop("image_grid_pinpoints", None),
            "mm_vision_tower": data.pop("mm_vision_tower", "google/siglip2-so400m-patch14-384"),
            "attn_implementation": data.pop("attn_implementation", "sdpa"),
            "torch_dtype": data.pop("torch_dtype", None) or data.pop("dtype", "float32"),
        }
        if "image_mean" in data:
            kwargs["image_mean"] = tuple(data.pop("image_mean"))
        if "image_std" in data:
            kwargs["image_std"] = tuple(data.pop("image_std"))
        for key in (
            "architectures",
            "model_type",
            "mm_use_im_start_end",
            "mm_use_im_patch_token",
            "use_mm_proj",
        ):
            data.pop(key, None)
        kwargs["extra"] = data
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        """Write ``to_json_dict()`` as JSON to ``path``."""
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LladaVConfig:
        """Read a ``config.json``; a missing file raises ``FileNotFoundError`` naming it, invalid JSON or a
        missing field ``ValueError`` naming the file (and the field)."""
        from model_families.loading import read_json_file

        data = read_json_file(path, what="LLaDA-V config")
        try:
            return cls.from_json_dict(data)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error.args[0] if error.args else error}") from None
