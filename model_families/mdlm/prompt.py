"""Chat prompt format of LLaDA-V (LLaMA-3 style) and supervised fine-tuning examples.

The formatter is saved with every checkpoint (``to_dict``) and rebuilt at evaluation (``from_dict``) so that
training and evaluation never format prompts differently.

A user turn with an image reads::

    <|start_header_id|>user<|end_header_id|>\\n\\n<image>\\n{question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n

optionally preceded by ``<|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>`` and a BOS token.
The response is ``{answer}<|eot_id|>`` followed by ``<|endoftext|>`` padding, which the SFT loss treats as
response tokens (LLaDA SFT).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from model_families.mdlm.tokenizer import (
    BOS_TOKEN,
    END_HEADER_TOKEN,
    EOS_TOKEN,
    EOT_TOKEN,
    IMAGE_TOKEN,
    START_HEADER_TOKEN,
)


@dataclass(frozen=True)
class PromptFormatter:
    """LLaMA-3 style chat template used by LLaDA-V.

    Args:
        system_prompt: optional system turn.
        add_bos: prefix the prompt with ``<|startoftext|>`` (LLaDA's chat template does; the spec's does not).
        style: name of the template, checked by ``from_dict``.
    """

    system_prompt: str | None = None
    add_bos: bool = False
    style: str = "llada_v_llama3"

    def __post_init__(self) -> None:
        if self.style != "llada_v_llama3":
            raise ValueError(f"unknown prompt style {self.style!r}; expected 'llada_v_llama3'")

    @staticmethod
    def _turn(role: str, content: str) -> str:
        return f"{START_HEADER_TOKEN}{role}{END_HEADER_TOKEN}\n\n{content}{EOT_TOKEN}"

    def format_prompt(self, question: str, with_image: bool = True) -> str:
        """Prompt text up to and including the assistant header."""
        text = BOS_TOKEN if self.add_bos else ""
        if self.system_prompt:
            text += self._turn("system", self.system_prompt)
        content = f"{IMAGE_TOKEN}\n{question}" if with_image else question
        text += self._turn("user", content)
        return text + f"{START_HEADER_TOKEN}assistant{END_HEADER_TOKEN}\n\n"

    def format_response(self, answer: str) -> str:
        """Response text: the answer closed by ``<|eot_id|>`` (padding is added by token)."""
        return f"{answer}{EOT_TOKEN}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptFormatter:
        unknown = set(data) - {"system_prompt", "add_bos", "style"}
        if unknown:
            raise KeyError(f"unknown PromptFormatter fields {sorted(unknown)}")
        return cls(**data)


def tokenize_with_image(
    tokenizer: PreTrainedTokenizerBase, text: str, image_token_index: int | None = None
) -> list[int]:
    """Token ids of ``text`` with every ``<image>`` replaced by ``image_token_index``.

    LLaVA splits the text at ``<image>`` and inserts the placeholder id (-200 for the released model, which has
    no ``<image>`` token); with ``image_token_index=None`` the tokenizer's own ``<image>`` id is used.
    """
    if image_token_index is None:
        image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_token_index is None or image_token_index == tokenizer.unk_token_id:
            raise KeyError(f"tokenizer has no {IMAGE_TOKEN} token; pass image_token_index")
    ids: list[int] = []
    for index, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if index > 0:
            ids.append(image_token_index)
        if chunk:
            ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return ids


@dataclass
class SFTExample:
    """One fine-tuning sequence: ``input_ids`` (L,), ``response_mask`` (L,) bool, ``prompt_length``."""

    input_ids: torch.Tensor
    response_mask: torch.Tensor
    prompt_length: int


def build_sft_example(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    answer: str,
    max_len: int,
    formatter: PromptFormatter | None = None,
    image_token_index: int | None = None,
    with_image: bool = True,
) -> SFTExample:
    """Tokenise prompt + ``answer<|eot_id|>`` and pad with ``<|endoftext|>`` to ``max_len``.

    Every position from ``prompt_length`` on (answer, eot and the EOS padding) is a response position, as in
    LLaDA's SFT. A pair longer than ``max_len`` raises ``ValueError`` (no silent truncation).
    """
    formatter = formatter or PromptFormatter()
    prompt_ids = tokenize_with_image(
        tokenizer, formatter.format_prompt(question, with_image), image_token_index
    )
    response_ids = tokenize_with_image(tokenizer, formatter.format_response(answer), image_token_index)
    total = len(prompt_ids) + len(response_ids)
    if total > max_len:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + response ({len(response_ids)} tokens) = {total} > max_len={max_len}"
        )
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    ids = prompt_ids + response_ids + [eos_id] * (max_len - total)
    response_mask = torch.zeros(max_len, dtype=torch.bool)
    response_mask[len(prompt_ids) :] = True
    return SFTExample(torch.tensor(ids, dtype=torch.long), response_mask, len(prompt_ids))


def decode_response(
    tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor | list[int], stop_ids: list[int]
) -> str:
    """Text of generated response ids, cut at the first id in ``stop_ids`` (e.g. eot and eos)."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    stops = set(stop_ids)
    end = next((i for i, token in enumerate(ids) if token in stops), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True).strip()
