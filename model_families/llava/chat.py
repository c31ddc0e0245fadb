"""LLaVA-1.5's chat template (``conv_vicuna_v1`` / the ``llava-hf`` processor's prompt), saved with every
checkpoint and export (``prompt_format.json``) and read back for training and evaluation alike, so that the
two never format prompts differently.

A single-turn prompt and its response read::

    <s>USER: <image>\\n{question} ASSISTANT:| {answer}</s>

and a later turn of a conversation ``USER: {question} ASSISTANT:`` after the previous ``{answer}</s>``. The
image goes into the first user turn, in the one image slot of ``prompt``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from attacks.io import atomic_write_text
from model_families.loading import read_json_file

__all__ = ["PROMPT_FORMAT_NAME", "LlavaChatTemplate"]

PROMPT_FORMAT_NAME = "prompt_format.json"
STYLE = "llava_v1"


@dataclass(frozen=True)
class LlavaChatTemplate:
    """The prompt and response formats (``{question}`` / ``{answer}`` are filled in by text replacement, so
    braces in questions are kept as they are).

    Args:
        prompt: the first user turn up to the assistant header, with the one ``image_placeholder`` slot.
        turn: a later user turn (no image slot).
        response: the answer as the model produces it, closed by the end-of-sequence token.
        image_placeholder: the image slot's text (a special token of the tokenizer).
        style: the template's name, checked when read back.
    """

    prompt: str = "<s>USER: <image>\n{question} ASSISTANT:"
    turn: str = "USER: {question} ASSISTANT:"
    response: str = " {answer}</s>"
    image_placeholder: str = "<image>"
    style: str = STYLE

    def __post_init__(self) -> None:
        if self.style != STYLE:
            raise ValueError(f"chat template style {self.style!r}; expected {STYLE!r}")
        slots = self.prompt.count(self.image_placeholder)
        if slots != 1:
            raise ValueError(
                f"chat template prompt {self.prompt!r} holds {slots} image slots {self.image_placeholder!r}; "
                f"it needs exactly one (LLaVA-1.5: 'USER: {self.image_placeholder}\\n{{question}} ASSISTANT:')"
            )
        for name, field, needed in (
            ("prompt", self.prompt, "{question}"),
            ("turn", self.turn, "{question}"),
            ("response", self.response, "{answer}"),
        ):
            if needed not in field:
                raise ValueError(f"chat template {name} {field!r} lacks the {needed} slot")
        if self.image_placeholder in self.turn:
            raise ValueError(
                f"chat template turn {self.turn!r} must not hold an image slot (one image per chat)"
            )

    def prompt_text(self, question: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """The chat up to the assistant header of ``question``; the image is in the first user turn."""
        turns = [*history, (question, None)]
        text = self.prompt.replace("{question}", turns[0][0])
        for index, (q, a) in enumerate(turns):
            if index:
                text += self.turn.replace("{question}", q)
            if a is not None:
                text += self.response_text(a)
        return text

    def response_text(self, answer: str) -> str:
        return self.response.replace("{answer}", answer)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "chat template") -> LlavaChatTemplate:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"{where}: unknown chat template keys {sorted(unknown)}; expected {sorted(cls.__dataclass_fields__)}"
            )
        try:
            return cls(**data)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``prompt_format.json`` into ``folder`` (atomically)."""
        path = Path(folder) / PROMPT_FORMAT_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> LlavaChatTemplate:
        """The template saved in ``folder``; a missing or invalid file is an error naming it."""
        path = Path(folder) / PROMPT_FORMAT_NAME
        return cls.from_dict(read_json_file(path, what="LLaVA chat template"), where=str(path))
