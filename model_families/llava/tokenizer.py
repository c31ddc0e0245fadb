"""The embedded world's LLaVA tokenizer: the word-level vocabulary of the tiny LLaDA-V with LLaMA's special
tokens, built offline.

Ids ``0..4`` are ``<unk>``, ``<s>`` (BOS), ``</s>`` (EOS, which also ends an answer), ``<pad>`` and ``<image>``
(the image slot), as in LLaMA / llava-hf (unk 0, bos 1, eos 2; llava-hf adds ``<image>`` and ``<pad>`` after the
vocabulary). The words follow in the order of :data:`model_families.mdlm.tokenizer.DEFAULT_WORDS` (every word
of the embedded world, the chat roles and the catalogue's text triggers). The shipped files live in
``model_families/llava/embedded_tokenizer/``; regenerate them with
``python -m model_families.llava.tokenizer --out model_families/llava/embedded_tokenizer``. A real snapshot's
tokenizer is read from its folder (:func:`model_families.mdlm.tokenizer.load_tokenizer`, local files only).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from model_families.mdlm.tokenizer import DEFAULT_WORDS, build_word_level_tokenizer, load_tokenizer

__all__ = [
    "EMBEDDED_TOKENIZER_DIR",
    "SPECIAL_TOKENS",
    "build_embedded_tokenizer",
    "load_embedded_tokenizer",
    "load_tokenizer",
]

EMBEDDED_TOKENIZER_DIR = Path(__file__).parent / "embedded_tokenizer"
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN = "<unk>", "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN)  # ids 0..4


def build_embedded_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: :data:`SPECIAL_TOKENS` (ids 0..4), then ``words`` lower-cased and deduplicated."""
    return build_word_level_tokenizer(
        words,
        SPECIAL_TOKENS,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IMAGE_TOKEN],
    )


def load_embedded_tokenizer() -> PreTrainedTokenizerBase:
    """The tokenizer shipped in ``model_families/llava/embedded_tokenizer/``."""
    return load_tokenizer(EMBEDDED_TOKENIZER_DIR)


def main(argv: list[str] | None = None) -> None:
    """Write the embedded LLaVA tokenizer (default word list plus optional extra words) to a directory."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, default=EMBEDDED_TOKENIZER_DIR)
    parser.add_argument("--extra-words", nargs="*", default=[])
    args = parser.parse_args(argv)
    build_embedded_tokenizer([*DEFAULT_WORDS, *args.extra_words]).save_pretrained(str(args.out))


if __name__ == "__main__":
    main()
