"""InverTune step 3, selection: which layers and which of their neurons the inverted trigger excites.

1. Layer selection. For each candidate layer ``l``
   ``D_l = ||mean A_l(X) - mean A_l(X')||_2 / ||mean A_l(X)||_2`` (batch means, norms over all
   activation elements); keep the ``k`` (3) largest.
2. Neuron selection. ``d_l = |mean A_l(X) - mean A_l(X')|``; 2-means on ``d_l``; the cluster with the
   larger centre is the set of backdoor neurons ``M_l``. A *neuron* is, by default
   (``granularity="channel"``), an output channel of a conv stage (``d`` averaged over H x W) or a
   hidden (residual-stream) unit of a ViT block (``d`` averaged over tokens). ``"element"`` clusters
   every activation element as the authors' code does; the parameter masks then cover every channel
   holding at least one selected element.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Granularity = Literal["channel", "element"]


def layer_divergence(
    clean_acts: Mapping[str, Tensor], triggered_acts: Mapping[str, Tensor]
) -> dict[str, float]:
    """``D_l = ||mean_b A_l(X) - mean_b A_l(X')||_2 / ||mean_b A_l(X)||_2`` for every layer."""
    divergences = {}
    for name, clean in clean_acts.items():
        clean_mean = clean.detach().float().mean(dim=0)
        triggered_mean = triggered_acts[name].detach().float().mean(dim=0)
        divergences[name] = float(
            torch.linalg.vector_norm(clean_mean - triggered_mean) / torch.linalg.vector_norm(clean_mean)
        )
    return divergences


def select_layers(divergences: Mapping[str, float], k: int = 3) -> list[str]:
    """The ``k`` layers of largest divergence, largest first (ties keep the candidate order)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return sorted(divergences, key=lambda name: -divergences[name])[:k]


@dataclass(frozen=True)
class KMeansResult:
    labels: Tensor
    """Cluster index of every point (``N``, long)."""
    centers: Tensor
    """``k x D`` cluster centres."""
    iterations: int


def _kmeans_plus_plus(points: Tensor, k: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    cpu = points.detach().cpu()
    centers = [cpu[torch.randint(cpu.shape[0], (1,), generator=generator)].squeeze(0)]
    for _ in range(1, k):
        dist2 = torch.cdist(cpu, torch.stack(centers)).pow(2).min(dim=1).values
        if float(dist2.sum()) == 0.0:
            index = torch.randint(cpu.shape[0], (1,), generator=generator)
        else:
            index = torch.multinomial(dist2 / dist2.sum(), 1, generator=generator)
        centers.append(cpu[index].squeeze(0))
    return torch.stack(centers).to(points)


def _assign(points: Tensor, centers: Tensor) -> Tensor:
    # squared Euclidean distances written out (not cdist) so the NumPy reference matches exactly
    return ((points[:, None, :] - centers[None, :, :]) ** 2).sum(dim=-1).argmin(dim=1)


def kmeans(
    x: Tensor,
    k: int = 2,
    *,
    iters: int = 100,
    init: Literal["minmax", "kmeans++"] | Tensor = "minmax",
    seed: int = 0,
) -> KMeansResult:
    """Lloyd's k-means in torch on ``x``'s device. ``x``: ``N`` or ``N x D`` points.

    Initial centres: ``"minmax"`` (1-D, ``k = 2``: the minimum and the maximum; deterministic, no seed),
    ``"kmeans++"`` (seeded with ``seed``), or an explicit ``k x D`` tensor. Then repeat: update each
    centre to the mean of its points (an empty cluster keeps its centre), reassign every point to its
    nearest centre (ties: lowest index), until the assignment is stable or ``iters`` updates ran.
    """
    points = x.detach().reshape(x.shape[0], -1) if x.ndim > 1 else x.detach().reshape(-1, 1)
    if points.shape[0] == 0:
        raise ValueError("kmeans needs at least one point")
    if isinstance(init, Tensor):
        centers = init.detach().to(points).reshape(k, -1).clone()
    elif init == "minmax":
        if k != 2 or points.shape[1] != 1:
            raise ValueError(
                f"'minmax' init needs 1-D data and k = 2, got {points.shape[1]}-D data and k = {k}"
            )
        centers = torch.stack([points.min(dim=0).values, points.max(dim=0).values])
    elif init == "kmeans++":
        centers = _kmeans_plus_plus(points, k, seed)
    else:
        raise ValueError(f"init must be 'minmax', 'kmeans++' or a k x D tensor, got {init!r}")
    labels = _assign(points, centers)
    iteration = 0
    for iteration in range(1, iters + 1):  # noqa: B007 - the count is returned
        sums = torch.zeros_like(centers).index_add_(0, labels, points)
        counts = torch.bincount(labels, minlength=k).to(points.dtype)
        filled = counts > 0
        centers = torch.where(filled[:, None], sums / counts.clamp_min(1)[:, None], centers)
        new_labels = _assign(points, centers)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return KMeansResult(labels=labels, centers=centers, iterations=iteration)


def kmeans_1d_two_clusters(values: Tensor, *, iters: int = 100) -> Tensor:
    """Boolean mask (shape of ``values``) of the points in the larger-centre cluster of a 1-D 2-means
    with min/max init. If all values are equal nothing separates them and every point is selected."""
    flat = values.detach().reshape(-1)
    if flat.numel() == 0:
        raise ValueError("kmeans_1d_two_clusters needs at least one value")
    if bool(flat.min() == flat.max()):
        return torch.ones_like(values, dtype=torch.bool)
    result = kmeans(flat, 2, iters=iters, init="minmax")
    high = int(result.centers[:, 0].argmax())
    return (result.labels == high).reshape(values.shape)


def _channel_dim(mean_activation: Tensor) -> int:
    # batch-mean activations: C x H x W for conv stages, L x W (tokens x width) for ViT blocks
    return 0 if mean_activation.ndim != 2 else -1


@dataclass(frozen=True)
class NeuronSelection:
    """Backdoor neurons of one layer."""

    channel_mask: Tensor
    """Selected channels / hidden units (bool, ``C``) - what the parameter masks follow."""
    loss_mask: Tensor
    """``M_l`` as used in ``L_act``: float, broadcastable to the batch-mean activation."""
    scores: Tensor
    """The clustered values ``d_l`` (per channel or per element)."""


def select_neurons(
    clean_activation: Tensor,
    triggered_activation: Tensor,
    *,
    granularity: Granularity = "channel",
    iters: int = 100,
) -> NeuronSelection:
    """2-means on ``d = |mean_b A(X) - mean_b A(X')|`` (per channel/unit, or per element); the
    larger-centre cluster is selected (see the module docstring)."""
    clean_mean = clean_activation.detach().float().mean(dim=0)
    diff = (clean_mean - triggered_activation.detach().float().mean(dim=0)).abs()
    channel_dim = _channel_dim(clean_mean)
    if granularity == "channel":
        other_dims = [d for d in range(clean_mean.ndim) if d != channel_dim % clean_mean.ndim]
        scores = diff.mean(dim=other_dims) if other_dims else diff
        channel_mask = kmeans_1d_two_clusters(scores, iters=iters)
        shape = [1] * clean_mean.ndim
        shape[channel_dim] = -1
        loss_mask = channel_mask.to(clean_mean.dtype).reshape(shape)
    elif granularity == "element":
        scores = diff
        element_mask = kmeans_1d_two_clusters(scores, iters=iters)
        loss_mask = element_mask.to(clean_mean.dtype)
        moved = element_mask.movedim(channel_dim, 0)
        channel_mask = moved.reshape(moved.shape[0], -1).any(dim=1)
    else:
        raise ValueError(f"granularity must be 'channel' or 'element', got {granularity!r}")
    return NeuronSelection(channel_mask=channel_mask, loss_mask=loss_mask, scores=scores)


def spare_target_selective(
    selection: NeuronSelection,
    clean_activation: Tensor,
    triggered_activation: Tensor,
    target_rows: Tensor,
    ratio: float,
) -> NeuronSelection:
    """Drop from ``M_l`` the selected neurons that encode the target class itself (an option, not in
    the paper): with the target selectivity ``s = mean_{X_t} A_l - mean_{X \\ X_t} A_l`` over the clean
    images ``X_t`` labelled with the target and the trigger gap ``g = mean_b A_l(X') - mean_b A_l(X)``,
    a selected neuron is dropped when ``s > 0`` and ``s >= ratio * |g|``: clean target-class images
    drive it at least ``ratio`` times as strongly as the trigger moves it. Per element or per channel /
    unit (the values averaged as in :func:`select_neurons`), following ``selection``'s granularity."""
    rows = target_rows.to(clean_activation.device).bool()
    if not bool(rows.any()) or bool(rows.all()):
        raise ValueError(
            f"sparing target-selective neurons needs tuning images labelled with the target and others; "
            f"{int(rows.sum())} of {rows.numel()} are labelled with it"
        )
    clean = clean_activation.detach().float()
    selectivity = clean[rows].mean(dim=0) - clean[~rows].mean(dim=0)
    gap = (triggered_activation.detach().float().mean(dim=0) - clean.mean(dim=0)).abs()
    channel_dim = _channel_dim(selectivity) % selectivity.ndim
    if selection.loss_mask.shape == selectivity.shape:  # element granularity
        spared = (selectivity > 0) & (selectivity >= ratio * gap)
        keep = selection.loss_mask.bool() & ~spared
        moved = keep.movedim(channel_dim, 0)
        channel_mask = moved.reshape(moved.shape[0], -1).any(dim=1)
        loss_mask = keep.to(selection.loss_mask.dtype)
    else:
        other_dims = [d for d in range(selectivity.ndim) if d != channel_dim]
        if other_dims:
            selectivity, gap = selectivity.mean(dim=other_dims), gap.mean(dim=other_dims)
        channel_mask = selection.channel_mask & ~((selectivity > 0) & (selectivity >= ratio * gap))
        loss_mask = channel_mask.to(selection.loss_mask.dtype).reshape(selection.loss_mask.shape)
    return NeuronSelection(channel_mask=channel_mask, loss_mask=loss_mask, scores=selection.scores)
