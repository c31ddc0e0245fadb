"""Building the LLaVA model, tokenizer and chat template a run starts from: the tiny embedded model
(``tiny-llava-shapes`` with overrides, the embedded LLaVA tokenizer) or a llava-hf snapshot folder (a real
download or an mmbackdoor export) with its own tokenizer and chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlavaForConditionalGeneration

from model_families.llava.chat import LlavaChatTemplate
from model_families.llava.config import image_statistics, llava_config
from model_families.llava.snapshot import LlavaSnapshot, load_snapshot
from model_families.llava.tokenizer import load_embedded_tokenizer, load_tokenizer

__all__ = ["build_tiny", "load_for_finetuning"]


def build_tiny(
    tokenizer: Any = None, overrides: dict | None = None, template: LlavaChatTemplate | None = None
) -> LlavaSnapshot:
    """A randomly initialised ``tiny-llava-shapes`` model for ``tokenizer`` (default: the embedded one), with
    ``overrides`` of :func:`model_families.llava.config.tiny_shapes` (``vision`` / ``text`` dicts, LlavaConfig
    keys, ``vision_tower``); the image statistics follow the tower (:func:`~model_families.llava.config.
    image_statistics`: SigLIP's ``[-1, 1]`` for ``vision_tower: siglip``, CLIP's otherwise)."""
    tokenizer = tokenizer if tokenizer is not None else load_embedded_tokenizer()
    template = template or LlavaChatTemplate()
    vocab = tokenizer.get_vocab()
    ids = {
        "vocab_size": len(tokenizer),
        "image_token_index": vocab.get(template.image_placeholder, -1),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    clash = sorted(set(overrides or {}) & set(ids))
    if clash:
        raise ValueError(f"model.tiny_config keys {clash} come from the tokenizer; they cannot be overridden")
    try:
        config = llava_config("tiny-llava-shapes", **ids, **(overrides or {}))
    except TypeError as error:
        raise ValueError(f"model.tiny_config: {error}") from None
    mean, std = image_statistics(config)
    return LlavaSnapshot(LlavaForConditionalGeneration(config), tokenizer, template, mean, std)


def load_for_finetuning(
    init_from: str | None,
    tiny_config: dict | None = None,
    tokenizer_path: str | None = None,
    load_dtype: str | None = None,
    chat_template: dict | None = None,
) -> LlavaSnapshot:
    """The tiny model without ``init_from``, else the snapshot's model, tokenizer (unless ``tokenizer_path``)
    and chat template (unless ``chat_template`` overrides keys of it)."""
    if init_from is None:
        tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
        return build_tiny(tokenizer, tiny_config, LlavaChatTemplate(**(chat_template or {})))
    if str(init_from).endswith(".ckpt"):
        raise ValueError(
            f"model.init_from={init_from}: give a snapshot/export folder (e.g. <run>/export), not a Lightning .ckpt"
        )
    if tiny_config:
        raise ValueError(
            "model.tiny_config only applies without model.init_from (the snapshot fixes the architecture)"
        )
    snapshot = load_snapshot(Path(init_from), dtype=getattr(torch, load_dtype) if load_dtype else None)
    if tokenizer_path:
        snapshot.tokenizer = load_tokenizer(tokenizer_path)
    if chat_template:
        fields = {**snapshot.template.to_dict(), **chat_template}
        snapshot.template = LlavaChatTemplate.from_dict(fields, where="model.chat_template")
    return snapshot.__class__(
        snapshot.model.train(), snapshot.tokenizer, snapshot.template, snapshot.image_mean, snapshot.image_std
    )
