"""LLaDA-V-style masked diffusion VLM built from transformers parts, with no remote code.

Layout (LLaVA-NeXT / LLaDA-V): SigLIP vision tower -> ``mlp2x_gelu`` projector -> LLaMA-architecture LM with
**bidirectional** attention (LLaDA) -> untied ``lm_head``.

* Vision features are the output of hidden layer ``mm_vision_select_layer`` (-2: penultimate), taken before the
  final layer norm. As in LLaVA, the tower is built truncated (later layers dropped, no pooling head), so the
  last kept layer's output *is* ``hidden_states[-2]`` of the full tower.
* Images are float tensors in [0, 1], ``B x C x H x W`` at ``config.image_size``; the model normalises them
  (SigLIP mean/std 0.5). One square crop per image. The released model uses ``anyres_max_4`` tiling with
  ``spatial_unpad``; that is a documented later option, not implemented here.
* ``use_image_newline``: the learned ``image_newline`` embedding is appended after every row of patch tokens
  (single-crop reading of LLaVA's newline). ``vision_positions`` only index patch tokens, never newlines.
* Each sequence holds exactly one image placeholder (``config.image_token_index``) when an image is given; it
  is replaced by the image's tokens. Outputs are by default aligned with ``input_ids`` (the placeholder row
  carries no meaningful logits) so the diffusion loss and the sampler work in token space.
* Bidirectional attention: the LM always receives an explicit 4D additive mask (zeros, ``-inf``-like on
  padded/dropped keys), which every transformers version passes through unchanged, and ``is_causal`` is
  switched off on the config and on every attention module (for SDPA/flash ``is_causal`` kernels).

Vision-token interventions (DiSP): ``vision_token_override`` replaces the projected patch embeddings (give a
tensor with ``requires_grad`` for saliency), ``vision_token_mask`` replaces chosen tokens by the mask token's
embedding, and ``vision_token_drop`` deletes chosen tokens: they are removed from attention and the position
ids of later tokens close the gap, which is exactly equivalent to cutting them out of the sequence.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, LlamaModel, SiglipVisionConfig, SiglipVisionModel

from model_families.mdlm.config import LladaVConfig


class SiglipTower(nn.Module):
    """SigLIP vision encoder truncated after the selected layer; returns that layer's output (B, N, D_v).

    ``vision_model`` holds the embeddings / encoder / post_layernorm (whatever transformers version), so the
    parameter names are ``vision_model.embeddings...`` as in LLaVA's ``SigLipVisionModel``. The post layer norm
    is kept (the released checkpoint stores it) but unused.
    """

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        model = SiglipVisionModel(config)
        self.vision_model = getattr(model, "vision_model", model)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_model.embeddings(pixel_values)
        return self.vision_model.encoder(inputs_embeds=hidden)[0]


@dataclass
class MultimodalEmbeddings:
    """Embedded sequence with the image spliced in.

    inputs_embeds (B, T, D); attention_mask (B, T) long, 0 on padding / dropped vision tokens; position_ids
    (B, T); token_positions (B, L): sequence position of each ``input_ids`` index (the placeholder maps to the
    image's first position); vision_positions (B, N) sequence positions of the patch tokens (None without an
    image); vision_embeds (B, N, D) projected patch embeddings before masking (None without an image).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    token_positions: torch.Tensor
    vision_positions: torch.Tensor | None
    vision_embeds: torch.Tensor | None


@dataclass
class LladaVOutput:
    """logits (B, L, V) aligned with ``input_ids`` (or (B, T, V) over the full sequence), plus the positions of
    the vision tokens and the projected vision embeddings used (see :class:`MultimodalEmbeddings`)."""

    logits: torch.Tensor
    token_positions: torch.Tensor
    vision_positions: torch.Tensor | None
    vision_embeds: torch.Tensor | None


@dataclass
class PositionCache:
    """Keys / values of some sequence positions at every LM layer (RoPE applied), for reuse by later forwards.

    ``kv`` holds (B, H, C, D_h) per layer; ``key_mask`` (B, C) is 1 where a cached key is attended (0 on
    padding and dropped vision tokens, so they stay masked for every later query). Under bidirectional
    attention the order of the cached positions does not matter: each carries its own rotary position.
    """

    kv: DynamicCache
    key_mask: torch.Tensor

    @property
    def length(self) -> int:
        return self.key_mask.shape[1]

    def without(self, start: int, end: int) -> PositionCache:
        """A new cache of the positions outside ``[start, end)`` (in their order); this one is unchanged."""
        data = [
            (
                torch.cat([layer.keys[..., :start, :], layer.keys[..., end:, :]], dim=-2),
                torch.cat([layer.values[..., :start, :], layer.values[..., end:, :]], dim=-2),
            )
            for layer in self.kv.layers
        ]
        key_mask = torch.cat([self.key_mask[:, :start], self.key_mask[:, end:]], dim=1)
        return PositionCache(DynamicCache(ddp_cache_data=data), key_mask)


@dataclass
class BlockCacheState:
    """What :meth:`LladaVModel.block_logits` keeps between the steps of one block: the cached positions' K/V,
    the full sequence's attention mask and position ids (B, T) and ``offset`` = T - L (image tokens - 1)."""

    cache: PositionCache
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    offset: int


BLOCK_CACHES = ("prefix", "dual")


class LladaVModel(nn.Module):
    """SigLIP + mlp2x_gelu projector + bidirectional LLaMA LM + untied head (LLaDA-V).

    Example:
        >>> cfg = LladaVConfig.tiny()
        >>> model = LladaVModel(cfg)
        >>> ids = torch.tensor([[cfg.image_token_index, 20, 21, cfg.mask_token_id]])
        >>> model(ids, pixel_values=torch.rand(1, 3, 32, 32)).logits.shape[:2]
        torch.Size([1, 4])
    """

    def __init__(self, config: LladaVConfig) -> None:
        super().__init__()
        if config.image_aspect_ratio.startswith("anyres"):
            warnings.warn(
                f"image_aspect_ratio={config.image_aspect_ratio!r}: anyres tiling is not implemented, images are "
                "encoded as one square crop",
                stacklevel=2,
            )
        self.config = config
        width = config.text["hidden_size"]
        self.vision_tower = SiglipTower(config.siglip_config())
        self.mm_projector = nn.Sequential(
            nn.Linear(config.vision["hidden_size"], width), nn.GELU(), nn.Linear(width, width)
        )
        self.image_newline = (
            nn.Parameter(torch.randn(width) / math.sqrt(width)) if config.use_image_newline else None
        )
        self.language_model = LlamaModel(config.llama_config())
        self.lm_head = nn.Linear(width, config.text["vocab_size"], bias=False)
        nn.init.normal_(self.lm_head.weight, std=config.text.get("initializer_range", 0.02))
        make_bidirectional(self.language_model)

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def mask_token_embedding(self) -> torch.Tensor:
        """Embedding (D,) of the mask token, used to mask vision tokens."""
        return self.embed_tokens.weight[self.config.mask_token_id]

    def gradient_checkpointing_enable(self) -> None:
        """Activation checkpointing in the language model (for real-scale fine-tuning)."""
        self.language_model.gradient_checkpointing_enable()

    def normalize_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(images - mean) / std`` for images in [0, 1] of shape (B, C, S, S), S = ``config.image_size``."""
        channels, size = self.config.vision.get("num_channels", 3), self.config.image_size
        if images.dim() != 4 or images.shape[1:] != (channels, size, size):
            raise ValueError(
                f"images must be (B, {channels}, {size}, {size}) in [0, 1], got {tuple(images.shape)}"
            )
        mean = torch.tensor(self.config.image_mean, device=images.device, dtype=images.dtype)[:, None, None]
        std = torch.tensor(self.config.image_std, device=images.device, dtype=images.dtype)[:, None, None]
        return (images - mean) / std

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected patch embeddings (B, N, D) of images in [0, 1]; N = ``config.num_vision_tokens``."""
        tower_dtype = self.mm_projector[0].weight.dtype
        features = self.vision_tower(self.normalize_images(pixel_values).to(tower_dtype))
        return self.mm_projector(features)

    def _image_block(self, vision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens (B, N, D) -> image block (B, M, D) with optional row newlines, and patch offsets (N,)."""
        grid = self.config.grid_size
        offsets = torch.arange(vision.shape[1], device=vision.device)
        if self.image_newline is None:
            return vision, offsets
        batch, _, width = vision.shape
        rows = vision.reshape(batch, grid, grid, width)
        newline = self.image_newline.to(vision.dtype).expand(batch, grid, 1, width)
        block = torch.cat([rows, newline], dim=2).reshape(batch, grid * (grid + 1), width)
        return block, offsets + offsets // grid  # row r, column c -> r * (grid + 1) + c

    # ------------------------------------------------------------------ embedding
    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        vision_token_override: torch.Tensor | None = None,
        vision_token_mask: torch.Tensor | None = None,
        vision_token_drop: torch.Tensor | None = None,
    ) -> MultimodalEmbeddings:
        """Embed ``input_ids`` (B, L) and splice the image tokens in place of the placeholder.

        ``vision_token_override`` (B, N, D) replaces the projected patch embeddings (``pixel_values`` is then
        not needed); ``vision_token_mask`` (B, N) bool swaps chosen tokens for the mask token's embedding;
        ``vision_token_drop`` (B, N) bool deletes chosen tokens (excluded from attention, positions closed up).
        """
        batch, length = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
            )
        attention_mask = attention_mask.long()
        placeholder = input_ids == self.config.image_token_index
        counts = placeholder.sum(dim=1)
        has_image = pixel_values is not None or vision_token_override is not None
        text_embeds = self.embed_tokens(input_ids.masked_fill(placeholder, 0))

        if not has_image:
            if counts.any():
                raise ValueError(
                    f"input_ids contain the image placeholder {self.config.image_token_index} but no "
                    "pixel_values / vision_token_override was given"
                )
            if vision_token_mask is not None or vision_token_drop is not None:
                raise ValueError("vision_token_mask / vision_token_drop need an image")
            positions = torch.arange(length, device=device).expand(batch, length)
            position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
            return MultimodalEmbeddings(text_embeds, attention_mask, position_ids, positions, None, None)

        if not bool((counts == 1).all()):
            raise ValueError(
                f"each sequence needs exactly one image placeholder {self.config.image_token_index}, "
                f"got counts {counts.tolist()}"
            )
        num_tokens = self.config.num_vision_tokens
        if vision_token_override is not None:
            vision = vision_token_override
            expected = (batch, num_tokens, text_embeds.shape[-1])
            if tuple(vision.shape) != expected:
                raise ValueError(f"vision_token_override must be {expected}, got {tuple(vision.shape)}")
        else:
            vision = self.encode_images(pixel_values)
            if vision.shape[0] != batch:
                raise ValueError(f"{vision.shape[0]} images for {batch} sequences")
        vision_embeds = vision
        vision = vision.to(text_embeds.dtype)
        if vision_token_mask is not None:
            _check_token_selection("vision_token_mask", vision_token_mask, batch, num_tokens)
            vision = torch.where(
                vision_token_mask[..., None].bool(), self.mask_token_embedding().to(vision.dtype), vision
            )
        block, offsets = self._image_block(vision)
        block_len = block.shape[1]

        place = placeholder.float().argmax(dim=1)  # (B,)
        pieces, masks = [], []
        for row in range(batch):
            p = int(place[row])
            pieces.append(torch.cat([text_embeds[row, :p], block[row], text_embeds[row, p + 1 :]]))
            image_mask = torch.full(
                (block_len,), int(attention_mask[row, p]), device=device, dtype=torch.long
            )
            masks.append(torch.cat([attention_mask[row, :p], image_mask, attention_mask[row, p + 1 :]]))
        inputs_embeds = torch.stack(pieces)
        full_mask = torch.stack(masks)
        vision_positions = place[:, None] + offsets[None, :]
        if vision_token_drop is not None:
            _check_token_selection("vision_token_drop", vision_token_drop, batch, num_tokens)
            kept = full_mask.gather(1, vision_positions) * (~vision_token_drop.bool()).long()
            full_mask = full_mask.scatter(1, vision_positions, kept)
        index = torch.arange(length, device=device)[None, :]
        token_positions = index + (block_len - 1) * (index > place[:, None]).long()
        position_ids = (full_mask.cumsum(1) - 1).clamp(min=0)
        return MultimodalEmbeddings(
            inputs_embeds, full_mask, position_ids, token_positions, vision_positions, vision_embeds
        )

    # ------------------------------------------------------------------ forward
    def hidden_states(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, D) of the bidirectional LM for a spliced sequence."""
        batch, seq, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, seq, dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        mask_4d = bidirectional_attention_mask(attention_mask, inputs_embeds.dtype)
        out = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=mask_4d, position_ids=position_ids, use_cache=False
        )
        return out[0]

    def hidden_states_and_cache(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, PositionCache]:
        """:meth:`hidden_states` of a whole spliced sequence (B, T, D), and the K/V of all its T positions."""
        mask_4d = bidirectional_attention_mask(attention_mask, inputs_embeds.dtype)
        kv = DynamicCache()
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=mask_4d,
            position_ids=position_ids,
            cache=kv,
            use_cache=True,
        )
        return out[0], PositionCache(kv, attention_mask.long())

    def cached_hidden_states(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cache: PositionCache,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, W, D) of W new positions that attend to the cached positions plus themselves.

        ``position_ids`` (B, W) are the new positions' rotary positions in the full sequence; ``attention_mask``
        (B, W) (default all ones) marks which of them are attended. Their K/V are appended to the cache for
        this forward and cropped off afterwards, so ``cache`` is left as it was.
        """
        batch, width, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, width, dtype=torch.long, device=inputs_embeds.device)
        keys = torch.cat([cache.key_mask, attention_mask.long()], dim=1)
        mask_4d = bidirectional_attention_mask(keys, inputs_embeds.dtype, query_length=width)
        try:
            out = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=mask_4d,
                position_ids=position_ids,
                cache=cache.kv,
                use_cache=True,
            )
        finally:
            cache.kv.crop(-width)
        return out[0]

    def block_logits(
        self,
        input_ids: torch.Tensor,
        start: int,
        end: int,
        cache: str,
        state: BlockCacheState | None = None,
        attention_mask: torch.Tensor | None = None,
        **embed_kwargs: torch.Tensor,
    ) -> tuple[torch.Tensor, BlockCacheState]:
        """Logits (B, end - start, V) of the token positions ``[start, end)`` (the sampler's current block,
        after the image placeholder) with a block-wise KV cache (Fast-dLLM's approximation).

        ``state`` None (the block's first step): the whole sequence is run (exactly as :meth:`forward`) and the
        K/V of the positions before ``start`` (``cache="prefix"``) or outside ``[start, end)`` (``"dual"``)
        are kept in the returned state. With a state (later steps of the block): only the token positions
        ``[start, L)`` (prefix: block and suffix) or ``[start, end)`` (dual: block) are run, attending to the
        cached K/V plus themselves; image interventions (``embed_kwargs``) live in the cached prefix.
        """
        if cache not in BLOCK_CACHES:
            raise ValueError(f"cache={cache!r}; expected one of {BLOCK_CACHES}")
        length = input_ids.shape[1]
        if not 0 < start < end <= length:
            raise ValueError(f"block [{start}, {end}) must lie inside the {length} token positions, after 0")
        if state is None:
            embedded = self.embed_inputs(input_ids, attention_mask=attention_mask, **embed_kwargs)
            offset = embedded.inputs_embeds.shape[1] - length
            if not bool((embedded.token_positions[:, start] == start + offset).all()):
                raise ValueError(f"the block starting at token {start} must come after the image placeholder")
            hidden, full = self.hidden_states_and_cache(
                embedded.inputs_embeds, embedded.attention_mask, embedded.position_ids
            )
            cut_end = embedded.inputs_embeds.shape[1] if cache == "prefix" else end + offset
            state = BlockCacheState(
                full.without(start + offset, cut_end), embedded.attention_mask, embedded.position_ids, offset
            )
            return self.lm_head(hidden[:, start + offset : end + offset]), state
        stop = length if cache == "prefix" else end
        window = input_ids[:, start:stop]
        if bool((window == self.config.image_token_index).any()):
            raise ValueError(f"the image placeholder may not appear after token position {start}")
        lo, hi = start + state.offset, stop + state.offset
        hidden = self.cached_hidden_states(
            self.embed_tokens(window),
            state.position_ids[:, lo:hi],
            state.cache,
            state.attention_mask[:, lo:hi],
        )
        return self.lm_head(hidden[:, : end - start]), state

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        vision_token_override: torch.Tensor | None = None,
        vision_token_mask: torch.Tensor | None = None,
        vision_token_drop: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        full_sequence: bool = False,
    ) -> LladaVOutput:
        """Logits of the mask predictor.

        With ``input_ids`` (B, L): the image is spliced in (see :meth:`embed_inputs`) and logits are returned
        for the L token positions, or for the whole (B, T) sequence with ``full_sequence=True``. With
        ``inputs_embeds`` (B, T, D) (an already spliced sequence): logits for every position.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            hidden = self.hidden_states(inputs_embeds, attention_mask, position_ids)
            positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[:2])
            return LladaVOutput(self.lm_head(hidden), positions, None, None)
        embedded = self.embed_inputs(
            input_ids,
            pixel_values,
            attention_mask,
            vision_token_override,
            vision_token_mask,
            vision_token_drop,
        )
        hidden = self.hidden_states(
            embedded.inputs_embeds,
            embedded.attention_mask,
            embedded.position_ids if position_ids is None else position_ids,
        )
        if not full_sequence:
            index = embedded.token_positions[..., None].expand(-1, -1, hidden.shape[-1])
            hidden = hidden.gather(1, index)
        return LladaVOutput(
            self.lm_head(hidden), embedded.token_positions, embedded.vision_positions, embedded.vision_embeds
        )


def _check_token_selection(name: str, selection: torch.Tensor, batch: int, num_tokens: int) -> None:
    if tuple(selection.shape) != (batch, num_tokens):
        raise ValueError(f"{name} must be (B, N) = {(batch, num_tokens)}, got {tuple(selection.shape)}")


def bidirectional_attention_mask(
    attention_mask: torch.Tensor, dtype: torch.dtype, query_length: int | None = None
) -> torch.Tensor:
    """Additive 4D mask (B, 1, Q, T) over T keys (``attention_mask`` (B, T)): 0 where the key is kept, the
    dtype's minimum on padded keys; no causal term, so every query attends to every kept key. Q defaults to T
    (a whole sequence); a cached forward has fewer queries than keys."""
    keep = attention_mask.bool()[:, None, None, :]
    mask = torch.zeros(keep.shape, dtype=dtype, device=attention_mask.device)
    mask = mask.masked_fill(~keep, torch.finfo(dtype).min)
    seq = attention_mask.shape[1]
    return mask.expand(-1, 1, seq if query_length is None else query_length, seq)


def make_bidirectional(language_model: nn.Module) -> None:
    """Switch off causal masking flags on a transformers decoder (config and every attention module)."""
    language_model.config.is_causal = False
    for module in language_model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
