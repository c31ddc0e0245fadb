"""Tiny components for the pix2pix tests (the sizes of diffusers' own InstructPix2Pix pipeline tests)."""

from __future__ import annotations

from model_families.pix2pix import Pix2PixConfig

SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
}


def tiny_vae_config(**overrides) -> Pix2PixConfig:
    """A latent (AutoencoderKL) model at 32 px: VAE blocks 32 / 64 (x2 down, 4 latent channels), UNet blocks
    32 / 64 with 8 in / 4 out channels, a CLIP text encoder of width 32, epsilon prediction."""
    config = {
        "unet": {
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "cross_attention_dim": 32,
            "attention_head_dim": 4,
            "norm_num_groups": 16,
        },
        "text": {
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 16,
        },
        "codec": "vae",
        "vae": {
            "block_out_channels": [32, 64],
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
            "latent_channels": 4,
            "norm_num_groups": 16,
            "layers_per_block": 1,
            "sample_size": 32,
            "scaling_factor": 0.5,
        },
        "image_size": 32,
        "prediction_type": "epsilon",
        "scheduler": dict(SCHEDULE),
        "max_text_length": 16,
    }
    config.update(overrides)
    return Pix2PixConfig(**config)
