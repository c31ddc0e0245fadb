"""The InstructPix2Pix training objective, framework-free (the Lightning module only calls it).

As in diffusers' ``examples/instruct_pix2pix/train_instruct_pix2pix.py``: the edited image's latent
``z = E(edited) * scaling_factor`` (a posterior draw for a VAE) is noised at ``t ~ U{0..T-1}``,
``z_t = add_noise(z, eps, t)``; the UNet sees ``z_t ++ E(source)`` (the source's unscaled posterior mode) and the
instruction's text states, and the loss is ``MSE(prediction, target)`` with the target the noise
(``epsilon``), the velocity (``v_prediction``) or ``z`` itself (``sample``; with ``residual`` the prediction is
``E(source) + UNet output``, :meth:`Pix2PixModel.predict`).

Conditioning dropout (the example's ``conditioning_dropout_prob`` p; one draw ``r ~ U(0, 1)`` per sample) makes
the model usable with dual classifier-free guidance: ``r < p`` drops the text (empty prompt's states),
``p <= r < 2p`` drops text and image, ``2p <= r < 3p`` drops the image (zero conditioning latent).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from model_families.pix2pix.codec import VaeCodec
from model_families.pix2pix.modeling import Pix2PixModel


def check_conditioning_dropout_prob(p: float) -> float:
    """``p`` when it is in [0, 1/3] (text alone, both and image alone are three disjoint cases of p each);
    otherwise a ``ValueError`` naming ``conditioning_dropout_prob``."""
    if not 0 <= p <= 1 / 3:
        raise ValueError(
            f"conditioning_dropout_prob={p} must be in [0, 1/3] (three disjoint cases of p each)"
        )
    return p


def conditioning_dropout(
    batch: int, p: float, generator: torch.Generator | None = None, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks ``(drop_text, drop_image)`` of length ``batch``: text alone, both and image alone are
    each dropped with probability ``p`` (the example's ``r < 2p`` / ``p <= r < 3p`` rule)."""
    check_conditioning_dropout_prob(p)
    r = torch.rand(batch, generator=generator).to(device)
    return r < 2 * p, (r >= p) & (r < 3 * p)


def instruct_pix2pix_loss(
    model: Pix2PixModel,
    source: torch.Tensor,
    edited: torch.Tensor,
    input_ids: torch.Tensor,
    conditioning_dropout_prob: float = 0.05,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean squared error of the model's prediction for one batch (images B x 3 x H x W in [0, 1], token ids
    B x L); ``generator`` (CPU) fixes timesteps, noise and dropout, e.g. for a validation loss."""
    device = model.unet.device
    bsz = source.shape[0]
    scheduler = model.noise_scheduler
    codec = model.codec
    edited = edited.to(device) * 2 - 1
    if isinstance(codec, VaeCodec):
        latents = codec.sample_latent(edited, generator) * codec.scaling_factor
    else:
        latents = codec.encode(edited) * codec.scaling_factor
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), generator=generator).to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    text = model.encode_text(input_ids)
    condition = model.image_latents(source.to(device))
    if conditioning_dropout_prob > 0:
        drop_text, drop_image = conditioning_dropout(bsz, conditioning_dropout_prob, generator, device)
        empty = model.encode_prompts([""])
        text = torch.where(drop_text.view(bsz, 1, 1), empty, text)
        condition = condition * (~drop_image).to(condition.dtype).view(bsz, 1, 1, 1)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = latents
    prediction = model.predict(noisy, timesteps, condition, text)
    return F.mse_loss(prediction.float(), target.float())
