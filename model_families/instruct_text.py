"""What an instruction datamodule needs from a generative VLM family: its tokenizer and chat template.

:class:`InstructText` is the whole interface between :mod:`datamodules.instruct` and a family (LLaDA-V in
:mod:`model_families.mdlm.instruct_text`; a LLaVA family supplies its own). The datamodule asks the attached
LightningModule for it (``module.instruct_text()``, the checkpoint's own tokenizer and template), so training
and evaluation format prompts the same way; without a module (tests, scripts, benchmarks) it builds the
family's default from :data:`INSTRUCT_TEXT_FAMILIES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["INSTRUCT_TEXT_FAMILIES", "InstructText", "default_instruct_text"]


@runtime_checkable
class InstructText(Protocol):
    """A family's tokenizer and chat template, as the instruction collator uses them.

    Sequences are ``[left padding][prompt][response + eot + eos padding]``: ``prompt_text`` ends with the
    assistant header, ``response_text`` closes the answer (e.g. with ``<|eot_id|>``), ``encode`` turns text
    into ids with the image placeholder mapped to ``image_token_index``.

    Attributes:
        image_placeholder: the image slot's text in prompts (``"<image>"``), named in error messages.
        image_token_index: its id in ``input_ids``.
        eos_id: pads responses to the datamodule's ``response_length``.
        eot_id: the last token of a response (kept when a long response is cut).
        pad_id: left padding of prompts (attention mask 0).
    """

    image_placeholder: str
    image_token_index: int
    eos_id: int
    eot_id: int
    pad_id: int

    def prompt_text(self, question: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """Chat prompt up to the assistant header; the image goes into the first user turn."""
        ...

    def response_text(self, answer: str) -> str:
        """The answer as the model should produce it (closed by the end-of-turn token)."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added) with the image placeholder's id in its slot."""
        ...


# family name -> module with ``default_instruct_text(tokenizer_path: str | None) -> InstructText``
INSTRUCT_TEXT_FAMILIES: dict[str, str] = {
    "mdlm": "model_families.mdlm.instruct_text",
    "llava": "model_families.llava.instruct_text",
}


def default_instruct_text(family: str, tokenizer_path: str | None = None) -> InstructText:
    """The family's tokenizer (``tokenizer_path``, or its default one) and chat template, for a datamodule
    used without a LightningModule."""
    if family not in INSTRUCT_TEXT_FAMILIES:
        raise ValueError(
            f"data.family={family!r} has no instruction text interface; expected one of "
            f"{sorted(INSTRUCT_TEXT_FAMILIES)}"
        )
    text = importlib.import_module(INSTRUCT_TEXT_FAMILIES[family]).default_instruct_text(tokenizer_path)
    check_instruct_text(text, f"family {family!r}")
    return text


def check_instruct_text(text: object, origin: str) -> None:
    """Raise ``TypeError`` naming ``origin`` and the missing members when ``text`` is not an
    :class:`InstructText`."""
    members = ("image_placeholder", "image_token_index", "eos_id", "eot_id", "pad_id")
    missing = [m for m in (*members, "prompt_text", "response_text", "encode") if not hasattr(text, m)]
    if missing:
        raise TypeError(f"{origin} gave {type(text).__name__}, which lacks InstructText members {missing}")
