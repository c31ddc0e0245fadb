"""LLaVA's tokenizer and chat template as the instruction datamodule's text interface.

Implements :class:`model_families.instruct_text.InstructText` for the LLaVA family: prompts and responses come
from :class:`~model_families.llava.chat.LlavaChatTemplate`, ids from the tokenizer (no special tokens added;
the template writes ``<s>`` itself), the image slot is the tokenizer's ``<image>`` token (one id per prompt,
expanded to the vision tower's token count by the model, :func:`model_families.llava.modeling.expand_image_tokens`),
and an answer ends with ``</s>`` (eot = eos), which also pads responses. Prompts are left-padded with the
tokenizer's pad token: batched generation needs one, so a tokenizer without it is refused here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model_families.llava.chat import LlavaChatTemplate

__all__ = ["LlavaInstructText", "default_instruct_text"]


@dataclass(frozen=True)
class LlavaInstructText:
    """The LLaVA text interface: ``tokenizer`` and ``template`` plus the special ids they fix."""

    tokenizer: Any
    template: LlavaChatTemplate
    image_token_index: int
    eos_id: int
    eot_id: int
    pad_id: int
    image_placeholder: str = "<image>"

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, template: LlavaChatTemplate, where: str = "the tokenizer"
    ) -> LlavaInstructText:
        """The ids of ``tokenizer`` (``where`` names it in errors): the template's image placeholder must be
        one token of its vocabulary, and it needs an EOS and a pad token."""
        placeholder = template.image_placeholder
        vocab = tokenizer.get_vocab()
        if placeholder not in vocab:
            raise ValueError(
                f"{where} has no {placeholder!r} token (the chat template's image slot); llava-hf tokenizers "
                f"add it after the vocabulary (id 32000)"
            )
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{where} has no eos_token: LLaVA answers end with it (</s>)")
        if tokenizer.pad_token_id is None:
            raise ValueError(
                f"{where} has no pad_token: batched generation left-pads prompts with it (llava-hf's is "
                f"'<pad>', id 32001); add one to the tokenizer (tokenizer_config.json) before training"
            )
        eos = int(tokenizer.eos_token_id)
        return cls(
            tokenizer, template, int(vocab[placeholder]), eos, eos, int(tokenizer.pad_token_id), placeholder
        )

    def prompt_text(self, question: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """Chat prompt up to ``ASSISTANT:``; the image goes into the first user turn."""
        return self.template.prompt_text(question, history)

    def response_text(self, answer: str) -> str:
        return self.template.response_text(answer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)


def default_instruct_text(tokenizer_path: str | None = None) -> LlavaInstructText:
    """The tiny LLaVA's interface: ``tokenizer_path`` (default: the embedded LLaVA tokenizer) with LLaVA-1.5's
    chat template."""
    from model_families.llava.tokenizer import load_embedded_tokenizer, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else load_embedded_tokenizer()
    where = f"tokenizer {tokenizer_path}" if tokenizer_path else "the embedded LLaVA tokenizer"
    return LlavaInstructText.from_tokenizer(tokenizer, LlavaChatTemplate(), where)
