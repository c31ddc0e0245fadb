"""Load the suspect ("victim") model a defense starts from - never silently another one.

The InverTune release falls back to a clean model when the checkpoint path is wrong; here every
unusable path is an error that names it. Nothing is unpickled: exports are safetensors and checkpoints
are read weights-only (:mod:`model_families.loading`).
"""

from __future__ import annotations

from pathlib import Path

from model_families.clip import ClipBundle, load_clip


def load_victim(victim: str, model_name: str | None = None, *, key: str = "model.victim") -> ClipBundle:
    """The CLIP model to defend (:func:`model_families.clip.export.load_clip` after checking the path), from

    - an mmbackdoor export folder (``runs/<run>/latest_export``: weights + architecture);
    - a Lightning ``.ckpt`` of a CLIP module (architecture from its ``model_name`` hyperparameter, or
      ``model_name`` when given);
    - any other file: an open_clip / OpenAI checkpoint of architecture ``model_name`` (required).

    Raises ``FileNotFoundError`` naming ``victim`` (and ``key``, the config key) when the path does not
    exist, and ``ValueError`` when the architecture cannot be known.
    """
    require_victim_path(victim, key=key)
    return load_clip(victim, model_name, key=key)


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
