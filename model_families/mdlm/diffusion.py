"""Masked diffusion objective (LLaDA SFT) and low-confidence remasking generation (LLaDA ``generate.py``).

Loss, for a batch of B sequences with response masks::

    t_b ~ U(0, 1),   p_b = (1 - eps) t_b + eps
    mask every response token of b independently with probability p_b
    L = (1 / B) * sum_b sum_{i masked in b} CE(logits_{b,i}, y_{b,i}) / (p_b * L_b)

with L_b the number of response tokens of b (EOS padding included). Generation appends ``gen_length`` mask
tokens, splits them into blocks and, within a block, commits the most confident predictions step by step.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

REMASKING = ("low_confidence", "random")
CACHES = ("none", "prefix", "dual")


@dataclass
class ForwardMask:
    """Noised batch: ``noisy_ids`` (B, L), ``masked`` (B, L) bool, ``p`` (B,) masking probabilities."""

    noisy_ids: torch.Tensor
    masked: torch.Tensor
    p: torch.Tensor


def forward_mask(
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
) -> ForwardMask:
    """Forward process of LLaDA SFT: ``p_b = (1 - eps) t_b + eps`` with ``t_b ~ U(0, 1)``, then each response
    token is replaced by ``mask_token_id`` with probability ``p_b``; prompt tokens are never masked."""
    if input_ids.shape != response_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and response_mask {tuple(response_mask.shape)} differ"
        )
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    batch, length = input_ids.shape
    device = input_ids.device
    t = torch.rand(batch, generator=generator, device=device)
    p = (1.0 - eps) * t + eps
    masked = (
        torch.rand(batch, length, generator=generator, device=device) < p[:, None]
    ) & response_mask.bool()
    noisy_ids = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return ForwardMask(noisy_ids, masked, p)


def masked_diffusion_loss_from_logits(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    masked: torch.Tensor,
    p: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """``(1/B) sum_b sum_{i in masked_b} CE(logits_{b,i}, input_ids_{b,i}) / (p_b * L_b)``.

    Shapes: logits (B, L, V), input_ids / masked / response_mask (B, L), p (B,). Returns a scalar (float32).
    """
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
    batch = input_ids.shape[0]
    response_len = response_mask.sum(dim=1).clamp(min=1).to(torch.float32)
    weight = 1.0 / (p.to(torch.float32) * response_len)  # (B,)
    rows = masked.nonzero(as_tuple=True)[0]
    token_ce = F.cross_entropy(logits[masked].float(), input_ids[masked], reduction="none")
    return (token_ce * weight[rows]).sum() / batch


def masked_diffusion_loss(
    logits_fn: Callable[..., Any],
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
    **model_kwargs: Any,
) -> torch.Tensor:
    """LLaDA SFT loss: noise with :func:`forward_mask`, run ``logits_fn(noisy_ids, **model_kwargs)`` (a tensor
    (B, L, V) or an output with ``.logits``), then :func:`masked_diffusion_loss_from_logits`."""
    noise = forward_mask(input_ids, response_mask, mask_token_id, generator=generator, eps=eps)
    logits = _as_logits(logits_fn(noise.noisy_ids, **model_kwargs))
    return masked_diffusion_loss_from_logits(logits, input_ids, noise.masked, noise.p, response_mask)


# ---------------------------------------------------------------------------------------------- generation
def _as_logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def _uniform(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """U[0, 1) of ``shape`` on ``device``: from ``generator`` (drawn on its own device, then moved, so a CPU
    generator seeds a CUDA run) or, without one, from the global generator of ``device`` as LLaDA does."""
    if generator is None:
        return torch.rand(shape, dtype=dtype, device=device)
    return torch.rand(shape, generator=generator, dtype=dtype, device=generator.device).to(device)


def add_gumbel_noise(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gumbel-max scores ``exp(logits) / (-log u)^temperature`` in float64 (as LLaDA; low precision hurts
    sampling quality). ``argmax`` of the result samples from ``softmax(logits / temperature)``.

    ``u`` is one float64 draw of the logits' shape, as LLaDA's ``torch.rand_like(logits, dtype=float64)``;
    at temperature 0 nothing is drawn and the logits are returned (LLaDA's earlier ``generate.py``; its later
    one draws and discards the noise, which leaves the greedy result unchanged).
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = _uniform(tuple(logits.shape), torch.float64, logits.device, generator)
    return logits.exp() / (-torch.log(noise)) ** temperature


def num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit per step, (B, steps): the masked count split evenly, remainder to the earliest steps."""
    count = mask_index.sum(dim=1, keepdim=True)
    base, remainder = count // steps, count % steps
    step = torch.arange(steps, device=mask_index.device)[None, :]
    return base + (step < remainder).long()


def check_sampler_settings(
    gen_length: int,
    block_length: int,
    steps: int,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    cache: str = "none",
    threshold: float | None = None,
    *,
    key: str = "",
) -> int:
    """Check the sampler's settings (``key`` prefixes each name in the messages, e.g. ``"generation "`` for a
    config); returns the number of blocks. One check for :func:`generate` and ``GenerationConfig``."""
    if gen_length <= 0 or block_length <= 0 or steps <= 0:
        raise ValueError(
            f"{key}gen_length={gen_length}, block_length={block_length}, steps={steps} must be positive"
        )
    if gen_length % block_length:
        raise ValueError(f"{key}gen_length={gen_length} is not divisible by block_length={block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"{key}steps={steps} is not divisible by the number of blocks {num_blocks}")
    if remasking not in REMASKING:
        raise ValueError(f"{key}remasking={remasking!r}; expected one of {REMASKING}")
    if temperature < 0:
        raise ValueError(f"{key}temperature must be >= 0, got {temperature}")
    if cache not in CACHES:
        raise ValueError(f"{key}cache={cache!r}; expected one of {CACHES}")
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"{key}threshold={threshold} must be in [0, 1] (or None/null: off)")
        if remasking != "low_confidence":
            raise ValueError(
                f"{key}threshold needs remasking='low_confidence' (confidences), got {remasking!r}"
            )
    return num_blocks


def _above_threshold(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Commit mask (B, W): confidences above ``threshold``, and each row's best one (rows with a candidate)."""
    transfer = confidence > threshold
    best = confidence.argmax(dim=1, keepdim=True)
    has_candidate = torch.isfinite(confidence).any(dim=1, keepdim=True)
    return transfer | (torch.zeros_like(transfer).scatter(1, best, True) & has_candidate)


class _Denoiser:
    """One pass (conditional or unconditional) of the sampler: the logits of the window of token positions
    the sampler updates at one step, and the window's first position.

    ``cache="none"``: ``model_fn(x, **kwargs)`` over the whole sequence at every step (window = all of x).
    ``"prefix"`` / ``"dual"``: ``model_fn.block_logits(x, start, end, cache, state, **kwargs)`` gives the
    current block's logits; ``state`` (the model's KV cache) is rebuilt at the block's first step and reused
    at its later steps.
    """

    def __init__(self, model_fn: Callable[..., Any], cache: str, kwargs: dict[str, Any]) -> None:
        if cache != "none" and not callable(getattr(model_fn, "block_logits", None)):
            raise ValueError(f"cache={cache!r} needs a model with a block_logits method; use cache='none'")
        self.model_fn, self.cache, self.kwargs, self.state = model_fn, cache, kwargs, None

    def __call__(self, x: torch.Tensor, start: int, end: int, first_step: bool) -> tuple[torch.Tensor, int]:
        if self.cache == "none":
            return _as_logits(self.model_fn(x, **self.kwargs)), 0
        if first_step:
            self.state = None
        logits, self.state = self.model_fn.block_logits(x, start, end, self.cache, self.state, **self.kwargs)
        return logits, start


@torch.no_grad()
def generate(
    model_fn: Callable[..., Any],
    prompt_ids: torch.Tensor,
    mask_id: int,
    gen_length: int = 128,
    block_length: int = 128,
    steps: int = 128,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    cfg_keep_ids: tuple[int, ...] = (),
    unconditional_kwargs: dict[str, Any] | None = None,
    suppress_ids: tuple[int, ...] = (),
    cache: str = "none",
    threshold: float | None = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """Semi-autoregressive masked diffusion sampling with low-confidence (or random) remasking (LLaDA).

    ``gen_length`` mask tokens are appended to the prompts and split into ``gen_length / block_length`` blocks;
    each block gets ``steps / num_blocks`` steps. At each step ``model_fn(x, **model_kwargs)`` gives logits
    (B, L, V); x0 = argmax (of Gumbel-perturbed scores when ``temperature > 0``); confidence = softmax
    probability of x0 (``low_confidence``) or uniform noise (``random``), -inf beyond the current block and on
    committed tokens; the k most confident masked positions are committed, k spreading the block's masked
    count evenly over its steps (remainder to the earliest steps).

    Classifier-free guidance (``cfg_scale > 0``): a second pass with every prompt token masked (except ids in
    ``cfg_keep_ids``, e.g. the image placeholder, which can be masked through ``unconditional_kwargs``), then
    ``logits = u + (s + 1)(c - u)``. ``unconditional_kwargs`` replaces ``model_kwargs`` for that pass.

    Never generated: ``mask_id`` and the ids in ``suppress_ids`` (e.g. the image placeholder, padding, BOS and
    header ids; never the EOS / eot ids that end a response). Their scores are set to -inf *after* the Gumbel
    noise, so x0 is the best (or sampled) allowed token while the noise stream and the confidences (the
    model's own softmax) stay LLaDA's: the result differs from LLaDA's only where it would have committed a
    forbidden id. At ``temperature > 0`` this samples from the softmax renormalised over the allowed ids.

    Randomness (``temperature > 0`` or ``random`` remasking) comes from ``generator`` in LLaDA's order and
    dtypes: per step one float64 Gumbel draw of shape (B, L, V), then for ``random`` one float32 (B, L)
    draw, so an equally seeded generator gives LLaDA's stream.

    Batching: all prompts share one length. Prompts of different lengths are left-padded by the caller with
    ``attention_mask`` (B, P) = 0 on the padding; it is extended with ones and passed to ``model_fn`` as
    ``attention_mask`` (the model must then ignore padded keys and positions). Extra ``model_kwargs`` (e.g.
    ``pixel_values`` or vision-token overrides) are passed through unchanged at every step.

    KV caching (``cache``, Fast-dLLM's approximations; ``model_fn`` must then have ``block_logits``, as
    :class:`~model_families.mdlm.modeling.LladaVModel`): ``"none"`` is the algorithm above, exactly.
    ``"prefix"``: at a block's first step the whole sequence is run and the K/V of the prefix (prompt, image,
    committed blocks) kept; later steps of the block run only the block and the suffix after it. ``"dual"``:
    the suffix's K/V are kept too, later steps run only the block. A block's first step is exact; its later
    steps see the cached positions as they were at its first step. With a cache the sampler only scores the
    current block, so the Gumbel draw is (B, block_length, V) and the ``random`` draw (B, block_length): a
    sampled run's stream differs from ``"none"``'s, a greedy one matches it whenever the logits do.

    Confidence-threshold parallel decoding (``threshold``, Fast-dLLM; ``low_confidence`` only): at each step
    every masked token of the current block whose confidence exceeds ``threshold`` is committed, and at least
    the most confident one; the per-step counts (and ``steps``) no longer apply, a block ends as soon as it is
    filled (at most ``block_length`` steps). ``threshold=1`` commits one token per step.

    Returns the (B, P + gen_length) token ids.
    """
    num_blocks = check_sampler_settings(
        gen_length, block_length, steps, temperature, remasking, cache, threshold
    )
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be (B, P), got shape {tuple(prompt_ids.shape)}")
    steps_per_block = steps // num_blocks
    batch, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :prompt_len] = prompt_ids
    if attention_mask is not None:
        if attention_mask.shape != prompt_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must match prompt_ids {tuple(prompt_ids.shape)}"
            )
        ones = torch.ones(batch, gen_length, dtype=attention_mask.dtype, device=device)
        model_kwargs["attention_mask"] = torch.cat([attention_mask, ones], dim=1)
    uncond_kwargs = dict(model_kwargs if unconditional_kwargs is None else unconditional_kwargs)
    if attention_mask is not None:
        uncond_kwargs.setdefault("attention_mask", model_kwargs["attention_mask"])
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[:, :prompt_len] = True
    if cfg_keep_ids:
        prompt_index &= ~torch.isin(x, torch.tensor(cfg_keep_ids, device=device))
    positions = torch.arange(x.shape[1], device=device)
    forbidden = torch.tensor(sorted({mask_id, *suppress_ids}), dtype=torch.long, device=device)
    conditional = _Denoiser(model_fn, cache, model_kwargs)
    unconditional = _Denoiser(model_fn, cache, uncond_kwargs) if cfg_scale > 0 else None

    for block in range(num_blocks):
        start = prompt_len + block * block_length
        end = start + block_length
        transfer_counts = num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        for step in itertools.count():
            if threshold is None and step == steps_per_block:
                break
            if threshold is not None and not bool((x[:, start:end] == mask_id).any()):
                break
            # The logits cover the window [lo, hi): all of x without a cache, the current block with one.
            logits, lo = conditional(x, start, end, step == 0)
            if unconditional is not None:
                un_x = torch.where(prompt_index, torch.full_like(x, mask_id), x)
                un_logits, _ = unconditional(un_x, start, end, step == 0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            hi = lo + logits.shape[1]
            window, window_positions = x[:, lo:hi], positions[lo:hi]
            mask_index = (window == mask_id) & (window_positions >= prompt_len)
            scores = add_gumbel_noise(logits, temperature, generator)
            # Ids outside the vocabulary (LLaVA's image placeholder -200) cannot be generated anyway.
            in_vocab = forbidden[(forbidden >= 0) & (forbidden < scores.shape[-1])]
            scores = scores.index_fill(-1, in_vocab, -torch.inf)
            x0 = scores.argmax(dim=-1)
            if remasking == "low_confidence":
                probs = F.softmax(logits.to(torch.float64), dim=-1)
                x0_p = probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
            else:
                # float32, as LLaDA's torch.rand((B, L)): the same seed gives the same stream.
                x0_p = _uniform(tuple(x0.shape), torch.float32, device, generator)
            x0_p = x0_p.masked_fill(window_positions >= end, -torch.inf)
            x0 = torch.where(mask_index, x0, window)
            confidence = torch.where(mask_index, x0_p, torch.full_like(x0_p, -torch.inf))
            if threshold is None:
                transfer = torch.zeros_like(mask_index)
                for row in range(batch):
                    k = int(transfer_counts[row, step])
                    if k:
                        transfer[row, confidence[row].topk(k).indices] = True
            else:
                transfer = _above_threshold(confidence, threshold)
            x = torch.cat([x[:, :lo], torch.where(transfer, x0, window), x[:, hi:]], dim=1)
    return x
