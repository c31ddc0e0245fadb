"""An offline CLIP tokenizer: transformers' ``CLIPTokenizer`` built from the BPE file open_clip ships.

The released InstructPix2Pix snapshot has its own ``tokenizer/`` folder; the embedded world and tests have no
hub access, so the vocabulary is rebuilt the way CLIP's tokenizer builds it from ``bpe_simple_vocab_16e6.txt.gz``
(open_clip ``SimpleTokenizer``): the 256 byte-level unicode characters, the same with ``</w>``, one token per
merge (48,894 merges), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49,408 tokens.

In transformers 5 the vocabulary must be given as ``CLIPTokenizer(vocab=dict, merges=list)``: the older
``vocab_file=`` / ``merges_file=`` arguments are accepted and ignored (every token becomes unknown), which
``tests/test_pix2pix_family.py`` guards by comparing ids with open_clip's.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# merges used by CLIP: lines 1 .. 49152 - 256 - 2 of the file (line 0 is a version header)
N_MERGES = 49152 - 256 - 2


@lru_cache(maxsize=2)
def clip_bpe_vocab(bpe_path: str | None = None) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's vocabulary (token -> id) and merges (in rank order) from the gzipped BPE file."""
    path = Path(bpe_path or default_bpe())
    if not path.is_file():
        raise FileNotFoundError(f"CLIP BPE file not found: {path}")
    lines = gzip.open(path).read().decode("utf-8").split("\n")[1 : N_MERGES + 1]
    merges = tuple(tuple(line.split()) for line in lines)
    bad = [i + 1 for i, m in enumerate(merges) if len(m) != 2]
    if bad or len(merges) != N_MERGES:
        raise ValueError(f"{path}: expected {N_MERGES} merges of two symbols, bad lines {bad[:5]}")
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def build_clip_tokenizer(model_max_length: int = 77, bpe_path: str | None = None) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` equal to openai/clip-vit-large-patch14's (ids, padding with ``<|endoftext|>``),
    built offline; ``model_max_length`` is the padded length (77 for Stable Diffusion)."""
    vocab, merges = clip_bpe_vocab(bpe_path)
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=model_max_length,
    )
