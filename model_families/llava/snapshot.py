"""Snapshots in the ``llava-hf`` layout (``llava-hf/llava-1.5-7b-hf``): what transformers' ``save_pretrained``
writes, plus the tokenizer, the image statistics and the chat template::

    config.json                         LlavaConfig (model_type "llava")
    model.safetensors | model-0000X-of-0000N.safetensors + model.safetensors.index.json
    tokenizer.json / tokenizer_config.json ...
    preprocessor_config.json            CLIPImageProcessor settings (image_mean / image_std / size)
    prompt_format.json                  ours: the chat template trained with (LLaVA-1.5's when absent)
    mmbackdoor_export.json              ours (exports): family, module, generation, inputs, run config

Read with ``LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True, use_safetensors=True)``:
safetensors only (a folder with only ``pytorch_model.bin`` is refused, never unpickled), no remote code, no
download. A missing folder or component is an error naming it; so are weights that do not fit ``config.json``
(transformers would only log them and initialise the rest at random) and an image-token count that does not
match the vision tower.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlavaForConditionalGeneration

from attacks.io import set_default_mode
from model_families.finite import assert_finite_state
from model_families.llava.chat import PROMPT_FORMAT_NAME, LlavaChatTemplate
from model_families.llava.config import CLIP_MEAN, CLIP_STD, check_image_tokens
from model_families.loading import read_json_file
from model_families.mdlm.tokenizer import load_tokenizer

__all__ = ["LlavaSnapshot", "SnapshotError", "load_snapshot", "save_snapshot"]

PREPROCESSOR_NAME = "preprocessor_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class SnapshotError(ValueError):
    """A LLaVA snapshot folder is incomplete or inconsistent; the message names the file or component."""


@dataclass
class LlavaSnapshot:
    """What a snapshot holds: the model, its tokenizer and chat template, and the image statistics."""

    model: LlavaForConditionalGeneration
    tokenizer: Any
    template: LlavaChatTemplate
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD


def preprocessor_config(image_size: int, mean: tuple, std: tuple) -> dict:
    """``preprocessor_config.json`` of LLaVA-1.5's CLIPImageProcessor at ``image_size``."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_convert_rgb": True,
    }


def save_snapshot(snapshot: LlavaSnapshot, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write ``snapshot`` in the llava-hf layout at ``path`` (a new folder), atomically (temp folder +
    rename); ``meta`` goes to ``mmbackdoor_export.json``. Non-finite weights are refused (nothing is
    written); an existing folder is never overwritten."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"snapshot folder already exists, refusing to overwrite: {path}")
    model = snapshot.model
    assert_finite_state(model.state_dict(), where=f"snapshot {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        snapshot.tokenizer.save_pretrained(str(tmp))
        size = int(model.config.vision_config.image_size)
        stats = preprocessor_config(size, snapshot.image_mean, snapshot.image_std)
        (tmp / PREPROCESSOR_NAME).write_text(json.dumps(stats, indent=2) + "\n")
        snapshot.template.save(tmp)
        if meta is not None:
            (tmp / "mmbackdoor_export.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        set_default_mode(tmp)
        for file in tmp.rglob("*"):  # safetensors writes 0600; a snapshot holds ordinary shared files
            set_default_mode(file)
        if path.exists():
            raise FileExistsError(f"snapshot folder appeared while writing, refusing to overwrite: {path}")
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check_files(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"LLaVA snapshot folder not found: {path}")
    config = read_json_file(path / "config.json", ("model_type",), what="LLaVA config")
    if config["model_type"] != "llava":
        raise SnapshotError(
            f"{path / 'config.json'}: model_type is {config['model_type']!r}, expected 'llava' "
            "(a llava-hf snapshot, LlavaForConditionalGeneration)"
        )
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.glob("*.bin"))
        hint = (
            f" (found {found}: pickled weights are never loaded; convert them to safetensors)"
            if found
            else ""
        )
        raise SnapshotError(f"{path}: no *.safetensors weights{hint}")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise SnapshotError(f"{path}: tokenizer component missing (none of {list(TOKENIZER_FILES)})")
    if not (path / PREPROCESSOR_NAME).is_file():
        raise SnapshotError(
            f"{path}: {PREPROCESSOR_NAME} missing (the image statistics the vision tower was trained with)"
        )


def load_snapshot(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> LlavaSnapshot:
    """Load a llava-hf snapshot (released or written by :func:`save_snapshot`); ``dtype`` defaults to the
    config's."""
    path = Path(path)
    _check_files(path)
    kwargs = {"dtype": dtype} if dtype is not None else {"dtype": "auto"}
    model, info = LlavaForConditionalGeneration.from_pretrained(
        path, local_files_only=True, use_safetensors=True, output_loading_info=True, **kwargs
    )
    problems = {k: list(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        listed = "; ".join(
            f"{k}: {', '.join(map(str, v[:5]))}" + (" ..." if len(v) > 5 else "") for k, v in problems.items()
        )
        raise SnapshotError(f"{path}: weights do not match its config.json ({listed})")
    check_image_tokens(model.config, where=str(path / "config.json"))
    assert_finite_state(model.state_dict(), where=str(path), hint="the snapshot holds a diverged model")
    stats = read_json_file(
        path / PREPROCESSOR_NAME, ("image_mean", "image_std"), what="image processor config"
    )
    template = LlavaChatTemplate.load(path) if (path / PROMPT_FORMAT_NAME).is_file() else LlavaChatTemplate()
    return LlavaSnapshot(
        model.to(device).eval(),
        load_tokenizer(path),
        template,
        tuple(stats["image_mean"]),
        tuple(stats["image_std"]),
    )
