"""Global random states in every checkpoint, so a resumed fit draws what the uninterrupted one would have.

Dropout, MDLM's masking ratios ``t`` and vision-token dropout, and anything else that uses torch's default
generator (CPU and CUDA), numpy's or python's ``random`` continue from the checkpoint's states. The states are
applied at ``on_train_start`` of the resumed fit, after the model was built and set up (which draw from the
same generators) and right before the first resumed batch. Generators a module or data module owns are saved
by their owners (e.g. ``CLIPFineTuning``'s augmentation, the training loader's shuffling).
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


def collect_rng_states() -> dict[str, Any]:
    """torch CPU (and CUDA, when initialised), numpy and python states, as tensors, tuples and numbers only
    (loadable with ``torch.load(weights_only=True)``)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the global state is what we save)
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`collect_rng_states`."""
    torch.set_rng_state(states["torch"])
    kind, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states:
        if not torch.cuda.is_available():
            raise RuntimeError("the checkpoint holds CUDA random states but CUDA is not available")
        torch.cuda.set_rng_state_all(states["cuda"][: torch.cuda.device_count()])


class GlobalRNGState(L.Callback):
    """Save the global random states in every checkpoint; restore them when a fit resumes (``ckpt_path``)."""

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return collect_rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._to_restore is not None:
            set_rng_states(self._to_restore)
            self._to_restore = None
