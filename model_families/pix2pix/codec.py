"""Latent codecs: what maps images to the latents the UNet denoises and back.

Both codecs take images in [-1, 1] (diffusers' ``VaeImageProcessor`` convention) and share the interface the
sampler and the training step need, mirroring how ``StableDiffusionInstructPix2PixPipeline`` and
``train_instruct_pix2pix.py`` use an ``AutoencoderKL``:

- ``encode(images)``: the *unscaled* latent (the VAE's ``latent_dist.mode()``), the conditioning input;
- ``decode(latents)``: images from unscaled latents;
- ``scaling_factor``: diffusion runs on ``encode(x) * scaling_factor`` (the VAE's ``config.scaling_factor``);
- ``latent_channels`` and ``downscale`` (pixels per latent cell along a side).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn
from torch.nn import functional as F


class PixelUnshuffleCodec(nn.Module):
    """Lossless space-to-depth codec (``F.pixel_unshuffle``): B x 3 x H x W -> B x 3r^2 x H/r x W/r.

    No weights; ``decode(encode(x)) == x`` exactly. With r = 4, 32 px RGB becomes a 48 x 8 x 8 latent, which
    keeps the UNet in the embedded world about 20x cheaper than in pixel space (issue 12's feasibility note).
    """

    def __init__(self, factor: int = 4, channels: int = 3) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"unshuffle factor must be >= 1, got {factor}")
        self.factor = factor
        self.channels = channels

    @property
    def scaling_factor(self) -> float:
        return 1.0

    @property
    def latent_channels(self) -> int:
        return self.channels * self.factor**2

    @property
    def downscale(self) -> int:
        return self.factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.channels or images.shape[-1] % self.factor:
            raise ValueError(
                f"expected images B x {self.channels} x H x W with H, W multiples of {self.factor}, "
                f"got {tuple(images.shape)}"
            )
        return F.pixel_unshuffle(images, self.factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected latents B x {self.latent_channels} x h x w, got {tuple(latents.shape)}"
            )
        return F.pixel_shuffle(latents, self.factor)


class VaeCodec(nn.Module):
    """An ``AutoencoderKL`` behind the codec interface (``encode`` is the posterior's mode, as the pipeline's
    ``prepare_image_latents`` and the training script's ``original_image_embeds``)."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mode()

    def sample_latent(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw of the posterior (the training script encodes the *edited* image with ``sample()``)."""
        return self.vae.encode(images).latent_dist.sample(generator)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]
