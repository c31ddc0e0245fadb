"""Exports: a folder with `model.safetensors` + `mmbackdoor.json` (family, architecture, normalisation,
and the config of the run that made it). Loadable without the script that wrote it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model_families.clip.factory import ClipBundle, create_clip
from model_families.finite import assert_finite_state

WEIGHTS = "model.safetensors"
META = "mmbackdoor.json"


def save_clip_export(bundle: ClipBundle, path: str | os.PathLike, run_config: dict | None = None) -> Path:
    """Write an export folder atomically (temp folder + rename); an existing folder is never overwritten."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"export folder already exists, refusing to overwrite: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in bundle.model.state_dict().items()}
        assert_finite_state(state, where=f"export {path}")
        save_file(state, str(tmp / WEIGHTS))
        meta = {
            "family": "clip",
            "model_name": bundle.model_name,
            "model_cfg": bundle.model_cfg,
            "image_mean": bundle.normalize.mean.flatten().tolist(),
            "image_std": bundle.normalize.std.flatten().tolist(),
            "run_config": run_config or {},
        }
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_export_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"not an mmbackdoor export: {meta_file} is missing (expected a folder written by train.py)"
        )
    meta = json.loads(meta_file.read_text())
    for key in ("family", "model_name"):
        if key not in meta:
            raise ValueError(f"{meta_file}: missing key {key!r}")
    return meta


def load_clip_weights(model: torch.nn.Module, source: str | os.PathLike) -> None:
    """Load weights into `model` from an export folder or a Lightning checkpoint (keys under `model.`).

    Missing or unexpected parameters are an error that lists them: never a silent partial load.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"init checkpoint not found: {source} (model.init_from)")
    if source.is_dir():
        if not (source / WEIGHTS).is_file():
            raise FileNotFoundError(
                f"{source / WEIGHTS} is missing (model.init_from must be an export folder or a .ckpt)"
            )
        state = load_file(str(source / WEIGHTS))
    else:
        ckpt = torch.load(source, map_location="cpu", weights_only=False)
        full = ckpt.get("state_dict", ckpt)
        state = {k[len("model.") :]: v for k, v in full.items() if k.startswith("model.")} or full
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{source}: weights do not match the architecture; missing {list(missing)[:10]}, "
            f"unexpected {list(unexpected)[:10]}"
        )


def load_clip_export(path: str | os.PathLike) -> ClipBundle:
    """Rebuild the model an export describes and load its weights."""
    meta = read_export_meta(path)
    if meta["family"] != "clip":
        raise ValueError(f"{path}: export family is {meta['family']!r}, expected 'clip'")
    bundle = create_clip(
        meta["model_name"], image_mean=tuple(meta["image_mean"]), image_std=tuple(meta["image_std"])
    )
    load_clip_weights(bundle.model, path)
    return bundle
