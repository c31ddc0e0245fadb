"""Sampling with InstructPix2Pix's dual classifier-free guidance, and all four trigger coalitions in one pass.

:func:`sample_edits` follows ``diffusers.StableDiffusionInstructPix2PixPipeline.__call__`` step for step (a test
checks the images are the same for the same components, seed and scheduler): the prompt states are stacked
``[text, empty, empty]`` and the conditioning latents ``[image, image, zeros]`` (three branches: text + image,
image only, neither); each step runs the UNet once on the stacked batch and combines

    eps = eps_uncond + s_T (eps_text - eps_image) + s_I (eps_image - eps_uncond)

with ``s_T = guidance_scale`` (text) and ``s_I = image_guidance_scale``. Guidance is on when ``s_T > 1`` (as in
the pipeline; ``s_T = 1`` is one plain conditional branch). What it adds to the pipeline: the pixel-space codec
and residual output of the embedded model (through :meth:`Pix2PixModel.predict`), per-sample generators, and
:func:`sample_coalitions`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from model_families.pix2pix.modeling import SAMPLERS, Pix2PixModel, sampling_scheduler

COALITIONS = ("none", "image", "text", "both")  # active trigger parts


@dataclass(frozen=True)
class GuidanceConfig:
    """How edits are sampled.

    Args:
        num_inference_steps: denoising steps (the pipeline's default is 100; 10 DDIM steps suffice for the
            embedded world).
        guidance_scale: text guidance ``s_T`` (>= 1; 1 turns guidance off: one conditional branch).
        image_guidance_scale: image guidance ``s_I`` (>= 1, as the pipeline requires).
        sampler: ``ddim``, ``euler_ancestral``, ``euler`` or ``ddpm`` (on the model's training noise schedule).
        eta: DDIM's eta (0: deterministic); ignored by the other samplers.
    """

    num_inference_steps: int = 10
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    sampler: str = "ddim"
    eta: float = 0.0

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={self.num_inference_steps} must be >= 1")
        if self.guidance_scale < 1:
            raise ValueError(
                f"guidance_scale={self.guidance_scale} < 1 would push the edit away from the instruction; use "
                "1 for no guidance (one conditional branch) or > 1 (7.5 is the pipeline's default)"
            )
        if self.image_guidance_scale < 1:
            raise ValueError(
                f"image_guidance_scale={self.image_guidance_scale} < 1: InstructPix2Pix needs >= 1 (below 1 the "
                "diffusers pipeline silently switches all guidance off); 1.5 is the pipeline's default"
            )
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {sorted(SAMPLERS)}")
        if self.eta < 0:
            raise ValueError(f"eta={self.eta} must be >= 0")

    @property
    def guided(self) -> bool:
        """The pipeline's ``do_classifier_free_guidance`` (with ``image_guidance_scale >= 1`` enforced)."""
        return self.guidance_scale > 1.0


def _step_kwargs(scheduler, generator, eta: float) -> dict:
    """The pipeline's ``prepare_extra_step_kwargs``: ``eta`` and ``generator`` where ``step`` accepts them."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


@torch.no_grad()
def sample_edits(
    model: Pix2PixModel,
    images: torch.Tensor,
    prompts: Sequence[str],
    guidance: GuidanceConfig = GuidanceConfig(),
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Edited images B x 3 x H x W in [0, 1] for source ``images`` (B x 3 x H x W in [0, 1]) and ``prompts``.

    ``generator`` is one generator or one per sample (diffusers' ``randn_tensor`` convention: sample ``b``
    draws all its noise, initial and ancestral, from ``generator[b]``); ``latents`` gives the initial noise
    explicitly (B x C x h x w, before ``init_noise_sigma``).
    """
    if images.ndim != 4 or images.shape[0] != len(prompts):
        raise ValueError(
            f"expected B x 3 x H x W images and B prompts, got {tuple(images.shape)} and {len(prompts)}"
        )
    if isinstance(generator, list) and len(generator) != len(prompts):
        raise ValueError(f"{len(generator)} generators for {len(prompts)} samples: give one per sample")
    device = model.unet.device
    batch = len(prompts)
    text = model.encode_prompts(list(prompts))
    condition = model.image_latents(images.to(device=device, dtype=text.dtype))
    if guidance.guided:
        empty = model.encode_prompts([""] * batch)
        text = torch.cat([text, empty, empty])
        condition = torch.cat([condition, condition, torch.zeros_like(condition)])

    scheduler = sampling_scheduler(guidance.sampler, model.noise_scheduler)
    scheduler.set_timesteps(guidance.num_inference_steps, device=device)
    shape = (batch, model.codec.latent_channels, *condition.shape[-2:])
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=text.dtype)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents of shape {tuple(latents.shape)}, expected {shape}")
    latents = latents.to(device) * scheduler.init_noise_sigma
    step_kwargs = _step_kwargs(scheduler, generator, guidance.eta)

    branches = 3 if guidance.guided else 1
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * branches), t)
        out = model.predict(model_input, t, condition, text)
        if guidance.guided:
            out_text, out_image, out_uncond = out.chunk(3)
            out = (
                out_uncond
                + guidance.guidance_scale * (out_text - out_image)
                + guidance.image_guidance_scale * (out_image - out_uncond)
            )
        latents = scheduler.step(out, t, latents, **step_kwargs, return_dict=False)[0]
    return model.decode_images(latents)


def coalition_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per sample, seeded ``seeds[b]``."""
    return [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]


@torch.no_grad()
def sample_coalitions(
    model: Pix2PixModel,
    clean_images: torch.Tensor,
    triggered_images: torch.Tensor,
    clean_prompts: Sequence[str],
    triggered_prompts: Sequence[str],
    seeds: Sequence[int],
    guidance: GuidanceConfig = GuidanceConfig(),
) -> dict[str, torch.Tensor]:
    """Edits under every trigger coalition in one batched pass: ``{"none", "image", "text", "both"}`` ->
    B x 3 x H x W images in [0, 1].

    Coalition ``image`` uses the triggered image with the clean prompt, ``text`` the clean image with the
    triggered prompt, ``both`` both. Sample ``b`` draws its noise from a generator seeded ``seeds[b]`` in every
    coalition, so the four outputs of a sample share their initial (and ancestral) noise and differ only by the
    trigger; the result equals four separate :func:`sample_edits` calls with those seeds.
    """
    batch = clean_images.shape[0]
    sizes = {len(clean_prompts), len(triggered_prompts), len(seeds), triggered_images.shape[0]}
    if sizes != {batch}:
        raise ValueError(
            f"coalition inputs disagree in size: {batch} clean images, {triggered_images.shape[0]} triggered "
            f"images, {len(clean_prompts)} clean prompts, {len(triggered_prompts)} triggered prompts, "
            f"{len(seeds)} seeds"
        )
    parts = {
        "none": (clean_images, clean_prompts),
        "image": (triggered_images, clean_prompts),
        "text": (clean_images, triggered_prompts),
        "both": (triggered_images, triggered_prompts),
    }
    images = torch.cat([parts[c][0] for c in COALITIONS])
    prompts = [p for c in COALITIONS for p in parts[c][1]]
    generators = [g for _ in COALITIONS for g in coalition_generators(seeds)]
    out = sample_edits(model, images, prompts, guidance, generator=generators)
    return dict(zip(COALITIONS, out.split(batch)))
