"""InverTune step 3: activation tuning of the image tower with the inverted trigger.

Data: one batch ``X`` of clean images (64 in the paper) and ``X' = trigger(X)``.

1. Layer selection. For each candidate layer ``l`` (open_clip ``ModifiedResNet`` stages
   ``visual.layer1..4``; ``VisionTransformer`` residual blocks ``visual.transformer.resblocks.N``)
   ``D_l = ||mean A_l(X) - mean A_l(X')||_2 / ||mean A_l(X)||_2`` (batch means, norms over all
   activation elements); keep the ``k`` (3) largest.
2. Neuron selection. ``d_l = |mean A_l(X) - mean A_l(X')|``; 2-means on ``d_l``; the cluster with the
   larger centre is the set of backdoor neurons ``M_l``. A *neuron* is, by default
   (``granularity="channel"``), an output channel of a conv stage (``d`` averaged over H x W) or a
   hidden (residual-stream) unit of a ViT block (``d`` averaged over tokens). ``"element"`` clusters
   every activation element as the authors' code does; the parameter masks then cover every channel
   holding at least one selected element.
3. Losses (batch means, with the model being tuned; ``theta0`` = the model before tuning):
   ``L_act = sum_l ||M_l * (mean A_l(X) - mean A_l(X'))||_2 / ||M_l * mean A_l(X)||_2`` and
   ``L_preserve = ||F_theta(X) - F_theta0(X)||_F`` (L2-normalised image embeddings, as in the code);
   total ``1.0 * L_act + 0.5 * L_preserve``.
4. Updates. ``update_scope="neurons"`` (the paper, default): only the parameters that produce the
   selected channels/units change: for a ResNet stage, the output rows of its last bottleneck's
   ``conv3`` (and ``downsample`` conv) and the matching ``bn3`` (and downsample BN) affine entries;
   for a ViT block, the output rows and biases of ``attn.out_proj`` and ``mlp.c_proj`` (and LayerScale
   entries). Those are the writers of the layer's own block (``update_writers="last"``, default); the
   residual channels also receive the additions of the stage's earlier bottlenecks / the earlier ViT
   blocks, which ``update_writers="all"`` unmasks as well (same rows). Gradients are masked before
   clipping, and after every AdamW step the unselected entries are restored, because decoupled weight
   decay moves parameters even with zero gradients.
   ``update_scope="model_code"`` (the authors' code): masks act only inside the loss and AdamW updates
   the whole image tower.
5. Optimiser: AdamW lr 2e-6, weight decay 1e-4, gradient-norm clip 1.0, cosine schedule over the
   200 iterations (to ``min_lr`` = 1e-7, the code's ``eta_min``; the code's ``T_max`` is 100), and the
   lowest-loss state is kept. BatchNorm statistics are frozen (eval mode) by default;
   ``freeze_bn_stats=False`` runs the image tower in train mode as the code does.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defenses.invertune.zero_shot import Normalize, eval_mode, model_device

Granularity = Literal["channel", "element"]
UpdateScope = Literal["neurons", "model_code"]
Pairing = Literal["batch_mean", "per_sample"]
Denominator = Literal["tuned", "constant"]
Writers = Literal["last", "all"]
Augmentation = Callable[[Tensor, torch.Generator], Tensor]
TuningCallback = Callable[[dict[str, float]], None]


# --------------------------------------------------------------------------------------------------
# Candidate layers and activation capture
# --------------------------------------------------------------------------------------------------


def _vision_tower(model: nn.Module) -> tuple[nn.Module, str]:
    """The image tower and the name prefix of its modules inside ``model``."""
    if hasattr(model, "visual"):
        return model.visual, "visual."
    return model, ""


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Candidate layers of an open_clip image tower, named as in ``model.named_modules()``.

    ``ModifiedResNet``: the four stages ``visual.layer1..4``; ``VisionTransformer``: every residual
    block ``visual.transformer.resblocks.N``. ``model`` may be a ``CLIP``/``CustomTextCLIP`` or the
    image tower itself (names then lack the ``visual.`` prefix).
    """
    visual, prefix = _vision_tower(model)
    if all(hasattr(visual, f"layer{i}") for i in range(1, 5)):
        return {f"{prefix}layer{i}": getattr(visual, f"layer{i}") for i in range(1, 5)}
    resblocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if isinstance(resblocks, nn.ModuleList) and len(resblocks) > 0:
        return {f"{prefix}transformer.resblocks.{i}": block for i, block in enumerate(resblocks)}
    raise ValueError(
        f"no candidate layers in image tower {type(visual).__name__}: expected an open_clip ModifiedResNet "
        "(layer1..layer4) or VisionTransformer (transformer.resblocks)"
    )


def seq_first_layers(model: nn.Module) -> set[str]:
    """Names of candidate layers whose outputs are sequence-first (``L x B x W``).

    open_clip ViT blocks run batch-first when ``transformer.batch_first`` is true (recent versions);
    older versions have no such attribute and run sequence-first.
    """
    visual, _ = _vision_tower(model)
    transformer = getattr(visual, "transformer", None)
    if transformer is None or getattr(transformer, "batch_first", False):
        return set()
    return {name for name in candidate_layers(model) if ".resblocks." in name}


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
    model: nn.Module, images: Tensor, normalize: Normalize, layers: Mapping[str, nn.Module] | None = None
) -> tuple[dict[str, Tensor], Tensor]:
    """Batch-first activations of ``layers`` (default: all candidates) and the image embeddings
    ``model.encode_image(normalize(images))`` from one forward pass (gradients flow if enabled)."""
    layers = candidate_layers(model) if layers is None else layers
    with ActivationRecorder(layers, seq_first_layers(model) & set(layers)) as recorder:
        features = model.encode_image(normalize(images))
    return recorder.activations, features


# --------------------------------------------------------------------------------------------------
# Layer and neuron selection
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Parameter masks for neuron-restricted updates
# --------------------------------------------------------------------------------------------------


def _row_mask(param: Tensor, channel_mask: Tensor) -> Tensor:
    if param.shape[0] != channel_mask.shape[0]:
        raise ValueError(
            f"parameter with {param.shape[0]} output rows does not match {channel_mask.shape[0]} channels"
        )
    return channel_mask.to(param.device).reshape(-1, *([1] * (param.ndim - 1))).expand_as(param).clone()


def _block_writers(index: str, block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of one residual block that add into the residual stream's channels / units."""
    if hasattr(block, "conv3"):  # ModifiedResNet Bottleneck
        found = [(f"{index}.conv3", block.conv3), (f"{index}.bn3", block.bn3)]
        if getattr(block, "downsample", None) is not None:
            for name, module in block.downsample.named_children():
                if isinstance(module, nn.Conv2d | nn.BatchNorm2d):
                    found.append((f"{index}.downsample.{name}", module))
        return found
    found = []
    for path in ("attn.out_proj", "mlp.c_proj", "ls_1", "ls_2"):  # ViT residual block
        try:
            module = block.get_submodule(path)
        except AttributeError:
            continue
        if any(True for _ in module.parameters(recurse=False)):
            found.append((f"{index}.{path}" if index else path, module))
    return found


def _output_modules(
    model: nn.Module, layer_name: str, writers: Writers = "last"
) -> list[tuple[str, nn.Module]]:
    """(name in ``model``, module) of the modules whose outputs write ``layer_name``'s output channels.

    ``writers="last"``: the layer's own block (the last bottleneck of a ResNet stage; the ViT block
    itself). ``"all"``: every block that adds into the same residual channels / units before the
    layer's output: all bottlenecks of the stage (the first one's downsample included), or the ViT
    blocks ``0..N`` (the patch embedding, ``ln_pre`` and the positional embedding, which also write the
    stream, stay frozen)."""
    if writers not in ("last", "all"):
        raise ValueError(f"writers must be 'last' or 'all', got {writers!r}")
    layer = model.get_submodule(layer_name)
    if isinstance(layer, nn.Sequential) and hasattr(layer[-1], "conv3"):  # ModifiedResNet stage
        indices = list(layer._modules)
        chosen = indices if writers == "all" else indices[-1:]
        return [
            (f"{layer_name}.{name}", module)
            for index in chosen
            for name, module in _block_writers(index, layer.get_submodule(index))
        ]
    if hasattr(layer, "mlp") and hasattr(layer, "attn"):  # ViT residual block
        parent_name, _, index = layer_name.rpartition(".")
        if writers == "last" or not index.isdigit():
            return [(f"{layer_name}.{name}", module) for name, module in _block_writers("", layer)]
        parent = model.get_submodule(parent_name)
        return [
            (f"{parent_name}.{i}.{name}", module)
            for i in range(int(index) + 1)
            for name, module in _block_writers("", parent[i])
        ]
    raise ValueError(f"cannot restrict updates to neurons of a {type(layer).__name__}")


def neuron_parameter_masks(
    model: nn.Module, layer_name: str, channel_mask: Tensor, writers: Writers = "last"
) -> dict[str, Tensor]:
    """Boolean element masks (parameter shape) of the parameters producing the selected channels of
    ``layer_name``, keyed by their names in ``model.named_parameters()`` (see the module docstring and
    :func:`_output_modules` for ``writers``)."""
    masks = {}
    for module_name, module in _output_modules(model, layer_name, writers):
        for pname, param in module.named_parameters(recurse=False):
            masks[f"{module_name}.{pname}"] = _row_mask(param, channel_mask)
    if not masks:
        raise ValueError(f"layer {layer_name} has no parameters producing its output channels")
    return masks


# --------------------------------------------------------------------------------------------------
# The tuner
# --------------------------------------------------------------------------------------------------


@dataclass
class ActivationTuningResult:
    selected_layers: list[str]
    divergences: dict[str, float]
    neurons: dict[str, NeuronSelection]
    parameter_masks: dict[str, Tensor | None]
    """Trainable parameter names -> element masks (``None``: the whole tensor is trainable)."""
    history: list[dict[str, float]] = field(default_factory=list)
    best_loss: float = float("inf")
    best_iteration: int = -1
    """Iteration whose pre-step state was kept (``iterations``: the final state)."""


class ActivationTuner:
    """InverTune activation tuning of ``model``'s image tower, in place (see the module docstring).

    ``fit(images, inverted_trigger)`` selects layers and neurons on the batch, tunes for
    ``iterations`` AdamW steps, loads the lowest-loss state and returns an
    :class:`ActivationTuningResult`. ``callback`` receives each iteration's record.
    """

    def __init__(
        self,
        model: nn.Module,
        normalize: Normalize,
        *,
        num_layers: int = 3,
        granularity: Granularity = "channel",
        update_scope: UpdateScope = "neurons",
        update_writers: Writers = "last",
        iterations: int = 200,
        lr: float = 2e-6,
        weight_decay: float = 1e-4,
        grad_clip: float = 1.0,
        min_lr: float = 1e-7,
        warmup_iterations: int = 0,
        activation_weight: float = 1.0,
        preserve_weight: float = 0.5,
        freeze_bn_stats: bool = True,
        normalize_features: bool = True,
        pairing: Pairing = "batch_mean",
        act_denominator: Denominator = "tuned",
        invariance_weight: float = 0.0,
        target_preserve_weight: float = 0.0,
        label_weight: float = 0.0,
        label_temperature: float = 0.07,
        spare_target_ratio: float | None = None,
        kmeans_iters: int = 100,
        augment: Augmentation | None = None,
        seed: int = 0,
        callback: TuningCallback | None = None,
    ) -> None:
        if update_scope not in ("neurons", "model_code"):
            raise ValueError(f"update_scope must be 'neurons' or 'model_code', got {update_scope!r}")
        if granularity not in ("channel", "element"):
            raise ValueError(f"granularity must be 'channel' or 'element', got {granularity!r}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if not hasattr(model, "encode_image"):
            raise ValueError(
                f"model {type(model).__name__} has no encode_image: pass an open_clip CLIP model"
            )
        self.model = model
        self.normalize = normalize
        self.num_layers = num_layers
        self.granularity = granularity
        if update_writers not in ("last", "all"):
            raise ValueError(f"update_writers must be 'last' or 'all', got {update_writers!r}")
        self.update_scope = update_scope
        self.update_writers = update_writers
        self.iterations = iterations
        self.lr = lr
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.min_lr = min_lr
        if not 0 <= warmup_iterations < iterations:
            raise ValueError(
                f"warmup_iterations must be >= 0 and below iterations ({iterations}), got {warmup_iterations}"
            )
        self.warmup_iterations = warmup_iterations
        self.activation_weight = activation_weight
        self.preserve_weight = preserve_weight
        self.freeze_bn_stats = freeze_bn_stats
        self.normalize_features = normalize_features
        if pairing not in ("batch_mean", "per_sample"):
            raise ValueError(f"pairing must be 'batch_mean' or 'per_sample', got {pairing!r}")
        for name, weight in (
            ("activation_weight", activation_weight),
            ("preserve_weight", preserve_weight),
            ("invariance_weight", invariance_weight),
            ("target_preserve_weight", target_preserve_weight),
            ("label_weight", label_weight),
        ):
            if weight < 0:
                raise ValueError(f"{name} must be >= 0, got {weight}")
        if act_denominator not in ("tuned", "constant"):
            raise ValueError(f"act_denominator must be 'tuned' or 'constant', got {act_denominator!r}")
        self.pairing = pairing
        self.act_denominator = act_denominator
        self.invariance_weight = invariance_weight
        self.target_preserve_weight = target_preserve_weight
        if label_temperature <= 0:
            raise ValueError(f"label_temperature must be > 0, got {label_temperature}")
        self.label_weight = label_weight
        self.label_temperature = label_temperature
        if spare_target_ratio is not None and spare_target_ratio < 0:
            raise ValueError(f"spare_target_ratio must be >= 0 or None (off), got {spare_target_ratio}")
        self.spare_target_ratio = spare_target_ratio
        self.kmeans_iters = kmeans_iters
        self.augment = augment
        if getattr(augment, "trigger_first", False) and granularity == "element":
            warnings.warn(
                "augment.trigger_first with granularity='element': the element masks are chosen on the "
                "un-augmented batch, so a flipped or shifted trigger falls partly outside them; "
                "granularity='channel' does not depend on the position",
                UserWarning,
                stacklevel=2,
            )
        self.seed = seed
        self.callback = callback

    def select(
        self, images: Tensor, triggered: Tensor, target_rows: Tensor | None = None
    ) -> tuple[dict[str, float], list[str], dict[str, NeuronSelection]]:
        """Layer divergences, the selected layers and their backdoor neurons (eval mode, no grad);
        with ``spare_target_ratio``, ``target_rows`` marks the images labelled with the target and the
        target-selective neurons are dropped (:func:`spare_target_selective`)."""
        if self.spare_target_ratio is not None and target_rows is None:
            raise ValueError(
                "spare_target_ratio needs target_rows: the tuning images labelled with the target"
            )
        with eval_mode(self.model), torch.no_grad():
            clean_acts, _ = capture_activations(self.model, images, self.normalize)
            triggered_acts, _ = capture_activations(self.model, triggered, self.normalize)
        divergences = layer_divergence(clean_acts, triggered_acts)
        selected = select_layers(divergences, self.num_layers)
        neurons = {
            name: select_neurons(
                clean_acts[name], triggered_acts[name], granularity=self.granularity, iters=self.kmeans_iters
            )
            for name in selected
        }
        if self.spare_target_ratio is not None:
            neurons = {
                name: spare_target_selective(
                    selection, clean_acts[name], triggered_acts[name], target_rows, self.spare_target_ratio
                )
                for name, selection in neurons.items()
            }
        return divergences, selected, neurons

    def _trainable_masks(self, neurons: Mapping[str, NeuronSelection]) -> dict[str, Tensor | None]:
        if self.update_scope == "model_code":
            _, prefix = _vision_tower(self.model)
            return {name: None for name, _ in self.model.named_parameters() if name.startswith(prefix)}
        masks: dict[str, Tensor | None] = {}
        for layer_name, selection in neurons.items():
            layer_masks = neuron_parameter_masks(
                self.model, layer_name, selection.channel_mask, self.update_writers
            )
            for name, mask in layer_masks.items():  # several layers may share writers ("all")
                masks[name] = mask if masks.get(name) is None else masks[name] | mask
        return masks

    def compute_losses(
        self,
        images: Tensor,
        triggered: Tensor | Sequence[Tensor],
        layers: Mapping[str, nn.Module],
        loss_masks: Mapping[str, Tensor],
        reference: Tensor,
        target_rows: Tensor | None = None,
        labels: Tensor | None = None,
        class_text_embeds: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``loss = w_act * L_act + w_preserve * L_preserve [+ w_inv * L_invariance]`` (and the parts) of
        the current model on ``images`` / ``triggered``; ``reference`` holds ``F_theta0(images)``.
        ``L_invariance = ||F_theta(X') - F_theta0(X)||_F`` (the ``invariance_weight`` option) is
        ``L_preserve`` applied to the triggered batch. With several triggered batches (the inverted
        trigger and further trigger estimates) ``L_act`` and ``L_invariance`` are their means over
        them. ``L_target = ||F_theta(X_t) - F_theta0(X_t)||_F`` over the rows ``X_t`` of ``images`` that
        ``target_rows`` marks (the images the suspect assigns to the identified target) is added with
        ``target_preserve_weight`` (an option: unlearning a targeted backdoor also weakens the target
        class itself). ``L_label = CE(cos(F_theta(X), T) / label_temperature, y)``, the zero-shot
        cross-entropy of the clean images against their labels ``y`` over the class text embeddings
        ``T``, is added with ``label_weight`` (an option for a defender whose clean images are labelled:
        it holds every class' decisions, the target's included, without holding the suspect's own
        target predictions). Runs in the caller's mode."""
        triggered_batches = [triggered] if isinstance(triggered, Tensor) else list(triggered)
        clean_acts, features = capture_activations(self.model, images, self.normalize, layers)
        act, invariance = 0.0, 0.0
        for batch in triggered_batches:
            triggered_acts, triggered_features = capture_activations(
                self.model, batch, self.normalize, layers
            )
            act = act + activation_loss(
                clean_acts, triggered_acts, loss_masks, pairing=self.pairing, denominator=self.act_denominator
            )
            if self.invariance_weight:
                invariance = invariance + preserve_loss(
                    triggered_features, reference, normalize=self.normalize_features
                )
        act = act / len(triggered_batches)
        preserve = preserve_loss(features, reference, normalize=self.normalize_features)
        total = self.activation_weight * act + self.preserve_weight * preserve
        out = {"activation": act, "preserve": preserve}
        if self.invariance_weight:
            invariance = invariance / len(triggered_batches)
            total = total + self.invariance_weight * invariance
            out["invariance"] = invariance
        if self.target_preserve_weight and target_rows is not None and bool(target_rows.any()):
            rows = target_rows.to(features.device)
            target = preserve_loss(features[rows], reference[rows], normalize=self.normalize_features)
            total = total + self.target_preserve_weight * target
            out["target_preserve"] = target
        if self.label_weight and labels is not None:
            if class_text_embeds is None:
                raise ValueError("label_weight needs the class text embeddings")
            logits = F.normalize(features, dim=-1) @ F.normalize(class_text_embeds.to(features), dim=-1).T
            label = F.cross_entropy(logits / self.label_temperature, labels.to(features.device))
            total = total + self.label_weight * label
            out["label"] = label
        return {"loss": total, **out}

    def _set_train_mode(self) -> None:
        self.model.eval()
        if not self.freeze_bn_stats:
            _vision_tower(self.model)[0].train()

    def begin(
        self,
        images: Tensor,
        inverted_trigger: Callable[[Tensor], Tensor],
        extra_triggers: Sequence[Callable[[Tensor], Tensor]] = (),
        target_rows: Tensor | None = None,
        labels: Tensor | None = None,
        class_text_embeds: Tensor | None = None,
    ) -> TuningSession:
        """Select layers and neurons on ``images`` and return a :class:`TuningSession` that runs the
        iterations one :meth:`TuningSession.step` at a time (a LightningModule's training steps).
        ``target_rows``: a boolean per image, the images the suspect assigns to the target (for
        ``target_preserve_weight``); ``labels`` (class index per image) and ``class_text_embeds``
        (``C x D``): for ``label_weight``."""
        return TuningSession(
            self, images, inverted_trigger, extra_triggers, target_rows, labels, class_text_embeds
        )

    def fit(
        self,
        images: Tensor,
        inverted_trigger: Callable[[Tensor], Tensor],
        extra_triggers: Sequence[Callable[[Tensor], Tensor]] = (),
        target_rows: Tensor | None = None,
        labels: Tensor | None = None,
        class_text_embeds: Tensor | None = None,
    ) -> ActivationTuningResult:
        """Tune ``self.model`` in place on one clean batch ``images`` (``B x 3 x H x W``, [0, 1]);
        ``extra_triggers``: further trigger estimates (e.g. the identification UAP) for the losses;
        the other arguments as in :meth:`begin`."""
        session = self.begin(images, inverted_trigger, extra_triggers, target_rows, labels, class_text_embeds)
        try:
            for _ in range(self.iterations):
                session.step()
            return session.finish()
        finally:
            session.close()


def tuning_schedule(
    optimizer: torch.optim.Optimizer, iterations: int, min_lr: float, warmup_iterations: int = 0
) -> torch.optim.lr_scheduler.LRScheduler:
    """The tuning learning rate: cosine decay from the base ``lr`` to ``min_lr`` over ``iterations``
    (the paper, the authors' code); with ``warmup_iterations = w > 0`` (an option, not in the paper)
    step ``i < w`` uses ``lr * (i + 1) / (w + 1)`` and the cosine runs over the remaining
    ``iterations - w`` steps: ``min_lr + (lr - min_lr) * (1 + cos(pi * (i - w) / (iterations - w))) / 2``."""
    if warmup_iterations == 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=min_lr)
    base = optimizer.param_groups[0]["lr"]

    def factor(i: int) -> float:
        if i < warmup_iterations:
            return (i + 1) / (warmup_iterations + 1)
        progress = (i - warmup_iterations) / (iterations - warmup_iterations)
        return (min_lr + (base - min_lr) * (1 + math.cos(math.pi * progress)) / 2) / base

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TuningSession:
    """One activation-tuning run of an :class:`ActivationTuner`, driven step by step.

    Construction selects the layers and neurons, computes ``F_theta0(X)``, freezes every parameter
    outside the trainable set and builds AdamW with its cosine schedule. :meth:`step` runs one
    iteration (the loss is recorded *before* the update, so the lowest-loss state is a state that
    was evaluated); :meth:`finish` also evaluates the final state, loads the lowest-loss one and
    restores the ``requires_grad`` flags and module modes (:meth:`close` only restores). Every step
    re-applies the tuning modes, so a caller (e.g. Lightning) may switch modes between steps.
    """

    def __init__(
        self,
        tuner: ActivationTuner,
        images: Tensor,
        inverted_trigger: Callable[[Tensor], Tensor],
        extra_triggers: Sequence[Callable[[Tensor], Tensor]] = (),
        target_rows: Tensor | None = None,
        labels: Tensor | None = None,
        class_text_embeds: Tensor | None = None,
    ) -> None:
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"images is empty or not a B x 3 x H x W tensor: shape {tuple(images.shape)}")
        if target_rows is not None and tuple(target_rows.shape) != (images.shape[0],):
            raise ValueError(
                f"target_rows must hold one flag per image ({images.shape[0]}), got shape {tuple(target_rows.shape)}"
            )
        self.tuner = tuner
        self.target_rows = None if target_rows is None else target_rows.bool()
        if labels is not None and tuple(labels.shape) != (images.shape[0],):
            raise ValueError(
                f"labels must hold one class per image ({images.shape[0]}), got shape {tuple(labels.shape)}"
            )
        if tuner.label_weight and (labels is None or class_text_embeds is None):
            raise ValueError("label_weight > 0 needs the tuning images' labels and the class text embeddings")
        self.labels = None if labels is None else labels.long()
        self.class_text_embeds = class_text_embeds
        model = tuner.model
        device = model_device(model)
        self.x = images.to(device)
        self.trigger = inverted_trigger
        with torch.no_grad():
            self.x_triggered = inverted_trigger(self.x).detach()
            self.extra_triggers = list(extra_triggers)
            self.x_extra = [trigger(self.x).detach() for trigger in self.extra_triggers]
        divergences, selected, neurons = tuner.select(self.x, self.x_triggered, self.target_rows)
        all_layers = candidate_layers(model)
        self.layers = {name: all_layers[name] for name in selected}
        self.loss_masks = {name: neurons[name].loss_mask.to(device) for name in selected}
        with eval_mode(model), torch.no_grad():
            self.reference = model.encode_image(tuner.normalize(self.x)).detach()  # F_theta0(X)
        # with augmentation every step sees new views of the batch: F_theta0 of them needs theta0
        self.frozen = copy.deepcopy(model).eval().requires_grad_(False) if tuner.augment else None
        self.generator = torch.Generator().manual_seed(tuner.seed)

        self.masks = tuner._trainable_masks(neurons)
        self.params = dict(model.named_parameters())
        self.trainable = [self.params[name] for name in self.masks]
        self.originals = {
            name: self.params[name].detach().clone() for name, mask in self.masks.items() if mask is not None
        }
        self.watched_buffers = [] if tuner.freeze_bn_stats else list(_vision_tower(model)[0].named_buffers())
        self._flags = {name: p.requires_grad for name, p in self.params.items()}
        self._modes = [(m, m.training) for m in model.modules()]
        self.result = ActivationTuningResult(selected, divergences, neurons, self.masks)
        self.iteration = 0
        self._best_state: dict[str, Tensor] | None = None
        self._closed = False
        for name, p in self.params.items():
            p.requires_grad_(name in self.masks)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=tuner.lr, weight_decay=tuner.weight_decay)
        self.scheduler = tuning_schedule(
            self.optimizer, tuner.iterations, tuner.min_lr, tuner.warmup_iterations
        )

    @property
    def done(self) -> bool:
        """Whether the tuner's ``iterations`` steps have run."""
        return self.iteration >= self.tuner.iterations

    def _snapshot(self) -> dict[str, Tensor]:
        state = {name: self.params[name].detach().clone() for name in self.masks}
        state.update({f"buffer:{name}": b.detach().clone() for name, b in self.watched_buffers})
        return state

    def losses(self) -> dict[str, Tensor]:
        """The losses of the current model on the tuning batch (in the caller's grad mode)."""
        return self.tuner.compute_losses(
            self.x,
            [self.x_triggered, *self.x_extra],
            self.layers,
            self.loss_masks,
            self.reference,
            self.target_rows,
            self.labels,
            self.class_text_embeds,
        )

    def augmented_losses(self) -> dict[str, Tensor]:
        """The losses on a fresh augmented view ``aug(X)`` of the batch, its triggered copy and
        ``F_theta0(aug(X))`` (the tuner's ``augment`` option). The triggered copy is
        ``trigger(aug(X))``, or ``aug(trigger(X))`` with the same random view when the augmentation has
        ``trigger_first`` set (the trigger then moves and flips with the image)."""
        state = self.generator.get_state()
        x = self.tuner.augment(self.x, self.generator)
        with torch.no_grad():
            if getattr(self.tuner.augment, "trigger_first", False):
                x_triggered = [
                    self.tuner.augment(batch, torch.Generator().set_state(state)).detach()
                    for batch in (self.x_triggered, *self.x_extra)
                ]
            else:
                x_triggered = [trigger(x).detach() for trigger in (self.trigger, *self.extra_triggers)]
            with eval_mode(self.frozen):
                reference = self.frozen.encode_image(self.tuner.normalize(x))
        return self.tuner.compute_losses(
            x,
            x_triggered,
            self.layers,
            self.loss_masks,
            reference,
            self.target_rows,
            self.labels,
            self.class_text_embeds,
        )

    def step(self) -> dict[str, float]:
        """One AdamW iteration (masked gradients, clipping, restore of unselected entries, schedule);
        returns and records ``{iteration, lr, grad_norm, loss, activation, preserve}``."""
        if self._closed:
            raise RuntimeError("this tuning session is finished; begin a new one")
        tuner, result, params = self.tuner, self.result, self.params
        with torch.enable_grad():
            for name, p in params.items():
                p.requires_grad_(name in self.masks)
            tuner._set_train_mode()
            if tuner.augment is None:
                losses = self.losses()
                batch_losses = losses
            else:  # the kept state is the one of lowest loss on the batch itself
                with torch.no_grad():
                    batch_losses = self.losses()
                losses = self.augmented_losses()
            loss_value = batch_losses["loss"].item()
            if loss_value < result.best_loss:
                result.best_loss, result.best_iteration = loss_value, self.iteration
                self._best_state = self._snapshot()
            self.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
        with torch.no_grad():
            for name, mask in self.masks.items():
                if mask is not None and params[name].grad is not None:
                    params[name].grad.mul_(mask)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, tuner.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        with torch.no_grad():
            for name, original in self.originals.items():
                params[name].copy_(torch.where(self.masks[name], params[name], original))
        self.scheduler.step()
        record = {"iteration": float(self.iteration), "lr": lr, "grad_norm": float(grad_norm)}
        record.update({key: value.item() for key, value in batch_losses.items()})
        if tuner.augment is not None:
            record["augmented_loss"] = losses["loss"].item()
        result.history.append(record)
        if tuner.callback is not None:
            tuner.callback(record)
        self.iteration += 1
        return record

    def finish(self) -> ActivationTuningResult:
        """Evaluate the final state, load the lowest-loss state, restore flags and modes."""
        if self._closed:
            return self.result
        result = self.result
        try:
            self.tuner._set_train_mode()
            with torch.no_grad():
                final = self.losses()["loss"].item()
            if final < result.best_loss:
                result.best_loss, result.best_iteration, self._best_state = final, self.iteration, None
            if self._best_state is not None:
                with torch.no_grad():
                    for name in self.masks:
                        self.params[name].copy_(self._best_state[name])
                    for name, buffer in self.watched_buffers:
                        buffer.copy_(self._best_state[f"buffer:{name}"])
        finally:
            self.close()
        return result

    def close(self) -> None:
        """Restore the ``requires_grad`` flags and module modes of before the session (idempotent)."""
        if self._closed:
            return
        for name, p in self.params.items():
            p.requires_grad_(self._flags[name])
        for module, mode in self._modes:
            module.train(mode)
        self._best_state = None
        self.frozen = None
        self._closed = True
