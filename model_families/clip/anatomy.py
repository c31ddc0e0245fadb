"""The anatomy of an open_clip image tower, as InverTune's activation tuning needs it.

InverTune (``defenses/invertune``) hooks *candidate layers* of the image tower, clusters their
neurons, and restricts its updates to the parameters that *write* the selected channels / units of a
layer (its residual writers). Which modules those are depends on the architecture, so the defense asks
a :class:`TowerAnatomy`; :data:`OPEN_CLIP_ANATOMY` describes open_clip's ``ModifiedResNet`` and
``VisionTransformer`` towers. Another tower (a SigLIP, a Hugging Face CLIP) supplies its own object
with the same four methods and passes it as the tuner's ``anatomy``.

- ``ModifiedResNet``: the candidate layers are the four stages ``visual.layer1..4``; a stage's writers
  are the output rows of its last bottleneck's ``conv3`` (and ``downsample`` conv) and the matching
  ``bn3`` (and downsample BN) entries; ``writers="all"`` adds every bottleneck of the stage.
- ``VisionTransformer``: the candidate layers are the residual blocks
  ``visual.transformer.resblocks.N``; a block's writers are ``attn.out_proj``, ``mlp.c_proj`` (and
  LayerScale ``ls_1`` / ``ls_2``); ``writers="all"`` adds those of the blocks ``0..N``.
"""

from __future__ import annotations

from typing import Literal, Protocol

from torch import nn

Writers = Literal["last", "all"]


class TowerAnatomy(Protocol):
    """What activation tuning needs to know about an image tower (names as in ``model.named_modules()``)."""

    def image_tower(self, model: nn.Module) -> tuple[nn.Module, str]:
        """The image tower and the name prefix of its modules inside ``model``."""
        ...

    def candidate_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers whose activations are compared and tuned, by name."""
        ...

    def seq_first_layers(self, model: nn.Module) -> set[str]:
        """Names of candidate layers whose outputs are sequence-first (``L x B x W``)."""
        ...

    def residual_writers(
        self, model: nn.Module, layer_name: str, writers: Writers = "last"
    ) -> list[tuple[str, nn.Module]]:
        """(name, module) of the modules whose output rows write ``layer_name``'s output channels."""
        ...


def vision_tower(model: nn.Module) -> tuple[nn.Module, str]:
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
    visual, prefix = vision_tower(model)
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
    visual, _ = vision_tower(model)
    transformer = getattr(visual, "transformer", None)
    if transformer is None or getattr(transformer, "batch_first", False):
        return set()
    return {name for name in candidate_layers(model) if ".resblocks." in name}


def block_writers(index: str, block: nn.Module) -> list[tuple[str, nn.Module]]:
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


def residual_writers(
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
            for name, module in block_writers(index, layer.get_submodule(index))
        ]
    if hasattr(layer, "mlp") and hasattr(layer, "attn"):  # ViT residual block
        parent_name, _, index = layer_name.rpartition(".")
        if writers == "last" or not index.isdigit():
            return [(f"{layer_name}.{name}", module) for name, module in block_writers("", layer)]
        parent = model.get_submodule(parent_name)
        return [
            (f"{parent_name}.{i}.{name}", module)
            for i in range(int(index) + 1)
            for name, module in block_writers("", parent[i])
        ]
    raise ValueError(f"cannot restrict updates to neurons of a {type(layer).__name__}")


class OpenClipAnatomy:
    """:class:`TowerAnatomy` of open_clip's ``ModifiedResNet`` and ``VisionTransformer`` image towers."""

    def image_tower(self, model: nn.Module) -> tuple[nn.Module, str]:
        return vision_tower(model)

    def candidate_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return candidate_layers(model)

    def seq_first_layers(self, model: nn.Module) -> set[str]:
        return seq_first_layers(model)

    def residual_writers(
        self, model: nn.Module, layer_name: str, writers: Writers = "last"
    ) -> list[tuple[str, nn.Module]]:
        return residual_writers(model, layer_name, writers)


OPEN_CLIP_ANATOMY = OpenClipAnatomy()
"""The anatomy InverTune uses unless a tuner is given another (``ActivationTuner(anatomy=...)``)."""
