"""LLaDA-V's tokenizer and LLaMA-3 chat template as the instruction datamodule's text interface.

Implements :class:`model_families.instruct_text.InstructText` for the MDLM family: prompts come from
:class:`~model_families.mdlm.prompt.PromptFormatter` (later turns of a multi-turn history with the LLaMA-3
headers), ids from :func:`~model_families.mdlm.prompt.tokenize_with_image`, and the special ids from the
model's :class:`~model_families.mdlm.config.LladaVConfig`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model_families.mdlm.prompt import PromptFormatter, tokenize_with_image
from model_families.mdlm.tokenizer import END_HEADER_TOKEN, EOT_TOKEN, IMAGE_TOKEN, START_HEADER_TOKEN


@dataclass(frozen=True)
class LladaVInstructText:
    """The LLaDA-V text interface: ``tokenizer`` and ``formatter`` plus the ids of the model config."""

    tokenizer: Any
    formatter: PromptFormatter
    image_token_index: int
    eos_id: int
    eot_id: int
    pad_id: int
    image_placeholder: str = IMAGE_TOKEN

    @classmethod
    def from_config(cls, tokenizer: Any, formatter: PromptFormatter, config: Any) -> LladaVInstructText:
        """From a :class:`LladaVConfig` (prompts padded with ``pad_token_id``, else EOS)."""
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        return cls(
            tokenizer, formatter, config.image_token_index, config.eos_token_id, config.eot_token_id, pad
        )

    def prompt_text(self, question: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """Chat prompt up to the assistant header; the image goes into the first user turn."""
        if not history:
            return self.formatter.format_prompt(question)
        first = self.formatter.format_prompt(history[0][0])
        text = first + self.formatter.format_response(history[0][1])
        for q, a in [*history[1:], (question, None)]:
            text += f"{START_HEADER_TOKEN}user{END_HEADER_TOKEN}\n\n{q}{EOT_TOKEN}"
            text += f"{START_HEADER_TOKEN}assistant{END_HEADER_TOKEN}\n\n"
            if a is not None:
                text += self.formatter.format_response(a)
        return text

    def response_text(self, answer: str) -> str:
        return self.formatter.format_response(answer)

    def encode(self, text: str) -> list[int]:
        return tokenize_with_image(self.tokenizer, text, self.image_token_index)


def default_instruct_text(tokenizer_path: str | None = None) -> LladaVInstructText:
    """The tiny LLaDA-V's interface: ``tokenizer_path`` (default: the embedded tokenizer), the default prompt
    format and the ids of :meth:`LladaVConfig.tiny`."""
    from model_families.mdlm.config import LladaVConfig
    from model_families.mdlm.tokenizer import load_embedded_tokenizer, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else load_embedded_tokenizer()
    return LladaVInstructText.from_config(tokenizer, PromptFormatter(), LladaVConfig.tiny(tokenizer))
