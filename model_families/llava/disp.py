"""LLaVA's adapter for the DiSP defense (:class:`defenses.disp.family.DiSPFamily`): the same saliency, selection
and self-purification code as LLaDA-V's, on an autoregressive model.

* vision tokens: the projector's outputs (``get_image_features``), N per image (16 for the tiny model);
* scored outputs: an autoregressive model has no "first denoising step" with every response position open;
  its output before any answer token is the **next-token distribution at the end of the prompt** (R = 1), the
  distribution whose change the saliency measures here (our reading of DiSP for causal LMs);
* masking: ``mode="mask"`` replaces the selected vision tokens by a zero vector (LLaVA has no mask token: zero
  carries no image content after the projector), ``mode="drop"`` removes them from attention (position ids count
  only attended tokens, so the rest of the sequence is encoded as if they were deleted);
* answers: HF ``generate`` from the spliced embeddings (greedy / sampling / beams,
  :class:`~model_families.llava.generation.LlavaGeneration`), decoded up to ``</s>``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from defenses.disp.family import DiSPFamily
from model_families.llava.generation import LlavaGeneration, decode_answers
from model_families.llava.modeling import expand_image_tokens, normalize_images, position_ids

__all__ = ["LlavaDiSP"]


class LlavaDiSP(DiSPFamily):
    """DiSP on a ``LlavaForConditionalGeneration`` (see the module docstring).

    Args:
        model / tokenizer: the model and its tokenizer.
        image_token_index / eos_id / pad_id: the instruction text's ids.
        image_tokens: vision tokens per image (the vision tower's features).
        image_mean / image_std: the snapshot's image statistics.
        generation: how answers are generated.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_token_index: int,
        image_tokens: int,
        eos_id: int,
        pad_id: int,
        image_mean,
        image_std,
        generation: LlavaGeneration,
    ) -> None:
        self.model, self.tokenizer, self.generation = model, tokenizer, generation
        self.image_token_index, self.num_vision_tokens = int(image_token_index), int(image_tokens)
        self.eos_id, self.pad_id = int(eos_id), int(pad_id)
        self.image_mean, self.image_std = image_mean, image_std

    @classmethod
    def from_module(cls, module: Any, generation: LlavaGeneration | None = None) -> LlavaDiSP:
        """From a :class:`lightning_modules.llava_finetune.LlavaFineTuning` (its model, text and statistics)."""
        text = module.text
        return cls(
            module.model, module.tokenizer, text.image_token_index, module.image_tokens, text.eos_id,
            text.pad_id, module.image_mean, module.image_std, generation or module.generation,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ inputs
    def _pixels(self, batch: dict) -> Tensor:
        size = int(self.model.config.vision_config.image_size)
        return normalize_images(
            batch["pixel_values"], self.image_mean, self.image_std, size, self.model.dtype
        )

    def _prompt(self, batch: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Expanded prompt ids, attention mask, the image-slot mask and each slot's vision-token index."""
        ids, mask = expand_image_tokens(
            batch["prompt_ids"], self.image_token_index, self.num_vision_tokens, batch["prompt_mask"]
        )
        slots = ids == self.image_token_index
        index = (slots.long().cumsum(dim=1) - 1).clamp(min=0)  # i-th image slot of a row -> vision token i
        return ids, mask, slots, index

    def _embeds(self, ids: Tensor, slots: Tensor, index: Tensor, vision: Tensor) -> Tensor:
        """The prompt's input embeddings with the vision tokens spliced into the image slots (gather/where
        only, so ``torch.func`` can transform it)."""
        text = self.model.get_input_embeddings()(ids)
        spliced = vision.to(text.dtype).gather(1, index[..., None].expand(-1, -1, text.shape[-1]))
        return torch.where(slots[..., None], spliced, text)

    # ------------------------------------------------------------------------------------------ DiSP
    @torch.no_grad()
    def vision_embeds(self, batch: dict) -> Tensor:
        features = self.model.model.get_image_features(pixel_values=self._pixels(batch)).pooler_output
        return torch.stack(list(features))

    def response_logits(self, batch: dict) -> Callable[[Tensor], Tensor]:
        ids, mask, slots, index = self._prompt(batch)
        positions = position_ids(mask)
        language_model, head = self.model.model.language_model, self.model.lm_head

        def logits(vision: Tensor) -> Tensor:
            hidden = language_model(
                inputs_embeds=self._embeds(ids, slots, index, vision), attention_mask=mask,
                position_ids=positions, use_cache=False,
            ).last_hidden_state  # fmt: skip
            return head(hidden[:, -1:])  # (B, 1, V): the next-token distribution after the prompt

        return logits

    @contextlib.contextmanager
    def transformable(self) -> Iterator[None]:
        """Eager attention (``torch.func`` has no forward-mode / vmapped rules for SDPA), restored after."""
        config = self.model.model.language_model.config
        previous = config._attn_implementation
        config._attn_implementation = "eager"
        try:
            yield
        finally:
            config._attn_implementation = previous

    @torch.no_grad()
    def generate(
        self, batch: dict, selected: Tensor | None, mode: str, generator: torch.Generator | None
    ) -> list[str]:
        ids, mask, slots, index = self._prompt(batch)
        vision = self.vision_embeds(batch)
        if selected is not None and mode == "mask":
            vision = torch.where(selected[..., None], torch.zeros_like(vision), vision)
        if selected is not None and mode == "drop":
            dropped = slots & selected.gather(1, index)
            mask = mask.masked_fill(dropped, 0)
        seed = 0 if generator is None else int(torch.randint(0, 2**62, (1,), generator=generator))
        devices = [ids.device] if ids.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # sampling never moves the global RNG
            torch.manual_seed(seed)
            out = self.model.generate(
                inputs_embeds=self._embeds(ids, slots, index, vision),
                attention_mask=mask,
                generation_config=self.generation.hf_config(self.eos_id, self.pad_id),
            )
        return decode_answers(self.tokenizer, out, self.eos_id)
