"""Auxiliary attribute classifiers on a VLM's projected vision tokens, shared by every generative VLM family.

Embedded world only: a stand-in for the pretraining of a real vision tower (SigLIP, CLIP). The tiny towers are
trained from scratch on a CPU budget and, with only the answer loss, do not learn the shapes (shape accuracy
stays near chance, for LLaDA-V and LLaVA alike). Linear heads that classify each sample's ``attributes`` (e.g.
``{"shape": [circle, ...], "colour": [red, ...]}``) from the ``(B, N, D)`` projected vision tokens give the
tower a direct signal:

``L_aux = mean_a CE(W_a v, y_a)``, ``v`` the mean vision token (``pooling="mean"``) or every token on its own,
the CE then averaged over the ``B x N`` tokens (``pooling="token"``: each token carries the scene, as the
contextual tokens of a pretrained tower do). Samples without an attribute are ignored. A fine-tuning module adds
``weight * L_aux`` to its loss; the heads are not part of the model and are never exported.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["POOLINGS", "VisionAuxHeads"]

POOLINGS = ("mean", "token")


class VisionAuxHeads(nn.ModuleDict):
    """One ``nn.Linear(width, len(classes))`` per attribute (keys: the attribute names, so a module's state
    holds ``vision_aux_heads.<attribute>.weight``).

    Args:
        classes: ``{attribute: [class names]}``; a sample's ``attributes[attribute]`` is looked up in the list.
        width: the projected vision tokens' width (the LM's hidden size).
        pooling: ``mean`` or ``token`` (see the module docstring).
    """

    def __init__(self, classes: dict[str, list[str]], width: int, pooling: str = "mean") -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"model.vision_aux_pooling={pooling!r}; expected one of {POOLINGS}")
        if not classes or any(not names for names in classes.values()):
            raise ValueError(f"model.vision_aux={classes!r}: expected {{attribute: [classes]}}, none empty")
        super().__init__({name: nn.Linear(width, len(names)) for name, names in classes.items()})
        self.pooling = pooling
        self.index = {name: {c: i for i, c in enumerate(names)} for name, names in classes.items()}

    @classmethod
    def from_options(
        cls, classes: dict[str, list[str]] | None, weight: float, width: int, pooling: str = "mean"
    ) -> VisionAuxHeads | None:
        """The heads for a module's ``vision_aux`` / ``vision_aux_weight`` / ``vision_aux_pooling`` keys; None
        when ``weight`` is 0 (the default: no auxiliary loss). The pooling is checked either way."""
        if pooling not in POOLINGS:
            raise ValueError(f"model.vision_aux_pooling={pooling!r}; expected one of {POOLINGS}")
        if weight < 0:
            raise ValueError(f"model.vision_aux_weight must be >= 0, got {weight}")
        if weight == 0:
            return None
        if not classes:
            raise ValueError("model.vision_aux_weight > 0 needs model.vision_aux ({attribute: [classes]})")
        return cls(classes, width, pooling)

    def loss(self, vision: torch.Tensor, attributes: list[dict | None]) -> torch.Tensor | None:
        """``L_aux`` of the ``(B, N, D)`` vision tokens for the ``B`` samples' attributes; None if no sample
        has any of the attributes. A value missing from an attribute's classes is a ``ValueError``."""
        per_token = self.pooling == "token"
        pooled = vision if per_token else vision.mean(dim=1)
        losses = []
        for name, head in self.items():
            index = self.index[name]
            values = [(a or {}).get(name) for a in attributes]
            unknown = sorted({str(v) for v in values if v is not None and v not in index})
            if unknown:
                raise ValueError(
                    f"model.vision_aux.{name}: the data's {name} values {unknown} are not among its classes "
                    f"{sorted(index)}"
                )
            labels = torch.tensor([index.get(v, -100) for v in values], device=vision.device)
            if bool((labels >= 0).any()):
                logits = head(pooled)  # (B, C), or (B, N, C) per token
                if per_token:
                    labels = labels[:, None].expand(logits.shape[:2]).flatten()
                    logits = logits.flatten(0, 1)
                losses.append(nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100))
        return torch.stack(losses).mean() if losses else None
