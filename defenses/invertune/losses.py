"""InverTune step 3, losses (batch means, with the model being tuned; ``theta0`` = the model before):
``L_act = sum_l ||M_l * (mean A_l(X) - mean A_l(X'))||_2 / ||M_l * mean A_l(X)||_2`` and
``L_preserve = ||F_theta(X) - F_theta0(X)||_F`` (L2-normalised image embeddings, as in the code).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Pairing = Literal["batch_mean", "per_sample"]
Denominator = Literal["tuned", "constant"]


def activation_loss(
    clean_acts: Mapping[str, Tensor],
    triggered_acts: Mapping[str, Tensor],
    loss_masks: Mapping[str, Tensor],
    *,
    pairing: Pairing = "batch_mean",
    denominator: Denominator = "tuned",
    eps: float = 1e-12,
) -> Tensor:
    """``L_act = sum_l ||M_l * (mean_b A_l(X) - mean_b A_l(X'))||_2 / ||M_l * mean_b A_l(X)||_2``
    over the layers of ``loss_masks`` (denominator floored at ``eps``).

    ``denominator="tuned"`` (the paper and the authors' code) lets gradients flow through the
    denominator too, so the ratio can also fall by *inflating* the selected neurons' clean activations;
    ``"constant"`` detaches it (the same value, no gradient): only closing the clean/triggered gap
    lowers the loss (an option, not in the paper).

    ``pairing="per_sample"`` compares every triggered image with its own clean image instead of the
    batch means: ``||M_l * (A_l(X) - A_l(X'))||_2 / ||M_l * A_l(X)||_2`` with the norms over the batch
    and all elements (an option; the spec and the authors' code use batch means)."""
    if not loss_masks:
        raise ValueError("activation_loss needs at least one layer mask")
    if pairing not in ("batch_mean", "per_sample"):
        raise ValueError(f"pairing must be 'batch_mean' or 'per_sample', got {pairing!r}")
    if denominator not in ("tuned", "constant"):
        raise ValueError(f"denominator must be 'tuned' or 'constant', got {denominator!r}")
    total = None
    for name, mask in loss_masks.items():
        if pairing == "batch_mean":
            clean_mean = clean_acts[name].mean(dim=0)
            triggered_mean = triggered_acts[name].mean(dim=0)
        else:
            clean_mean, triggered_mean = clean_acts[name], triggered_acts[name]
        mask = mask.to(clean_mean)
        scale = torch.linalg.vector_norm(mask * clean_mean).clamp_min(eps)
        if denominator == "constant":
            scale = scale.detach()
        term = torch.linalg.vector_norm(mask * (clean_mean - triggered_mean)) / scale
        total = term if total is None else total + term
    return total


def preserve_loss(features: Tensor, reference_features: Tensor, *, normalize: bool = True) -> Tensor:
    """``L_preserve = ||F_theta(X) - F_theta0(X)||_F`` over ``B x D`` image embeddings, L2-normalised
    first when ``normalize`` (the authors' code)."""
    if normalize:
        features = F.normalize(features, dim=-1)
        reference_features = F.normalize(reference_features, dim=-1)
    return torch.linalg.matrix_norm(features - reference_features.to(features), ord="fro")
