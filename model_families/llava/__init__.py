"""LLaVA-style autoregressive vision-language models (the llava family), on transformers'
``LlavaForConditionalGeneration`` (CLIP or SigLIP vision tower, GELU projector, LLaMA LM; no remote code).

- ``config``: the registered sizes (``tiny-llava-shapes`` for the embedded world, ``llava-1.5-7b``) and the
  image-token check.
- ``tokenizer``: the embedded world's offline word-level tokenizer with LLaMA's special tokens.
- ``chat``: LLaVA-1.5's chat template (:class:`LlavaChatTemplate`), saved with every snapshot.
- ``instruct_text``: the instruction datamodule's text interface (``data.family: llava``).
- ``modeling``: batch -> model inputs (image-slot expansion, normalisation, positions, response labels).
- ``generation``: batched ``generate`` (greedy / sampling / beams) on left-padded prompts.
- ``snapshot`` / ``build``: llava-hf layout snapshots (``save_snapshot`` / ``load_snapshot``) and what a run
  starts from.
"""

from model_families.llava.build import build_tiny, load_for_finetuning
from model_families.llava.chat import LlavaChatTemplate
from model_families.llava.config import REGISTRY, check_image_tokens, llava_config, num_image_tokens
from model_families.llava.generation import LlavaGeneration, generate_answers
from model_families.llava.instruct_text import LlavaInstructText
from model_families.llava.snapshot import LlavaSnapshot, SnapshotError, load_snapshot, save_snapshot

__all__ = [
    "REGISTRY",
    "LlavaChatTemplate",
    "LlavaGeneration",
    "LlavaInstructText",
    "LlavaSnapshot",
    "SnapshotError",
    "build_tiny",
    "check_image_tokens",
    "generate_answers",
    "llava_config",
    "load_for_finetuning",
    "load_snapshot",
    "num_image_tokens",
    "save_snapshot",
]
