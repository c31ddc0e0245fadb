"""Load the suspect ("victim") model a defense starts from - never silently another one.

The InverTune release falls back to a clean model when the checkpoint path is wrong; here every
unusable path is an error that names it. Nothing is unpickled: exports are safetensors and checkpoints
are read weights-only (:mod:`model_families.loading`).
"""

from __future__ import annotations

from pathlib import Path

from model_families.clip import ClipBundle, create_clip, load_clip_export, load_clip_weights
from model_families.loading import load_torch_file


def load_victim(victim: str, model_name: str | None = None, *, key: str = "model.victim") -> ClipBundle:
    """The CLIP model to defend, from

    - an mmbackdoor export folder (``runs/<run>/latest_export``: weights + architecture);
    - a Lightning ``.ckpt`` of a CLIP module (architecture from its ``model_name`` hyperparameter, or
      ``model_name`` when given);
    - any other file: an open_clip / OpenAI checkpoint of architecture ``model_name`` (required).

    Raises ``FileNotFoundError`` naming ``victim`` (and ``key``, the config key) when the path does not
    exist, and ``ValueError`` when the architecture cannot be known.
    """
    path = require_victim_path(victim, key=key)
    if path.is_dir():
        return load_clip_export(path)  # names the missing mmbackdoor.json / model.safetensors
    if path.suffix == ".ckpt":
        if model_name is None:
            checkpoint = load_torch_file(path, key=key)
            hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
            model_name = hparams.get("model_name")
            if model_name is None:
                raise ValueError(f"{victim}: no model_name hyperparameter; set model.model_name")
        bundle = create_clip(model_name)
        load_clip_weights(bundle.model, path, key=key)
        return bundle
    if model_name is None:
        raise ValueError(
            f"{victim} is a plain checkpoint file: set model.model_name to its architecture (e.g. RN50, ViT-B-32)"
        )
    return create_clip(model_name, checkpoint=str(path))


def require_victim_path(victim: str | None, *, key: str = "model.victim") -> Path:
    """``victim`` as a ``Path`` if it exists; otherwise ``ValueError`` (empty) or ``FileNotFoundError``
    naming the path and the config key - a defense never starts from a fresh or fallback model."""
    if not victim:
        raise ValueError(
            f"{key} is required: the path of the suspect model (an export folder or a checkpoint)"
        )
    path = Path(victim)
    if not path.exists():
        raise FileNotFoundError(
            f"victim checkpoint not found: {victim} ({key}); a defense never falls back to another model"
        )
    return path
