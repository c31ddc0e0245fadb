"""InverTune step 3, activation capture: forward hooks on an image tower's candidate layers.

Which layers are candidates, and which of them run sequence-first, is the tower's anatomy
(:class:`model_families.clip.anatomy.TowerAnatomy`; open_clip's by default).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from defenses.invertune.zero_shot import Normalize
from model_families.clip.anatomy import OPEN_CLIP_ANATOMY, TowerAnatomy


class ActivationRecorder:
    """Context manager recording the outputs of ``layers`` (forward hooks) into ``activations``.

    Outputs of layers named in ``seq_first`` are transposed to batch-first. Nothing is detached, so
    the recorded activations carry gradients when the forward pass does.
    """

    def __init__(self, layers: Mapping[str, nn.Module], seq_first: Iterable[str] = ()) -> None:
        self.layers = dict(layers)
        self.seq_first = set(seq_first)
        self.activations: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str) -> Callable[[nn.Module, tuple, object], None]:
        def record(_module: nn.Module, _inputs: tuple, output: object) -> None:
            tensor = output[0] if isinstance(output, tuple) else output
            self.activations[name] = tensor.transpose(0, 1) if name in self.seq_first else tensor

        return record

    def __enter__(self) -> ActivationRecorder:
        self.activations = {}
        self._handles = [
            module.register_forward_hook(self._hook(name)) for name, module in self.layers.items()
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def capture_activations(
    model: nn.Module,
    images: Tensor,
    normalize: Normalize,
    layers: Mapping[str, nn.Module] | None = None,
    anatomy: TowerAnatomy = OPEN_CLIP_ANATOMY,
) -> tuple[dict[str, Tensor], Tensor]:
    """Batch-first activations of ``layers`` (default: all of ``anatomy``'s candidates) and the image
    embeddings ``model.encode_image(normalize(images))`` from one forward pass (gradients flow if enabled)."""
    layers = anatomy.candidate_layers(model) if layers is None else layers
    with ActivationRecorder(layers, anatomy.seq_first_layers(model) & set(layers)) as recorder:
        features = model.encode_image(normalize(images))
    return recorder.activations, features
