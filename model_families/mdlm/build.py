"""Building the LLaDA-V model, tokenizer and prompt format a fine-tuning run starts from.

Either the tiny embedded model (:meth:`LladaVConfig.tiny` with nested overrides, the embedded tokenizer) or a
snapshot folder in the released LLaDA-V layout (a real download or an mmbackdoor export) with its own
tokenizer and saved prompt format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model_families.mdlm.checkpoint import PROMPT_FORMAT_NAME, load_prompt_formatter, load_snapshot
from model_families.mdlm.config import LladaVConfig
from model_families.mdlm.modeling import LladaVModel
from model_families.mdlm.prompt import PromptFormatter
from model_families.mdlm.tokenizer import load_embedded_tokenizer, load_tokenizer


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def build_tiny_model(tokenizer: Any, overrides: dict | None = None) -> LladaVModel:
    """A tiny LLaDA-V for the embedded world: ``LladaVConfig.tiny`` with nested ``overrides`` (``vision`` /
    ``text`` dicts are merged key by key)."""
    base = LladaVConfig.tiny(tokenizer)
    fields = {k: getattr(base, k) for k in base.__dataclass_fields__}
    unknown = set(overrides or {}) - set(fields)
    if unknown:
        raise ValueError(
            f"model.tiny_config has unknown keys {sorted(unknown)}; expected some of {sorted(fields)}"
        )
    return LladaVModel(LladaVConfig(**_merge(fields, overrides or {})))


def load_for_finetuning(
    init_from: str | None,
    tiny_config: dict | None = None,
    tokenizer_path: str | None = None,
    load_dtype: str | None = None,
) -> tuple[LladaVModel, Any, PromptFormatter]:
    """``(model, tokenizer, prompt formatter)``: the tiny model without ``init_from``, else the snapshot's
    (its tokenizer unless ``tokenizer_path`` is given; errors name the folder and the missing file)."""
    if init_from is None:
        tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else load_embedded_tokenizer()
        return build_tiny_model(tokenizer, tiny_config), tokenizer, PromptFormatter()
    path = Path(init_from)
    if str(init_from).endswith(".ckpt"):
        raise ValueError(
            f"model.init_from={init_from}: give a snapshot/export folder (e.g. <run>/export), not a Lightning "
            ".ckpt; exports are written at the end of every fit"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"model.init_from: snapshot directory not found: {path}")
    if tiny_config:
        raise ValueError(
            "model.tiny_config only applies without model.init_from (the snapshot fixes the architecture)"
        )
    dtype = getattr(torch, load_dtype) if load_dtype else None
    model = load_snapshot(path, dtype=dtype).train()
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
    elif (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(path)
    else:
        raise FileNotFoundError(
            f"no tokenizer in snapshot {path} (tokenizer.json / tokenizer_config.json); pass model.tokenizer"
        )
    formatter = load_prompt_formatter(path) if (path / PROMPT_FORMAT_NAME).is_file() else PromptFormatter()
    return model, tokenizer, formatter
