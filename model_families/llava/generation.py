"""Batched answers of a LLaVA model with transformers' ``generate``: greedy, sampling or beam search from a
small config, on left-padded prompts.

:class:`LlavaGeneration` is the config (``model.generation`` of :class:`lightning_modules.llava_finetune.
LlavaFineTuning`); :func:`generate_answers` expands each prompt's image slot, generates ``max_new_tokens`` at
most and decodes each row up to its first ``</s>``. Left padding keeps every prompt's last token in the last
column, so all rows continue from the same position; :func:`model_families.llava.modeling.position_ids` makes a
padded row's positions those of the row alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig

from model_families.llava.modeling import expand_image_tokens

__all__ = ["MODES", "LlavaGeneration", "decode_answers", "generate_answers"]

MODES = ("greedy", "sample", "beam")


@dataclass(frozen=True)
class LlavaGeneration:
    """How answers are generated.

    Args:
        mode: ``greedy``, ``sample`` (temperature / top-k / top-p) or ``beam`` (``num_beams`` beams).
        max_new_tokens: the longest answer in tokens (with its ``</s>``).
        temperature / top_k / top_p: sampling (``mode: sample``).
        num_beams / length_penalty: beam search (``mode: beam``).
        seed: seed of sampling, per batch ``seed * 1_000_003 + batch_idx`` (reproducible evaluations).
    """

    mode: str = "greedy"
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 4
    length_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"model.generation.mode={self.mode!r}; expected one of {MODES}")
        if self.max_new_tokens < 1:
            raise ValueError(f"model.generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.mode == "sample" and not self.temperature > 0:
            raise ValueError(f"model.generation.temperature must be > 0, got {self.temperature}")
        if self.mode == "beam" and self.num_beams < 2:
            raise ValueError(f"model.generation.num_beams must be >= 2 for beam search, got {self.num_beams}")

    @classmethod
    def from_dict(cls, data: dict | None) -> LlavaGeneration:
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"model.generation has unknown keys {sorted(unknown)}; expected some of {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hf_config(self, eos_id: int, pad_id: int) -> GenerationConfig:
        """transformers' ``GenerationConfig`` of this mode (stops at ``eos_id``, pads finished rows)."""
        common = {"max_new_tokens": self.max_new_tokens, "eos_token_id": eos_id, "pad_token_id": pad_id}
        if self.mode == "sample":
            return GenerationConfig(
                do_sample=True, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, **common
            )
        if self.mode == "beam":
            return GenerationConfig(
                do_sample=False,
                num_beams=self.num_beams,
                length_penalty=self.length_penalty,
                early_stopping=True,
                **common,
            )
        return GenerationConfig(do_sample=False, num_beams=1, **common)


def decode_answers(tokenizer: Any, ids: Tensor, eos_id: int) -> list[str]:
    """Each row of generated ids up to (without) its first ``eos_id``, decoded without special tokens."""
    answers = []
    for row in ids.tolist():
        if eos_id in row:
            row = row[: row.index(eos_id)]
        answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    pixel_values: Tensor,
    settings: LlavaGeneration,
    image_token_index: int,
    image_tokens: int,
    eos_id: int,
    pad_id: int,
    batch_idx: int = 0,
) -> list[str]:
    """Decoded answers of a left-padded batch (``pixel_values`` already normalised); one string per row."""
    if bool((prompt_mask[:, -1] == 0).any()):
        raise ValueError(
            "prompts must be left-padded for batched generation (a row's last column is padding); "
            "the instruction collator pads on the left"
        )
    ids, mask = expand_image_tokens(prompt_ids, image_token_index, image_tokens, prompt_mask)
    devices = [ids.device] if ids.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # sampling seeds never move the training RNG
        torch.manual_seed(settings.seed * 1_000_003 + batch_idx)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixel_values,
            generation_config=settings.hf_config(eos_id, pad_id),
        )
    return decode_answers(tokenizer, out[:, ids.shape[1] :], eos_id)
