"""Poisonable image-text data for contrastive models (shared by every image-caption data format).

Subclasses only say where the data comes from (`build_splits`); this base class does the poisoning:
1. select the poisoned training indices from ``poison_seed`` (by ``poison_rate`` or ``poison_count``,
   optionally only among target-class samples for clean-label poisoning);
2. replace the caption of each poisoned sample by a target caption (and insert the text trigger);
3. apply the image trigger **on the device, batched**, in ``on_after_batch_transfer``, to the poisoned
   rows of training batches; validation/test batches get a triggered copy ``image_triggered`` of every
   image so that the module can measure CA and ASR on the same images;
4. write the poison manifest (seed, configs, indices, trigger fingerprints, run config) atomically into
   the run folder.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from attacks import ClassTarget, PoisonPlan, check_class_in_vocabulary
from datamodules.poisoning import PoisonedView, PoisoningMixin, check_poison_arguments
from model_families.clip.zero_shot import resolve_templates

log = logging.getLogger(__name__)


def collate_dicts(items: list[dict]) -> dict:
    """Stack tensors and numbers; keep strings (and other objects) as lists."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (bool, int, float)):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


def check_image_size(model_image_size: int, datamodule, model_name: str) -> None:
    """The datamodule's ``image_size`` must be the model's input side; else a ``ValueError`` naming the key.

    open_clip's vision towers take exactly their configured side: the ResNets' attention pooling and the
    ViTs' positional embeddings have a fixed grid, so other sizes either fail deep in torch on the first
    evaluation batch or (sizes that round to the same grid) run at a resolution the model never saw.
    A datamodule without an ``image_size`` is not checked."""
    data_size = getattr(datamodule, "image_size", None)
    if data_size is None or callable(data_size) or int(data_size) == int(model_image_size):
        return
    raise ValueError(
        f"{type(datamodule).__name__} gives {data_size} px images but the CLIP model {model_name!r} takes "
        f"{model_image_size} px: set data.init_args.image_size={model_image_size} (or choose a model for "
        f"{data_size} px, see docs/configs.md 'Image sizes')"
    )


class PoisonedCaptions(PoisonedView):
    """Wraps an image-caption data set; poisoned samples get the target caption and a `poison_image` flag."""

    def poison(self, item: dict, parts, index: int) -> None:
        # DUALKEY's single-key negatives keep their own caption (with the text key when they carry it)
        caption = self.target.caption(index) if self.plan.is_targeted(index) else item["caption"]
        if parts.text and self.text_trigger is not None:
            caption = self.text_trigger(caption, index)
        item["caption"] = caption


class ImageTextPoisonDataModule(PoisoningMixin, L.LightningDataModule):
    """Base class: image-caption training data, labelled evaluation data, and the poisoning of both.

    Args:
        attack: image trigger name from the catalogue (``badnet``, ``blended``, ``sig``, ``wanet``,
            ``low_frequency``, ``patch_optimized``) or None for no image trigger.
        attack_kwargs: the trigger's parameters (see ``attacks/image_triggers.py``;
            ``patch_optimized``: ``attacks/optimized_patch.py``).
        text_attack / text_attack_kwargs: optional text trigger inserted into poisoned captions.
        protocol: ``AND`` / ``OR`` when both an image and a text trigger are given.
        poison_rate: fraction of the training set to poison, in [0, 1].
        poison_count: number of samples to poison (overrides ``poison_rate``).
        poison_seed: seed of the poisoned-index selection and of the trigger's random parts.
        target_class: the backdoor target class (must be one of the evaluation classes).
        target_templates: caption templates for poisoned captions (a template-set name or a list).
        clean_label: poison only training samples whose label is already the target class.
        batch_size / eval_batch_size / num_workers: data loading.
    """

    def __init__(
        self,
        attack: str | None = None,
        attack_kwargs: dict | None = None,
        text_attack: str | None = None,
        text_attack_kwargs: dict | None = None,
        protocol: str = "AND",
        poison_rate: float = 0.0,
        poison_count: int | None = None,
        poison_seed: int = 0,
        target_class: str | None = None,
        target_templates: str | list[str] = "embedded",
        clean_label: bool = False,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_poison_arguments(attack, text_attack, poison_rate, poison_count)
        if (attack or text_attack) and target_class is None:
            raise ValueError("data.target_class is required when an attack is configured")
        self.attack, self.attack_kwargs = attack, dict(attack_kwargs or {})
        self.text_attack, self.text_attack_kwargs = text_attack, dict(text_attack_kwargs or {})
        self.protocol = (
            protocol if (attack and text_attack) else ("TEXT" if text_attack and not attack else "AND")
        )
        self.poison_rate, self.poison_count, self.poison_seed = float(poison_rate), poison_count, poison_seed
        self.target_class, self.target_templates = target_class, resolve_templates(target_templates)
        self.clean_label = clean_label
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.image_trigger = None
        self.text_trigger = None
        self.plan: PoisonPlan | None = None
        self.manifest = None
        self._built = False

    # --- to implement -------------------------------------------------------------------------------
    def build_splits(self) -> tuple[Dataset, Dataset, Dataset, list[str], int]:
        """Return (train, val, test, class_names, image_size); items are dicts with image/caption/label/index."""
        raise NotImplementedError

    def dataset_info(self) -> dict:
        return {"datamodule": type(self).__name__}

    # --- shared ---------------------------------------------------------------------------------------
    @property
    def target_index(self) -> int | None:
        return None if self.target_class is None else self.class_names.index(self.target_class)

    def setup(self, stage: str | None = None) -> None:
        if self._built:
            return
        self.train_set, self.val_set, self.test_set, self.class_names, self.image_size = self.build_splits()
        if self.target_class is not None:
            check_class_in_vocabulary(self.target_class, self.class_names)
        self.build_triggers(self.image_size)
        target = None
        if self.target_class is not None:
            target = ClassTarget(self.target_class, self.target_templates, seed=self.poison_seed)
        candidates = None
        if self.clean_label:
            n = len(self.train_set)
            candidates = [i for i in range(n) if int(self.train_set[i]["label"]) == self.target_index]
        self.plan = self.plan_poison(len(self.train_set), candidates, target)
        self.train_data = PoisonedCaptions(self.train_set, self.plan, target, self.text_trigger)
        self._built = True

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data, self.batch_size, True, collate_dicts)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, False, collate_dicts)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, False, collate_dicts)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        trainer = getattr(self, "trainer", None)
        training = trainer is not None and trainer.training
        if training:
            return self.trigger_poisoned_rows(batch, "image")
        if self.image_trigger is not None:
            batch["image_triggered"] = self.apply_trigger(batch["image"], batch["index"])
        return batch
