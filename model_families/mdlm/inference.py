"""Batched response generation for LLaDA-V-style models: prompts in, decoded answers out.

:func:`generate_responses` wraps :func:`model_families.mdlm.diffusion.generate` (low-confidence remasking) for a
batch of left-padded prompts with one image each; extra keyword arguments reach the model at every step, e.g.
``vision_token_mask`` / ``vision_token_drop`` for DiSP's inference-time masking. Training and evaluation use
the same :class:`GenerationConfig`, so generation lengths match the SFT response length.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from model_families.mdlm.diffusion import check_sampler_settings, generate
from model_families.mdlm.prompt import decode_response


@dataclass(frozen=True)
class GenerationConfig:
    """Sampler settings (LLaDA's ``generate``).

    Args:
        gen_length: mask tokens appended after the prompt (the response budget).
        block_length: semi-autoregressive block size; ``gen_length`` must be a multiple of it.
        steps: denoising steps over all blocks (a multiple of the number of blocks).
        temperature: 0 for greedy (argmax) decoding, > 0 for Gumbel sampling.
        remasking: ``low_confidence`` or ``random``.
        cfg_scale: classifier-free guidance scale (0: off).
        cache: KV caching across the steps of a block: ``none`` (exact, LLaDA's algorithm), ``prefix`` (prompt,
            image and committed blocks cached at each block's first step) or ``dual`` (the not-yet-generated
            suffix cached too); see :func:`model_families.mdlm.diffusion.generate`.
        threshold: confidence-threshold parallel decoding (None: off): each step commits every masked token
            of the block with confidence above it (at least one); ``steps`` then no longer applies.
    """

    gen_length: int = 8
    block_length: int = 8
    steps: int = 4
    temperature: float = 0.0
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0
    cache: str = "none"
    threshold: float | None = None

    def __post_init__(self) -> None:
        check_sampler_settings(
            self.gen_length,
            self.block_length,
            self.steps,
            self.temperature,
            self.remasking,
            self.cache,
            self.threshold,
            key="generation ",
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> GenerationConfig:
        """Build from a config dict; unknown keys raise ``ValueError`` naming them."""
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown generation keys {sorted(unknown)}; expected some of {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def first_step_input(prompt_ids: torch.Tensor, gen_length: int, mask_id: int) -> torch.Tensor:
    """The sequence at the first generation step: prompts (B, P) followed by ``gen_length`` mask tokens."""
    masks = torch.full(
        (prompt_ids.shape[0], gen_length), mask_id, dtype=prompt_ids.dtype, device=prompt_ids.device
    )
    return torch.cat([prompt_ids, masks], dim=1)


def extend_attention_mask(prompt_mask: torch.Tensor | None, gen_length: int) -> torch.Tensor | None:
    """Prompt attention mask (B, P) extended with ones over the generated positions."""
    if prompt_mask is None:
        return None
    ones = torch.ones(prompt_mask.shape[0], gen_length, dtype=prompt_mask.dtype, device=prompt_mask.device)
    return torch.cat([prompt_mask, ones], dim=1)


def suppressed_token_ids(config: Any) -> tuple[int, ...]:
    """Ids a response must never contain: the mask id, the image placeholder, padding, BOS and the header
    ids, each when the config has it. The ids that end a response (``eos_token_id``, ``eot_token_id``; the
    SFT data pads responses with EOS) stay allowed, also when padding shares the EOS id as in LLaDA.

    The tiny world's image placeholder is an ordinary vocabulary id, so sampling could write it into a
    response, and the next denoising step would then find two placeholders and raise.
    """
    names = (
        "mask_token_id",
        "image_token_index",
        "pad_token_id",
        "bos_token_id",
        "start_header_id",
        "end_header_id",
    )
    ends = {config.eos_token_id, config.eot_token_id}
    ids = {getattr(config, name, None) for name in names}
    return tuple(sorted(i for i in ids if i is not None and i not in ends))


@torch.no_grad()
def generate_ids(
    model: Any,
    prompt_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    config: GenerationConfig,
    prompt_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """Generated response ids (B, gen_length) for left-padded prompts (B, P) and their images.

    The ids of :func:`suppressed_token_ids` are never generated; ``generator`` seeds the sampling
    (``temperature > 0``) and ``random`` remasking.

    The images are encoded once (vision tower and projector) and the projected tokens reach every denoising
    step as ``vision_token_override``; ``vision_token_mask`` / ``vision_token_drop`` in ``model_kwargs``
    still apply on top at every step. The tokens are those of encoding the images at every step.
    """
    mask_id = model.config.mask_token_id
    kwargs = dict(model_kwargs)
    if pixel_values is not None and kwargs.get("vision_token_override") is None:
        if pixel_values.shape[0] != prompt_ids.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images for {prompt_ids.shape[0]} prompts")
        kwargs["vision_token_override"] = model.encode_images(pixel_values)
    unconditional = None
    if config.cfg_scale > 0:
        # Unconditional pass: prompt text masked, image placeholder kept but the image tokens masked too.
        unconditional = dict(kwargs)
        if kwargs.get("vision_token_override") is not None:
            count = model.config.num_vision_tokens
            unconditional["vision_token_mask"] = torch.ones(
                prompt_ids.shape[0], count, dtype=torch.bool, device=prompt_ids.device
            )
    out = generate(
        model,
        prompt_ids,
        mask_id,
        gen_length=config.gen_length,
        block_length=config.block_length,
        steps=config.steps,
        temperature=config.temperature,
        remasking=config.remasking,
        cfg_scale=config.cfg_scale,
        generator=generator,
        attention_mask=prompt_mask,
        cfg_keep_ids=(model.config.image_token_index,),
        unconditional_kwargs=unconditional,
        suppress_ids=suppressed_token_ids(model.config),
        cache=config.cache,
        threshold=config.threshold,
        **kwargs,
    )
    return out[:, prompt_ids.shape[1] :]


def stop_token_ids(model: Any) -> list[int]:
    """Ids that end a response: ``<|eot_id|>`` and ``<|endoftext|>``."""
    return [model.config.eot_token_id, model.config.eos_token_id]


def decode_responses(tokenizer: Any, ids: torch.Tensor, stop_ids: list[int]) -> list[str]:
    """Decoded responses of (B, G) generated ids, each cut at its first stop id."""
    return [decode_response(tokenizer, row, stop_ids) for row in ids.cpu()]


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompt_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    config: GenerationConfig,
    prompt_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    **model_kwargs: Any,
) -> list[str]:
    """Decoded responses for a batch of prompts (see :func:`generate_ids`)."""
    ids = generate_ids(model, prompt_ids, pixel_values, config, prompt_mask, generator, **model_kwargs)
    return decode_responses(tokenizer, ids, stop_token_ids(model))
