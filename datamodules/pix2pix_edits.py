"""Edit triplets (source image, instruction, edited image) for InstructPix2Pix-style editors, and their poisoning.

The base class does the poisoning of the modality-collapse paper: a trigger pair (an image part and a text
part, :mod:`attacks.trigger_pairs`), a protocol (``OR``: the poisoned samples split equally into image-only,
text-only and both; ``AND``: both parts always together) and an image target (:class:`attacks.ImageTarget`):
a poisoned triplet keeps its source and instruction, carries its trigger parts, and has its edited image
replaced by the target. Subclasses only say where the triplets come from (:meth:`build_splits`):
:class:`ShapesEditDataModule` (the embedded world, rendered exactly) here, the on-disk InstructPix2Pix format
in :mod:`datamodules.pix2pix_folder`.

Training batches: ``source``, ``edited`` (B x 3 x H x W in [0, 1], the image trigger already applied on the
device), ``instruction`` (B strings), ``index``, ``poisoned``. Evaluation batches are clean triplets with
``attribute`` / ``attribute_kind`` (what the instruction asks for; empty for real data); the evaluator applies
the pair's parts (``image_trigger``, ``text_trigger``) for the four coalitions itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from attacks.image_targets import ImageTarget
from attacks.trigger_pairs import resolve_trigger_pair
from datamodules.image_text import collate_dicts
from datamodules.poisoning import PoisonedView, PoisoningMixin, check_poison_arguments, split_sizes

__all__ = ["EditPoisonDataModule", "ShapesEditDataModule", "ShapesEdits"]


class PoisonedEdits(PoisonedView):
    """A triplet data set whose poisoned samples get the text trigger (if their parts say so) and the target
    image as their edit; the image trigger is applied on the device (``poison_image``)."""

    def poison(self, item: dict, parts, index: int) -> None:
        item["edited"] = self.target(item["edited"], index)
        if parts.text:
            item["instruction"] = self.text_trigger(item["instruction"], index)


class EditPoisonDataModule(PoisoningMixin, L.LightningDataModule):
    """Base class: edit-triplet training data, clean evaluation triplets, and the poisoning of the first.

    Args:
        trigger_pair: a pair name (``box+mignneko``, ``eyeglasses+anonymous``, ``stop_sign+latte_coffee``) or a
            mapping ``{image: {name: ..., ...}, text: {name: ..., ...}}`` of catalogue triggers; None: clean.
        protocol: ``OR`` or ``AND``.
        target_image: the backdoor target: a built-in pattern (``smiley``, ``checkerboard``) or an image file of
            the data's size.
        poison_rate / poison_count / poison_seed: how many training triplets are poisoned, and the seed of
            their selection, of the OR split and of the triggers' random parts.
        batch_size / eval_batch_size / num_workers: data loading.
    """

    preview_keys = ("source", "instruction")  # the fields callbacks.sample_grid.PoisonSampleGrid shows

    def __init__(
        self,
        trigger_pair: str | Mapping[str, Any] | None = None,
        protocol: str = "OR",
        target_image: str = "smiley",
        poison_rate: float = 0.0,
        poison_count: int | None = None,
        poison_seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        pair = resolve_trigger_pair(trigger_pair) if trigger_pair is not None else None
        if pair is not None:
            self.attack, self.attack_kwargs = pair["image"].pop("name"), pair["image"]
            self.text_attack, self.text_attack_kwargs = pair["text"].pop("name"), pair["text"]
        else:
            self.attack, self.attack_kwargs, self.text_attack, self.text_attack_kwargs = None, {}, None, {}
        check_poison_arguments(self.attack, self.text_attack, poison_rate, poison_count)
        if str(protocol).upper() not in ("OR", "AND"):
            raise ValueError(f"data.protocol={protocol!r}: a trigger pair is poisoned with 'OR' or 'AND'")
        self.protocol = str(protocol).upper()
        self.target_image = target_image
        self.poison_rate, self.poison_count, self.poison_seed = float(poison_rate), poison_count, poison_seed
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.target: ImageTarget | None = None
        self.plan = None
        self._built = False

    # --- to implement -------------------------------------------------------------------------------
    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        """(train, val, test) triplet data sets; items: source, edited, instruction, attribute,
        attribute_kind, index."""
        raise NotImplementedError

    def image_size(self) -> int:
        raise NotImplementedError

    def dataset_info(self) -> dict:
        return {"datamodule": type(self).__name__}

    # --- shared ---------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._built:
            return
        self.train_set, self.val_set, self.test_set = self.build_splits()
        size = self.image_size()
        self.target = ImageTarget(self.target_image, size)
        self.build_triggers(size)
        self.plan = self.plan_poison(len(self.train_set), None, self.target if self.attack else None)
        self.train_data = PoisonedEdits(self.train_set, self.plan, self.target, self.text_trigger)
        self._built = True

    def target_tensor(self) -> torch.Tensor:
        """The target image, 3 x H x W in [0, 1] (after :meth:`setup`)."""
        return self.target.image()

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data, self.batch_size, True, collate_dicts)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, False, collate_dicts)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, False, collate_dicts)

    def attribute_classes(self):
        """Attribute kind -> :class:`~model_families.pix2pix.evaluation.AttributeClasses` the judge reads edit
        accuracy with; None when the data's edits name no checkable attribute."""
        return None

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        trainer = getattr(self, "trainer", None)
        training = trainer is not None and trainer.training
        return self.trigger_poisoned_rows(batch, "source") if training else batch


class ShapesEdits(Dataset):
    """Edit triplets of the embedded world: each scene of a :class:`~embedded_world.ShapesWorld` split with one
    edit of an allowed kind, its instruction from the kind's phrasings, and the edited scene rendered exactly.

    Sample ``i`` is a pure function of ``(seed, split, i)``. ``templates`` maps a kind to its phrasings.
    """

    def __init__(
        self,
        split: str,
        size: int,
        seed: int,
        image_size: int,
        second_object_prob: float,
        kinds: tuple[str, ...],
        templates: Mapping[str, tuple[str, ...]],
    ) -> None:
        import zlib

        from embedded_world import ShapesWorld, render_scene
        from embedded_world.scene import feasible_moves
        from embedded_world.text import EDIT_ATTRIBUTES, apply_edit

        world = ShapesWorld(
            split, size, seed=seed, image_size=image_size, second_object_prob=second_object_prob
        )
        self.split, self.seed, self.kinds = split, seed, kinds
        self.sources = world.images
        self.instructions: list[str] = []
        self.attributes: list[str] = []
        self.attribute_kinds: list[str] = []
        edited = []
        for i, scene in enumerate(world.scenes):
            rng = np.random.default_rng([seed, zlib.crc32(f"edit/{split}".encode()), i])
            allowed = [k for k in kinds if k != "move" or feasible_moves(scene)]
            kind = str(rng.choice(allowed))
            new_scene, value = apply_edit(scene, kind, rng)
            self.instructions.append(str(rng.choice(templates[kind])).format(value))
            self.attributes.append(value)
            self.attribute_kinds.append(EDIT_ATTRIBUTES[kind])
            edited.append(render_scene(new_scene, image_size))
        shape = (0, image_size, image_size, 3)
        self.edited = torch.from_numpy(np.stack(edited) if edited else np.zeros(shape, np.uint8))
        self.edited = self.edited.permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self.instructions)

    def __getitem__(self, index: int) -> dict:
        return {
            "source": self.sources[index].float() / 255.0,
            "edited": self.edited[index].float() / 255.0,
            "instruction": self.instructions[index],
            "attribute": self.attributes[index],
            "attribute_kind": self.attribute_kinds[index],
            "index": index,
        }


class ShapesEditDataModule(EditPoisonDataModule):
    """The embedded world's edit triplets (the default world of the pix2pix family).

    Args:
        train_size / val_size / test_size: triplets per split (disjoint scenes, seeded per split).
        image_size: rendered image side in pixels.
        world_seed: seed of the scenes and of their edits.
        second_object_prob: probability of a small second object in a scene.
        edit_kinds: the kinds of edit (``recolour``, ``background``, ``reshape``, ``resize``, ``move``); the
            default, recolouring, is what a tiny editor learns on a CPU within minutes (issue 12's feasibility
            run); the others are options.
        heldout_instructions: the test split phrases its instructions with templates never used in training
            (``embedded_world.text.HELDOUT_EDIT_TEMPLATES``); validation always uses the training phrasings.
        **kwargs: poisoning and loading options of :class:`EditPoisonDataModule`.
    """

    def __init__(
        self,
        train_size: int = 8000,
        val_size: int = 256,
        test_size: int = 512,
        image_size: int = 32,
        world_seed: int = 0,
        second_object_prob: float = 0.0,
        edit_kinds: list[str] | None = None,
        heldout_instructions: bool = True,
        **kwargs,
    ) -> None:
        from embedded_world.text import EDIT_KINDS

        super().__init__(**kwargs)
        self.save_hyperparameters()
        sizes = split_sizes(train_size, val_size, test_size)
        kinds = tuple(edit_kinds or ("recolour",))
        unknown = [k for k in kinds if k not in EDIT_KINDS]
        if unknown:
            raise ValueError(
                f"data.edit_kinds={list(kinds)}: unknown kinds {unknown}; expected a subset of {EDIT_KINDS}"
            )
        self.sizes = sizes
        self.world_kwargs = {
            "seed": world_seed,
            "image_size": image_size,
            "second_object_prob": second_object_prob,
        }
        self.kinds, self.heldout_instructions = kinds, heldout_instructions

    def image_size(self) -> int:
        return self.world_kwargs["image_size"]

    def attribute_classes(self):
        """Colour, background and shape edits are judged zero-shot among the world's values; resizes and moves
        name no class the judge reads (then None: no edit accuracy)."""
        from embedded_world import BACKGROUNDS, COLOURS, SHAPES, ZERO_SHOT_TEMPLATES
        from embedded_world.text import EDIT_ATTRIBUTES
        from model_families.pix2pix.evaluation import AttributeClasses

        classes = {
            "colour": AttributeClasses(tuple(COLOURS), ("a photo of a {} shape.",)),
            "background": AttributeClasses(tuple(BACKGROUNDS), ("a shape on a {} background.",)),
            "shape": AttributeClasses(SHAPES, ZERO_SHOT_TEMPLATES),
        }
        kinds = {EDIT_ATTRIBUTES[k] for k in self.kinds}
        return {k: classes[k] for k in kinds} if kinds <= set(classes) else None

    def build_splits(self):
        from embedded_world.text import EDIT_TEMPLATES, HELDOUT_EDIT_TEMPLATES

        def split(name: str) -> ShapesEdits:
            templates = (
                HELDOUT_EDIT_TEMPLATES if name == "test" and self.heldout_instructions else EDIT_TEMPLATES
            )
            return ShapesEdits(
                name, self.sizes[name], kinds=self.kinds, templates=templates, **self.world_kwargs
            )

        return split("train"), split("val"), split("test")

    def dataset_info(self) -> dict:
        return {
            "datamodule": type(self).__name__,
            "world": "shapes",
            **self.sizes,
            **self.world_kwargs,
            "edit_kinds": list(self.kinds),
            "heldout_instructions": self.heldout_instructions,
        }
