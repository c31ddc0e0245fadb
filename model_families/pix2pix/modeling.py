"""The InstructPix2Pix editor as one ``nn.Module``: UNet, text encoder and latent codec, with the tokenizer and
the training noise schedule beside them.

:meth:`Pix2PixModel.predict` is the one place where the network's output becomes the scheduler's model output
(with ``residual``: ``x0 = conditioning latent + UNet output``); training and sampling both call it, so they
can never disagree about what the network predicts.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from model_families.pix2pix.codec import PixelUnshuffleCodec, VaeCodec
from model_families.pix2pix.config import Pix2PixConfig

SAMPLERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "ddpm": DDPMScheduler,
}
# schedulers whose ``step`` accepts prediction_type="sample" (Euler-ancestral raises NotImplementedError)
_SAMPLE_PREDICTION = ("ddim", "euler", "ddpm")


def build_codec(config: Pix2PixConfig) -> PixelUnshuffleCodec | VaeCodec:
    """The codec ``config`` names, freshly initialised (a VAE gets random weights)."""
    if config.codec == "pixel_unshuffle":
        return PixelUnshuffleCodec(config.unshuffle_factor)
    return VaeCodec(AutoencoderKL(**config.vae))


def sampling_scheduler(kind: str, noise_scheduler: SchedulerMixin) -> SchedulerMixin:
    """A sampling scheduler (``ddim``, ``euler_ancestral``, ``euler``, ``ddpm``) on the training noise schedule."""
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}; expected one of {sorted(SAMPLERS)}")
    prediction = noise_scheduler.config.prediction_type
    if prediction == "sample" and kind not in _SAMPLE_PREDICTION:
        raise ValueError(
            f"sampler {kind!r} cannot step on x0 predictions (prediction_type='sample', e.g. residual=True); "
            f"use one of {list(_SAMPLE_PREDICTION)}"
        )
    return SAMPLERS[kind].from_config(noise_scheduler.config)


class Pix2PixModel(nn.Module):
    """UNet (noisy target latent ++ conditioning latent on channels; text by cross-attention), CLIP text
    encoder and codec.

    Args:
        config: the architecture (:class:`Pix2PixConfig`).
        tokenizer: a ``CLIPTokenizer`` padding to ``config.max_text_length``
            (:func:`model_families.pix2pix.tokenizer.build_clip_tokenizer` offline).
        unet / text_encoder / codec / noise_scheduler: existing components (a loaded snapshot); built from
            ``config`` with random weights when omitted.
    """

    def __init__(
        self,
        config: Pix2PixConfig,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel | None = None,
        text_encoder: CLIPTextModel | None = None,
        codec: PixelUnshuffleCodec | VaeCodec | None = None,
        noise_scheduler: DDPMScheduler | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.unet = unet if unet is not None else UNet2DConditionModel(**config.unet_kwargs())
        self.text_encoder = (
            text_encoder
            if text_encoder is not None
            else CLIPTextModel(CLIPTextConfig(**config.text_kwargs()))
        )
        self.codec = codec if codec is not None else build_codec(config)
        self.noise_scheduler = (
            noise_scheduler if noise_scheduler is not None else DDPMScheduler(**config.scheduler_kwargs())
        )
        self._check_consistent()

    def _check_consistent(self) -> None:
        expected = 2 * self.codec.latent_channels
        if (
            self.unet.config.in_channels != expected
            or self.unet.config.out_channels != self.codec.latent_channels
        ):
            raise ValueError(
                f"the UNet takes {self.unet.config.in_channels} channels in / {self.unet.config.out_channels} out; "
                f"InstructPix2Pix with {self.codec.latent_channels} latent channels needs {expected} in "
                f"(noisy ++ conditioning) / {self.codec.latent_channels} out"
            )
        if self.text_encoder.config.hidden_size != self.unet.config.cross_attention_dim:
            raise ValueError(
                f"text encoder width {self.text_encoder.config.hidden_size} != UNet cross_attention_dim "
                f"{self.unet.config.cross_attention_dim}"
            )
        if self.noise_scheduler.config.prediction_type != self.config.prediction_type:
            raise ValueError(
                f"noise scheduler predicts {self.noise_scheduler.config.prediction_type!r}, config says "
                f"{self.config.prediction_type!r}"
            )

    @property
    def residual(self) -> bool:
        return self.config.residual

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids B x max_text_length, padded and truncated as the pipeline's ``_encode_prompt`` does."""
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.config.max_text_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(self.unet.device)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Cross-attention states: the text encoder's last hidden state (B x L x width), no attention mask
        (as Stable Diffusion, whose CLIP config has no ``use_attention_mask``)."""
        return self.text_encoder(input_ids.to(self.text_encoder.device))[0]

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_text(self.tokenize(prompts))

    def predict(
        self,
        model_input: torch.Tensor,
        timestep: torch.Tensor | int,
        condition_latents: torch.Tensor,
        text_states: torch.Tensor,
        **unet_kwargs: Any,
    ) -> torch.Tensor:
        """The scheduler's model output for ``model_input`` (already ``scale_model_input``-ed).

        UNet(``model_input`` ++ ``condition_latents``, t, text); with ``residual`` the output is added to
        the conditioning latent (zeros where the image condition is dropped), i.e. x0 = source + UNet output.
        """
        sample = torch.cat([model_input, condition_latents], dim=1)
        out = self.unet(
            sample, timestep, encoder_hidden_states=text_states, return_dict=False, **unet_kwargs
        )[0]
        return condition_latents * self.codec.scaling_factor + out if self.residual else out

    def image_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Unscaled conditioning latents of images in [0, 1] (mapped to [-1, 1] first, as ``VaeImageProcessor``)."""
        return self.codec.encode(images * 2 - 1)

    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from *scaled* diffusion latents (the pipeline's decode and postprocess)."""
        return (self.codec.decode(latents / self.codec.scaling_factor) / 2 + 0.5).clamp(0, 1)
