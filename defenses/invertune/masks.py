"""InverTune step 3, parameter masks for neuron-restricted updates (``update_scope="neurons"``).

Only the parameters that produce the selected channels / units change: the output rows (and biases,
BatchNorm or LayerScale entries) of the layer's *residual writers*, which the tower's anatomy names
(:meth:`model_families.clip.anatomy.TowerAnatomy.residual_writers`; ``writers="last"``: the layer's own
block, ``"all"``: every block adding into the same residual channels).
"""

from __future__ import annotations

from torch import Tensor, nn

from model_families.clip.anatomy import OPEN_CLIP_ANATOMY, TowerAnatomy, Writers


def row_mask(param: Tensor, channel_mask: Tensor) -> Tensor:
    """A boolean mask of ``param``'s shape selecting its output rows ``channel_mask``."""
    if param.shape[0] != channel_mask.shape[0]:
        raise ValueError(
            f"parameter with {param.shape[0]} output rows does not match {channel_mask.shape[0]} channels"
        )
    return channel_mask.to(param.device).reshape(-1, *([1] * (param.ndim - 1))).expand_as(param).clone()


def neuron_parameter_masks(
    model: nn.Module,
    layer_name: str,
    channel_mask: Tensor,
    writers: Writers = "last",
    anatomy: TowerAnatomy = OPEN_CLIP_ANATOMY,
) -> dict[str, Tensor]:
    """Boolean element masks (parameter shape) of the parameters producing the selected channels of
    ``layer_name``, keyed by their names in ``model.named_parameters()`` (``writers``: see
    :meth:`~model_families.clip.anatomy.TowerAnatomy.residual_writers`)."""
    masks = {}
    for module_name, module in anatomy.residual_writers(model, layer_name, writers):
        for pname, param in module.named_parameters(recurse=False):
            masks[f"{module_name}.{pname}"] = row_mask(param, channel_mask)
    if not masks:
        raise ValueError(f"layer {layer_name} has no parameters producing its output channels")
    return masks
