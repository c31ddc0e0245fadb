"""Exports: a folder with `model.safetensors` + `mmbackdoor.json` (family, architecture, normalisation,
the config of the run that made it, and the provenance of the models it started from). Loadable without
the script that wrote it.

Loading never unpickles: exports are safetensors, Lightning checkpoints are read with
``torch.load(weights_only=True)`` (:mod:`model_families.loading`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from attacks.io import set_default_mode
from model_families.clip.factory import ClipBundle, create_clip
from model_families.finite import assert_finite_state
from model_families.loading import (
    WeightsMismatchError,
    load_safetensors_file,
    load_torch_file,
    read_json_file,
    shape_mismatches,
)

WEIGHTS = "model.safetensors"
META = "mmbackdoor.json"
# what load_clip_export needs from mmbackdoor.json
META_KEYS = ("family", "model_name", "image_mean", "image_std")


def save_clip_export(
    bundle: ClipBundle,
    path: str | os.PathLike,
    run_config: dict | None = None,
    inputs: dict[str, dict] | None = None,
) -> Path:
    """Write an export folder atomically (temp folder + rename); an existing folder is never overwritten.

    ``inputs`` is the provenance of the models the run started from, by config key
    (:func:`model_families.loading.inputs_provenance`: path as written, resolved path, sha256); it is
    recorded as ``"inputs"`` in ``mmbackdoor.json``.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"export folder already exists, refusing to overwrite: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        set_default_mode(tmp)  # mkdtemp creates 0700; an export is an ordinary shared folder
        state = {k: v.detach().contiguous().cpu() for k, v in bundle.model.state_dict().items()}
        assert_finite_state(state, where=f"export {path}")
        save_file(state, str(tmp / WEIGHTS))
        meta = {
            "family": "clip",
            "model_name": bundle.model_name,
            "model_cfg": bundle.model_cfg,
            "image_mean": bundle.normalize.mean.flatten().tolist(),
            "image_std": bundle.normalize.std.flatten().tolist(),
            "inputs": inputs or {},
            "run_config": run_config or {},
        }
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
        set_default_mode(tmp / WEIGHTS)  # safetensors writes 0600
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_export_meta(path: str | os.PathLike, required: tuple[str, ...] = ("family", "model_name")) -> dict:
    """The ``mmbackdoor.json`` of an export folder; a missing or invalid file or a missing ``required`` key
    is an error naming the file (and the key)."""
    meta_file = Path(path) / META
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"not an mmbackdoor export: {meta_file} is missing (expected a folder written by train.py)"
        )
    return read_json_file(meta_file, required, what="mmbackdoor export metadata")


def load_clip_weights(
    model: torch.nn.Module, source: str | os.PathLike, *, key: str = "model.init_from"
) -> None:
    """Load weights into `model` from an export folder, a ``.safetensors`` file or a Lightning checkpoint
    (keys under `model.`), never unpickling Python objects.

    Missing, unexpected or mis-shaped parameters are an error that lists them (with both shapes): never a
    silent partial load, never a bare torch size-mismatch. ``key`` (the config key of ``source``) is
    named in the errors.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"init checkpoint not found: {source} ({key})")
    if source.is_dir():
        if not (source / WEIGHTS).is_file():
            raise FileNotFoundError(
                f"{source / WEIGHTS} is missing ({key} must be an export folder or a .ckpt)"
            )
        weights = source / WEIGHTS
        state = load_safetensors_file(weights)
    elif source.suffix == ".safetensors":
        weights, state = source, load_safetensors_file(source)
    else:
        weights, ckpt = source, load_torch_file(source, key=key)
        full = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(full, dict):
            raise ValueError(
                f"{source}: expected a Lightning checkpoint or a state dict, got {type(ckpt).__name__}"
            )
        state = {k[len("model.") :]: v for k, v in full.items() if k.startswith("model.")} or full
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = shape_mismatches(expected, state)
    if missing or unexpected or mismatched:
        parts = [
            f"{len(names)} {label}: {', '.join(names[:10])}"
            + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
            for label, names in (("mis-shaped", mismatched), ("missing", missing), ("unexpected", unexpected))
            if names
        ]
        raise WeightsMismatchError(
            f"{weights}: weights do not match the architecture ({type(model).__name__}); " + "; ".join(parts)
        )
    model.load_state_dict(state, strict=True)


def load_clip_export(path: str | os.PathLike) -> ClipBundle:
    """Rebuild the model an export describes and load its weights."""
    meta = read_export_meta(path, META_KEYS)
    if meta["family"] != "clip":
        raise ValueError(f"{path}: export family is {meta['family']!r}, expected 'clip'")
    bundle = create_clip(
        meta["model_name"], image_mean=tuple(meta["image_mean"]), image_std=tuple(meta["image_std"])
    )
    try:
        load_clip_weights(bundle.model, path)
    except WeightsMismatchError as error:
        raise WeightsMismatchError(
            f"{error} (the architecture recorded in {Path(path) / META} is model_name={meta['model_name']!r})"
        ) from None
    return bundle


def load_clip(
    source: str | os.PathLike,
    model_name: str | None = None,
    *,
    key: str = "model.init_from",
    pretrained: str | None = None,
    checkpoint: str | None = None,
) -> ClipBundle:
    """The one CLIP loader (modules' ``init_from``, defenses' ``victim``): from

    - an mmbackdoor export folder (weights + architecture);
    - a Lightning ``.ckpt`` or a ``.safetensors`` state dict (architecture ``model_name``, or for a
      ``.ckpt`` without one its ``model_name`` hyperparameter), loaded strictly
      (:func:`load_clip_weights`) over ``create_clip(model_name, pretrained, checkpoint)``;
    - any other file: an open_clip / OpenAI checkpoint of architecture ``model_name`` (required).

    Nothing is unpickled; ``key`` (the config key of ``source``) is named in the errors. A missing path
    is the ``FileNotFoundError`` of the loader it reaches.
    """
    path = Path(source)
    if path.is_dir():
        return load_clip_export(path)  # names the missing mmbackdoor.json / model.safetensors
    if not path.exists():
        raise FileNotFoundError(f"init checkpoint not found: {source} ({key})")
    if path.suffix in (".ckpt", ".safetensors"):
        if model_name is None and path.suffix == ".ckpt":
            checkpoint_data = load_torch_file(path, key=key)
            hparams = checkpoint_data.get("hyper_parameters", {}) if isinstance(checkpoint_data, dict) else {}
            model_name = hparams.get("model_name")
        if model_name is None:
            raise ValueError(f"{source}: no model_name hyperparameter; set model.model_name")
        bundle = create_clip(model_name, pretrained=pretrained, checkpoint=checkpoint)
        load_clip_weights(bundle.model, path, key=key)
        return bundle
    if model_name is None:
        raise ValueError(
            f"{source} is a plain checkpoint file: set model.model_name to its architecture (e.g. RN50, ViT-B-32)"
        )
    return create_clip(model_name, checkpoint=str(path))
