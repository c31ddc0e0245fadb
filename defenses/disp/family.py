"""What a model family supplies for DiSP, so that one defense runs on every generative VLM family.

DiSP needs four things of a model (Wan et al., 2026; :mod:`defenses.disp.saliency`, :mod:`defenses.disp.masking`):

| method | what it returns |
|---|---|
| ``vision_embeds(batch)`` | the projected vision tokens of the batch's images, (B, N, D), no gradient |
| ``response_logits(batch)`` | a pure function ``vision (B, N, D) -> logits (B, R, V)`` of the output positions DiSP scores, with the vision tokens spliced into the prompt (``torch.func``-safe) |
| ``generate(batch, selected, mode, generator)`` | decoded answers with the ``selected`` (B, N) vision tokens masked (``mode="mask"``) or deleted (``"drop"``); ``selected=None``: no intervention |
| ``attention_to_vision(batch)`` | optional, the ``attention`` ablation: attention mass from the output positions to each vision token, (B, N) |

plus ``num_vision_tokens`` and a ``transformable()`` context in which ``response_logits`` can be differentiated
with ``torch.func`` (eager attention). :class:`DiSPFamily` turns them into DiSP's selection and masked answers
(:meth:`DiSPFamily.masked_responses`); :func:`defenses.disp.purify.purify_dataset` only calls that.

The MDLM family (LLaDA-V) keeps its own path (:class:`MDLMDiSP`: saliency at the first denoising step, the mask
embedding at every step); LLaVA's adapter is :class:`model_families.llava.disp.LlavaDiSP`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from defenses.disp.masking import DiSPMasking, masked_generate_ids
from defenses.disp.saliency import saliency_of

__all__ = ["DiSPFamily", "MDLMDiSP"]


class DiSPFamily:
    """Base class of a family's DiSP adapter (see the module docstring); subclasses implement the methods."""

    num_vision_tokens: int

    def vision_embeds(self, batch: dict) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement vision_embeds(batch)")

    def response_logits(self, batch: dict) -> Callable[[Tensor], Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement response_logits(batch)")

    def generate(
        self, batch: dict, selected: Tensor | None, mode: str, generator: torch.Generator | None
    ) -> list[str]:
        raise NotImplementedError(
            f"{type(self).__name__} must implement generate(batch, selected, mode, generator)"
        )

    def attention_to_vision(self, batch: dict) -> Tensor:
        raise ValueError(
            f"disp selection 'attention' needs attention weights to the vision tokens, which "
            f"{type(self).__name__} does not supply; use selection 'saliency' or 'random'"
        )

    @contextlib.contextmanager
    def transformable(self) -> Iterator[None]:
        """The context in which ``response_logits`` is differentiated (default: none needed)."""
        yield

    def scores(self, batch: dict, masking: DiSPMasking, generator: torch.Generator | None) -> Tensor:
        """Per-token scores (B, N) of ``masking.selection``."""
        if masking.selection == "saliency":
            with self.transformable():
                return saliency_of(
                    self.response_logits(batch), self.vision_embeds(batch), masking.num_probes,
                    masking.estimator, generator, masking.probe_chunk,
                )  # fmt: skip
        if masking.selection == "attention":
            return self.attention_to_vision(batch)
        rows = batch["prompt_ids"].shape[0]
        device = generator.device if generator is not None else "cpu"
        scores = torch.rand(rows, self.num_vision_tokens, generator=generator, device=device)
        return scores.to(batch["prompt_ids"].device)

    def masked_responses(
        self, batch: dict, masking: DiSPMasking | None, generator: torch.Generator | None = None
    ) -> tuple[list[str], Tensor | None]:
        """Answers with DiSP's masking (none when ``masking`` is None or rho = 0) and the selected tokens."""
        if masking is None or masking.rho == 0:
            return self.generate(batch, None, "mask", generator), None
        selected = masking.select(self.scores(batch, masking, generator))
        return self.generate(batch, selected, masking.mode, generator), selected


class MDLMDiSP(DiSPFamily):
    """LLaDA-V's DiSP: :func:`defenses.disp.masking.masked_generate_ids` (saliency at the first denoising step,
    the intervention at every step), decoded up to the stop tokens."""

    def __init__(self, model: Any, tokenizer: Any, generation: Any) -> None:
        from model_families.mdlm.inference import stop_token_ids

        self.model, self.tokenizer, self.generation = model, tokenizer, generation
        self.num_vision_tokens = int(model.config.num_vision_tokens)
        self.stop_ids = stop_token_ids(model)

    def masked_responses(
        self, batch: dict, masking: DiSPMasking | None, generator: torch.Generator | None = None
    ) -> tuple[list[str], Tensor | None]:
        from model_families.mdlm.inference import decode_responses

        ids, selected = masked_generate_ids(
            self.model, batch["prompt_ids"], batch["pixel_values"], self.generation, masking,
            batch["prompt_mask"], generator,
        )  # fmt: skip
        return decode_responses(self.tokenizer, ids, self.stop_ids), selected
