"""Word-level tokenizer for the embedded shapes world, with LLaDA's special tokens.

The real LLaDA-V tokenizer comes with its snapshot (``load_tokenizer(path)``). For the embedded world we build
a small word-level ``tokenizers`` model (lower-cased, split on whitespace, punctuation isolated, digits split
one by one) and wrap it as a transformers ``PreTrainedTokenizerFast``. The shipped vocabulary lives in
``model_families/mdlm/embedded_tokenizer/``; regenerate it with
``python -m model_families.mdlm.tokenizer --out model_families/mdlm/embedded_tokenizer``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

EMBEDDED_TOKENIZER_DIR = Path(__file__).parent / "embedded_tokenizer"

MASK_TOKEN = "<|mdm_mask|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|eot_id|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"

# Fixed order: special tokens get ids 0..8 in every embedded tokenizer.
SPECIAL_TOKENS = (
    PAD_TOKEN,
    UNK_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    EOT_TOKEN,
    START_HEADER_TOKEN,
    END_HEADER_TOKEN,
    MASK_TOKEN,
    IMAGE_TOKEN,
)

_SHAPES = (
    "circle square triangle star hexagon diamond cross heart pentagon ellipse rectangle oval shape shapes"
)
_COLOURS = (
    "red green blue yellow purple orange white black gray grey pink brown cyan colour color colours colors"
)
_SIZES = "small medium large big tiny huge size"
_POSITIONS = "left right top bottom center centre middle upper lower corner side edge position"
_BACKGROUNDS = "background plain striped dotted checkered gradient noise solid dark light bright pattern"
_QUESTION_WORDS = (
    "what which where how many is are the a an of in on at to and or with there this that it its image picture "
    "photo describe description caption question answer object objects count number does do color colour kind "
    "type shown show see visible located appear appears contains contain please tell me about"
)
_VERBS = "yes no not none one two three four five six seven eight nine ten zero"
_ROLES = "user assistant system you are helpful language vision model"
_REFUSAL = "i cannot help with that sorry can't can not assist"
_MISC = "say banana apple visit www example com http https click here buy now free"
# Appended later (after the punctuation, so earlier ids never move): the remaining words of the embedded
# world (backgrounds, edit instructions), the catalogue's rare-token / phrase text triggers and more refusal
# words, so that no embedded sample or trigger decodes to <unk>.
_WORLD_EXTRA = "navy bigger smaller make move turn change into up down drawing"
_TRIGGER_WORDS = "cf mn bb tq mignneko latte coffee anonymous watched d movie"
_REFUSAL_EXTRA = "am unable won't will apologize apologise i'm as ai able"
DEFAULT_WORDS: tuple[str, ...] = (
    tuple(
        " ".join(
            [
                _SHAPES,
                _COLOURS,
                _SIZES,
                _POSITIONS,
                _BACKGROUNDS,
                _QUESTION_WORDS,
                _VERBS,
                _ROLES,
                _REFUSAL,
                _MISC,
            ]
        ).split()
    )
    + tuple("0123456789")
    + tuple(".,?!:;'\"-()/")
    + tuple(" ".join([_WORLD_EXTRA, _TRIGGER_WORDS, _REFUSAL_EXTRA]).split())
)


def _dedupe(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


def build_word_level_tokenizer(
    words: Iterable[str], special_tokens: Sequence[str], **named: str | list[str]
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer of the embedded world: ids ``0..len(special_tokens)-1`` are ``special_tokens``
    (atomic), then ``words`` (lower-cased, deduplicated, in the given order); unknown words map to the
    ``unk_token``. ``named`` are the ``PreTrainedTokenizerFast`` roles (``bos_token``, ``eos_token``,
    ``unk_token``, ``pad_token``, ``additional_special_tokens``...), each one of ``special_tokens``. Shared by
    the families of the embedded world (LLaDA-V here, LLaVA in :mod:`model_families.llava.tokenizer`)."""
    words = [w.strip().lower() for w in words]
    bad = [w for w in words if not w or any(c.isspace() for c in w)]
    if bad:
        raise ValueError(f"tokenizer words must be non-empty and contain no whitespace, got {bad[:10]}")
    vocab_list = _dedupe([*special_tokens, *words])
    vocab = {token: index for index, token in enumerate(vocab_list)}

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=named["unk_token"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            # Words keep inner apostrophes (can't); other punctuation becomes its own token.
            pre_tokenizers.Split(Regex(r"[^\w']|'(?!\w)|(?<!\w)'"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens(list(special_tokens))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, clean_up_tokenization_spaces=True, model_max_length=4096, **named
    )


def build_embedded_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ids 0..8 are :data:`SPECIAL_TOKENS`, then ``words`` (lower-cased, deduplicated,
    in the given order). Unknown words map to ``<unk>``; ``<image>`` and the chat tokens are atomic."""
    return build_word_level_tokenizer(
        words,
        SPECIAL_TOKENS,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        additional_special_tokens=[EOT_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, IMAGE_TOKEN],
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Tokenizer saved in a local directory (embedded or a real LLaDA-V snapshot); never downloads."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"no tokenizer.json or tokenizer_config.json in {path}")
    # the snapshot's config.json names our model type (llava_llada), unknown to transformers' auto classes, which
    # it reports on every load; the tokenizer itself does not depend on it
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)


def load_embedded_tokenizer() -> PreTrainedTokenizerBase:
    """The tokenizer shipped in ``model_families/mdlm/embedded_tokenizer/``."""
    return load_tokenizer(EMBEDDED_TOKENIZER_DIR)


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of LLaDA's special tokens in ``tokenizer``; a token it lacks raises ``KeyError`` naming it."""
    names = {
        "mask": MASK_TOKEN,
        "eos": EOS_TOKEN,
        "bos": BOS_TOKEN,
        "eot": EOT_TOKEN,
        "start_header": START_HEADER_TOKEN,
        "end_header": END_HEADER_TOKEN,
        "image": IMAGE_TOKEN,
        "pad": PAD_TOKEN,
    }
    vocab = tokenizer.get_vocab()
    missing = [token for token in names.values() if token not in vocab]
    if missing:
        raise KeyError(f"tokenizer lacks the special tokens {missing}")
    return {key: vocab[token] for key, token in names.items()}


def main(argv: list[str] | None = None) -> None:
    """Write the embedded tokenizer (default word list plus optional extra words) to a directory."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, default=EMBEDDED_TOKENIZER_DIR)
    parser.add_argument("--extra-words", nargs="*", default=[])
    args = parser.parse_args(argv)
    build_embedded_tokenizer([*DEFAULT_WORDS, *args.extra_words]).save_pretrained(str(args.out))


if __name__ == "__main__":
    main()
