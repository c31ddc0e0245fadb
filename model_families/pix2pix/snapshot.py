"""Snapshots in the diffusers folder layout of InstructPix2Pix (``timbrooks/instruct-pix2pix``)::

    model_index.json          diffusers' pipeline index (StableDiffusionInstructPix2PixPipeline)
    unet/                     config.json + diffusion_pytorch_model.safetensors
    text_encoder/             config.json + model.safetensors
    tokenizer/                CLIPTokenizer files
    scheduler/                scheduler_config.json (the training noise schedule)
    vae/                      AutoencoderKL (codec "vae" only)
    mmbackdoor.json           ours: family, the full Pix2PixConfig (codec, residual, ...), inputs, run config;
                              absent in a released snapshot, which means codec "vae", no residual and a config
                              read back from the components' own configs

Every component is read with ``from_pretrained(folder, local_files_only=True)`` and safetensors only (never a
pickle, never ``trust_remote_code``, never a download). A missing snapshot folder, component folder or index is
an error naming it; so is a tokenizer that maps ordinary words to the unknown token.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import diffusers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from attacks.io import set_default_mode
from model_families.finite import assert_finite_state
from model_families.loading import input_provenance, read_json_file
from model_families.pix2pix.codec import PixelUnshuffleCodec, VaeCodec
from model_families.pix2pix.config import Pix2PixConfig
from model_families.pix2pix.modeling import Pix2PixModel

INDEX = "model_index.json"
META = "mmbackdoor.json"
PIPELINE_CLASS = "StableDiffusionInstructPix2PixPipeline"
COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")
_TEXT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "projection_dim",
    "layer_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
_DERIVED = ("in_channels", "out_channels", "sample_size")
_PROBE = "make the square red"  # ordinary words: none may map to the unknown token


class SnapshotError(ValueError):
    """A snapshot folder is incomplete or inconsistent; the message names the file or component."""


def save_snapshot(
    model: Pix2PixModel, path: str | os.PathLike, run_config: dict | None = None, inputs: dict | None = None
) -> Path:
    """Write ``model`` as a diffusers-layout snapshot, atomically (temp folder + rename).

    An existing folder is never overwritten; non-finite weights are refused (nothing is written).
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"snapshot folder already exists, refusing to overwrite: {path}")
    parts: dict[str, Any] = {"unet": model.unet, "text_encoder": model.text_encoder}
    if isinstance(model.codec, VaeCodec):
        parts["vae"] = model.codec.vae
    for name, module in parts.items():
        assert_finite_state(module.state_dict(), where=f"snapshot {path} ({name})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        set_default_mode(tmp)
        for name, module in parts.items():
            module.save_pretrained(tmp / name, safe_serialization=True)
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        model.noise_scheduler.save_pretrained(tmp / "scheduler")
        index = {
            "_class_name": PIPELINE_CLASS,
            "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", type(model.noise_scheduler).__name__],
            "vae": ["diffusers", "AutoencoderKL"] if "vae" in parts else [None, None],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
        }
        (tmp / INDEX).write_text(json.dumps(index, indent=2))
        meta = {
            "family": "pix2pix",
            "config": model.config.to_json_dict(),
            "inputs": inputs or {},
            "run_config": run_config or {},
        }
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
        for file in tmp.rglob("*"):
            set_default_mode(file)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _component(path: Path, name: str) -> Path:
    folder = path / name
    if not folder.is_dir():
        raise SnapshotError(
            f"{path}: component folder {name}/ is missing (expected the diffusers layout "
            f"{', '.join(c + '/' for c in COMPONENTS)} and vae/ for a latent model)"
        )
    return folder


def _load_text_encoder(folder: Path) -> CLIPTextModel:
    """``CLIPTextModel.from_pretrained`` that refuses a partial load (transformers only logs missing weights
    and initialises them at random); released ``text_model.*`` names load through transformers' own mapping."""
    model, info = CLIPTextModel.from_pretrained(
        folder, local_files_only=True, use_safetensors=True, output_loading_info=True
    )
    problems = {k: list(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        listed = "; ".join(
            f"{k}: {', '.join(map(str, v[:5]))}" + (" ..." if len(v) > 5 else "") for k, v in problems.items()
        )
        raise SnapshotError(f"{folder}: text encoder weights do not match its config.json ({listed})")
    return model


def _checked_tokenizer(folder: Path, max_length: int) -> CLIPTokenizer:
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tokenizer(_PROBE).input_ids[1:-1]
    if not ids or tokenizer.unk_token_id in ids:
        raise SnapshotError(
            f"{folder}: the tokenizer maps ordinary words to the unknown token ({_PROBE!r} -> {ids}); its "
            "vocabulary did not load (vocab.json / merges.txt / tokenizer.json missing or ignored)"
        )
    tokenizer.model_max_length = max_length
    return tokenizer


def load_snapshot(path: str | os.PathLike, device: str = "cpu") -> Pix2PixModel:
    """Load a diffusers-layout InstructPix2Pix snapshot (released or written by :func:`save_snapshot`)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"pix2pix snapshot folder not found: {path}")
    index = read_json_file(path / INDEX, what="diffusers model index")
    meta = (
        read_json_file(path / META, ("family",), what="mmbackdoor snapshot metadata")
        if (path / META).is_file()
        else {"family": "pix2pix"}
    )
    if meta["family"] != "pix2pix":
        raise SnapshotError(f"{path / META}: family is {meta['family']!r}, expected 'pix2pix'")
    recorded = meta.get("config")
    if recorded is not None and not isinstance(recorded, dict):
        raise SnapshotError(f"{path / META}: 'config' must be a JSON object, got {type(recorded).__name__}")
    codec_kind = (recorded or {}).get("codec", "vae")
    if codec_kind == "vae" and (index.get("vae") or [None])[0] is None:
        raise SnapshotError(
            f"{path / INDEX}: no vae component, but the snapshot is a latent (codec 'vae') model"
        )
    names = (*COMPONENTS, *(("vae",) if codec_kind == "vae" else ()))
    folders = {name: _component(path, name) for name in names}
    unet = UNet2DConditionModel.from_pretrained(folders["unet"], local_files_only=True, use_safetensors=True)
    text_encoder = _load_text_encoder(folders["text_encoder"])
    scheduler = DDPMScheduler.from_pretrained(folders["scheduler"], local_files_only=True)
    vae = (
        AutoencoderKL.from_pretrained(folders["vae"], local_files_only=True, use_safetensors=True)
        if codec_kind == "vae"
        else None
    )
    try:
        if recorded is not None:
            config = Pix2PixConfig.from_json_dict(recorded)
        else:
            config = _released_config(unet, text_encoder, scheduler, vae)
    except (TypeError, ValueError) as error:
        raise SnapshotError(
            f"{path / META if recorded is not None else path}: invalid config: {error}"
        ) from None
    codec = VaeCodec(vae) if vae is not None else PixelUnshuffleCodec(config.unshuffle_factor)
    tokenizer = _checked_tokenizer(folders["tokenizer"], config.max_text_length)
    try:
        model = Pix2PixModel(
            config, tokenizer, unet=unet, text_encoder=text_encoder, codec=codec, noise_scheduler=scheduler
        )
    except ValueError as error:
        raise SnapshotError(f"{path}: {error}") from None
    return model.to(device)


def _released_config(unet, text_encoder, scheduler, vae) -> Pix2PixConfig:
    """The :class:`Pix2PixConfig` of a released snapshot (no ``mmbackdoor.json``), read from its components."""
    text_config = text_encoder.config.to_dict()
    return Pix2PixConfig(
        unet={k: v for k, v in unet.config.items() if not k.startswith("_") and k not in _DERIVED},
        text={k: text_config[k] for k in _TEXT_KEYS if k in text_config},
        codec="vae",
        vae={k: v for k, v in vae.config.items() if not k.startswith("_")},
        image_size=int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1),
        prediction_type=scheduler.config.prediction_type,
        residual=False,
        scheduler={
            k: v for k, v in scheduler.config.items() if not k.startswith("_") and k != "prediction_type"
        },
        max_text_length=min(77, int(text_config["max_position_embeddings"])),
    )


def snapshot_provenance(path: str | os.PathLike) -> dict:
    """Where a snapshot came from: path as written, resolved path and the sha256 of each component's weights
    (:func:`model_families.loading.input_provenance` per component folder)."""
    resolved = Path(os.path.realpath(path))
    components = {
        name: input_provenance(resolved / name)["sha256"]
        for name in ("unet", "text_encoder", "vae")
        if (resolved / name).is_dir()
    }
    return {"path": str(path), "resolved": str(resolved), "components": components}
