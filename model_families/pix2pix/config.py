"""Configuration of an InstructPix2Pix-style text + image conditioned diffusion editor.

The model (Brooks et al., InstructPix2Pix, CVPR 2023) is a ``UNet2DConditionModel`` whose input is the noisy
target latent concatenated on the channel axis with the latent of the conditioning (source) image, so
``in_channels = 2 * latent_channels``; the edit instruction enters through cross-attention on the hidden states
of a ``CLIPTextModel``. Latents come from an ``AutoencoderKL`` (real models) or from the lossless
``pixel_unshuffle`` codec (the embedded world: space-to-depth x4 of 32 px RGB -> 48 x 8 x 8).

:class:`Pix2PixConfig` keeps each component's configuration as a plain dict of diffusers / transformers keyword
arguments, so a config is a small JSON document; registered sizes are found by name (:func:`pix2pix_config`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

CODECS = ("vae", "pixel_unshuffle")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
# what the UNet sets itself from the codec (never given in ``unet``)
_DERIVED_UNET_KEYS = ("in_channels", "out_channels", "sample_size")
# CLIP's BPE vocabulary (open_clip's bpe_simple_vocab_16e6 and openai/clip-vit-large-patch14)
CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407


@dataclass
class Pix2PixConfig:
    """Architecture of an InstructPix2Pix-style editor.

    Args:
        unet: ``UNet2DConditionModel`` keyword arguments without ``in_channels`` / ``out_channels`` /
            ``sample_size`` (derived from the codec: ``2 * latent_channels`` in, ``latent_channels`` out).
        text: ``CLIPTextConfig`` keyword arguments; ``hidden_size`` must equal the UNet's ``cross_attention_dim``.
        codec: ``"vae"`` (an ``AutoencoderKL`` built from ``vae``) or ``"pixel_unshuffle"`` (lossless
            space-to-depth by ``unshuffle_factor``, no weights).
        vae: ``AutoencoderKL`` keyword arguments (``codec="vae"`` only).
        unshuffle_factor: side of the pixel blocks folded into channels (``codec="pixel_unshuffle"``).
        image_size: side of the square images in pixels.
        prediction_type: what the network's output means to the scheduler: ``"epsilon"`` (the noise, as the
            released model), ``"sample"`` (the clean latent x0) or ``"v_prediction"``.
        residual: predict x0 as the conditioning latent plus the UNet output (``x0 = source + UNet(...)``; the
            embedded world's choice, which learns on a CPU budget); needs ``prediction_type="sample"``.
        scheduler: ``DDPMScheduler`` keyword arguments of the training noise schedule (sampling schedulers
            are built from the same schedule).
        max_text_length: tokens per instruction (the tokenizer pads and truncates to it).
    """

    unet: dict[str, Any]
    text: dict[str, Any]
    codec: str = "vae"
    vae: dict[str, Any] | None = None
    unshuffle_factor: int = 4
    image_size: int = 512
    prediction_type: str = "epsilon"
    residual: bool = False
    scheduler: dict[str, Any] = field(default_factory=dict)
    max_text_length: int = 77

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"codec={self.codec!r} is not supported; expected one of {CODECS}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={self.prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if self.residual and self.prediction_type != "sample":
            raise ValueError(
                f"residual=True predicts x0 = source + UNet output, so it needs prediction_type='sample', "
                f"got prediction_type={self.prediction_type!r}"
            )
        if self.codec == "vae" and not self.vae:
            raise ValueError("codec='vae' needs the AutoencoderKL arguments in `vae`")
        if self.codec == "pixel_unshuffle" and self.image_size % self.unshuffle_factor:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of unshuffle_factor={self.unshuffle_factor}"
            )
        derived = [k for k in _DERIVED_UNET_KEYS if k in self.unet]
        if derived:
            raise ValueError(f"unet must not set {derived}: they follow from the codec and image_size")
        width, cross = self.text.get("hidden_size"), self.unet.get("cross_attention_dim")
        if width != cross:
            raise ValueError(
                f"text.hidden_size={width} must equal unet.cross_attention_dim={cross} (the UNet attends to "
                "the text encoder's hidden states)"
            )
        if self.max_text_length > self.text.get("max_position_embeddings", 77):
            raise ValueError(
                f"max_text_length={self.max_text_length} exceeds text.max_position_embeddings="
                f"{self.text.get('max_position_embeddings', 77)}"
            )

    # ------------------------------------------------------------------ derived sizes
    @property
    def latent_channels(self) -> int:
        """Channels of one latent: the VAE's ``latent_channels`` or ``3 * unshuffle_factor ** 2``."""
        if self.codec == "vae":
            return int(self.vae.get("latent_channels", 4))
        return 3 * self.unshuffle_factor**2

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along a side (``2 ** (len(vae.block_out_channels) - 1)`` for a VAE)."""
        if self.codec == "vae":
            return 2 ** (len(self.vae.get("block_out_channels", (64,))) - 1)
        return self.unshuffle_factor

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downscale

    def unet_kwargs(self) -> dict[str, Any]:
        """``UNet2DConditionModel`` arguments with the InstructPix2Pix input width (noisy + conditioning)."""
        return {
            **self.unet,
            "in_channels": 2 * self.latent_channels,
            "out_channels": self.latent_channels,
            "sample_size": self.latent_size,
        }

    def text_kwargs(self) -> dict[str, Any]:
        """``CLIPTextConfig`` arguments (CLIP's special ids unless ``text`` sets them)."""
        return {"bos_token_id": CLIP_BOS_ID, "eos_token_id": CLIP_EOS_ID, "pad_token_id": 1, **self.text}

    def scheduler_kwargs(self) -> dict[str, Any]:
        """Noise schedule with this config's ``prediction_type``."""
        return {**self.scheduler, "prediction_type": self.prediction_type}

    def to_json_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> Pix2PixConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Pix2PixConfig keys {unknown}; expected some of {sorted(known)}")
        return cls(**copy.deepcopy(data))


# ---------------------------------------------------------------------------------------------- presets
def tiny_shapes(**overrides: Any) -> Pix2PixConfig:
    """The embedded world's editor (issue 12's feasibility run): 32 px RGB through ``pixel_unshuffle`` x4
    (48 x 8 x 8 latents, in 96 / out 48 channels), UNet blocks 32 / 64 with cross-attention at 4 x 4 (about
    1.0M parameters), a 2-layer CLIP text encoder of width 64, x0 predicted as a residual on the source."""
    config = {
        "unet": {
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "cross_attention_dim": 64,
            "attention_head_dim": 8,
            "norm_num_groups": 16,
        },
        "text": {
            "vocab_size": CLIP_VOCAB_SIZE,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 32,
            "hidden_act": "quick_gelu",
        },
        "codec": "pixel_unshuffle",
        "unshuffle_factor": 4,
        "image_size": 32,
        "prediction_type": "sample",
        "residual": True,
        "scheduler": {
            "num_train_timesteps": 1000,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "clip_sample": False,
        },
        "max_text_length": 32,
    }
    config.update(overrides)
    return Pix2PixConfig(**config)


def instruct_pix2pix_sd15(**overrides: Any) -> Pix2PixConfig:
    """The released InstructPix2Pix sizes (timbrooks/instruct-pix2pix, Stable Diffusion 1.5): UNet blocks
    320 / 640 / 1280 / 1280 with 8 in / 4 out channels, CLIP ViT-L/14 text encoder (width 768, 12 layers),
    the SD VAE (4 latent channels, x8 down, scaling factor 0.18215), epsilon prediction."""
    config = {
        "unet": {
            "down_block_types": [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        "text": {
            "vocab_size": CLIP_VOCAB_SIZE,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        },
        "codec": "vae",
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "sample_size": 512,
            "scaling_factor": 0.18215,
        },
        "image_size": 512,
        "prediction_type": "epsilon",
        "residual": False,
        "scheduler": {
            "num_train_timesteps": 1000,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "clip_sample": False,
        },
        "max_text_length": 77,
    }
    config.update(overrides)
    return Pix2PixConfig(**config)


REGISTRY: dict[str, Callable[..., Pix2PixConfig]] = {
    "tiny-pix2pix-shapes": tiny_shapes,
    "instruct-pix2pix-sd15": instruct_pix2pix_sd15,
}


def pix2pix_config(name: str, **overrides: Any) -> Pix2PixConfig:
    """The registered config ``name`` (``tiny-pix2pix-shapes``, ``instruct-pix2pix-sd15``) with ``overrides``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown pix2pix architecture {name!r}; expected one of {sorted(REGISTRY)}")
    return REGISTRY[name](**overrides)
