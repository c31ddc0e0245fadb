"""What every poisonable data module shares: argument checks, trigger construction, the poison plan and its
manifest (written atomically into the run folder by rank 0), and an evaluation sampler that is exact under DDP.

Used by :class:`datamodules.image_text.ImageTextPoisonDataModule` (contrastive image-caption data) and
:class:`datamodules.instruct.InstructDataModule` (instruction data for generative VLMs).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from attacks import PoisonManifest, PoisonPlan, build_image_trigger, build_text_trigger
from datamodules.resumable import LoaderPosition, ResumableDataLoader

log = logging.getLogger(__name__)


def check_poison_arguments(
    attack: str | None, text_attack: str | None, poison_rate: float, poison_count: int | None
) -> None:
    """Raise ``ValueError`` naming the ``data.*`` key for a rate outside [0, 1], a negative count, or poisoning
    without any trigger."""
    if not 0.0 <= float(poison_rate) <= 1.0:
        raise ValueError(f"data.poison_rate must be in [0, 1], got {poison_rate}")
    if poison_count is not None and poison_count < 0:
        raise ValueError(f"data.poison_count must be >= 0, got {poison_count}")
    if (poison_rate or poison_count) and attack is None and text_attack is None:
        raise ValueError(
            "data.poison_rate/poison_count > 0 but neither data.attack nor data.text_attack is set"
        )


def split_sizes(train_size: int, val_size: int, test_size: int) -> dict[str, int]:
    """``{"train": ..., "val": ..., "test": ...}``; a negative size is a ``ValueError`` naming its ``data.*`` key."""
    sizes = {"train": train_size, "val": val_size, "test": test_size}
    for split, value in sizes.items():
        if value < 0:
            raise ValueError(f"data.{split}_size must be >= 0, got {value}")
    return sizes


def trigger_parameters(attack: str | None) -> set[str]:
    """Names of the constructor parameters of image trigger ``attack`` (empty for unknown or None)."""
    from attacks import IMAGE_TRIGGERS

    cls = IMAGE_TRIGGERS.get(attack) if attack else None
    return set(inspect.signature(cls).parameters) if cls is not None else set()


class PoisonedView(Dataset):
    """A training set seen through its poison plan: every item gets ``poisoned`` and ``poison_image`` flags (the
    image trigger is applied on the device), and a poisoned item is rewritten by :meth:`poison` (a subclass
    says how: the target caption, the target image, ...)."""

    def __init__(self, base: Dataset, plan: PoisonPlan | None, target, text_trigger=None) -> None:
        self.base, self.plan, self.target, self.text_trigger = base, plan, target, text_trigger

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.base[index])
        parts = self.plan.parts(index) if self.plan is not None and self.plan.is_poisoned(index) else None
        item["poisoned"] = parts is not None
        item["poison_image"] = bool(parts is not None and parts.image)
        if parts is not None:
            self.poison(item, parts, index)
        return item

    def poison(self, item: dict, parts, index: int) -> None:
        """Rewrite the poisoned ``item`` in place (``parts``: which trigger parts it carries)."""
        raise NotImplementedError


class UnpaddedDistributedSampler(torch.utils.data.DistributedSampler):
    """Rank r takes indices r, r + W, r + 2W, ...: no padding duplicates, so sum-state metrics are exact
    under DDP. A DistributedSampler subclass, so Lightning keeps it instead of inserting a padding one."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class PoisoningMixin:
    """Trigger construction and poison planning for a ``LightningDataModule``.

    The data module sets ``attack``, ``attack_kwargs``, ``text_attack``, ``text_attack_kwargs``,
    ``poison_rate``, ``poison_count``, ``poison_seed`` and ``protocol`` in its ``__init__``; the mixin fills
    ``image_trigger``, ``text_trigger``, ``manifest`` and ``manifest_path``. It also builds the data loaders
    (``num_workers`` from the data module) and applies the image trigger on the device.
    """

    image_trigger = None
    text_trigger = None
    manifest: PoisonManifest | None = None
    manifest_path: Path | None = None
    _train_position: LoaderPosition | None = None
    _train_position_to_load: dict | None = None

    def build_triggers(self, image_size: int | None) -> None:
        """Image and text triggers from the arguments; their random parts default to ``poison_seed`` and
        fixed-pattern image triggers to the data's ``image_size``."""
        self.image_trigger = None
        if self.attack is not None:
            kwargs = dict(self.attack_kwargs)
            accepted = trigger_parameters(self.attack)
            if "seed" in accepted:
                kwargs.setdefault("seed", self.poison_seed)
            if "image_size" in accepted and image_size is not None:
                kwargs.setdefault("image_size", image_size)
            self.image_trigger = build_image_trigger(self.attack, **kwargs)
        self.text_trigger = None
        if self.text_attack is not None:
            kwargs = dict(self.text_attack_kwargs)
            kwargs.setdefault("seed", self.poison_seed)
            self.text_trigger = build_text_trigger(self.text_attack, **kwargs)

    def plan_poison(self, n: int, candidates: list[int] | None, target) -> PoisonPlan | None:
        """Select the poisoned indices of an ``n``-sample training set (among ``candidates`` when given),
        build the manifest (triggers, ``target``, data set, run config) and save it; None when not poisoning."""
        if self.poison_count is not None and self.poison_count > n:
            raise ValueError(f"data.poison_count={self.poison_count} exceeds the training set size {n}")
        if not (self.poison_rate > 0 or self.poison_count) or n == 0:
            return None
        plan = PoisonPlan.create(
            n,
            rate=None if self.poison_count else self.poison_rate,
            count=self.poison_count,
            seed=self.poison_seed,
            protocol=self.protocol,
            candidates=candidates,
        )
        self.manifest = PoisonManifest.from_plan(
            plan,
            image_trigger=self.image_trigger,
            text_trigger=self.text_trigger,
            target=target,
            dataset=self.dataset_info(),
            run_config=self.run_config(),
        )
        self.save_manifest()
        log.info("poisoned %d of %d training samples (%s)", len(plan), n, self.attack or self.text_attack)
        return plan

    def run_config(self) -> dict:
        """The resolved config of the run (recorded by the CLI on the trainer), else this module's hparams."""
        trainer = getattr(self, "trainer", None)
        cfg = getattr(trainer, "mmbackdoor_config", None) if trainer is not None else None
        return cfg or {"datamodule": dict(getattr(self, "hparams", {}))}

    def save_manifest(self) -> None:
        """Write ``poison_manifest.json`` atomically into the run folder (rank 0 only; no-op without a trainer)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or self.manifest is None or trainer.global_rank != 0:
            return
        path = Path(trainer.default_root_dir) / "poison_manifest.json"
        self.manifest.save(path)
        self.manifest_path = path

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, collate: Callable) -> DataLoader:
        """Training loaders shuffle with a ``poison_seed`` generator (and drop a ragged last batch) and keep their
        position for resuming (:class:`ResumableDataLoader`); evaluation loaders keep order and, under DDP,
        give each rank its unpadded share (exact sum-state metrics)."""
        sampler = None
        trainer = getattr(self, "trainer", None)
        if not shuffle and trainer is not None and trainer.world_size > 1:
            sampler = UnpaddedDistributedSampler(dataset, trainer.world_size, trainer.global_rank)
        common = {
            "batch_size": batch_size,
            "num_workers": self.num_workers,
            "collate_fn": collate,
            "persistent_workers": self.num_workers > 0,
        }
        if not shuffle:
            return DataLoader(dataset, sampler=sampler, drop_last=False, **common)
        self._train_position = LoaderPosition(torch.Generator().manual_seed(self.poison_seed))
        saved, self._train_position_to_load = self._train_position_to_load, None
        if saved is not None and saved["epoch_finished"]:
            self._train_position.resume_after(saved["train_loader"])
        elif saved is not None:  # a mid-epoch checkpoint: the epoch goes on after the batches trained on
            self._train_position.resume_within(saved["train_loader"])
        return ResumableDataLoader(
            dataset,
            shuffle=True,
            generator=self._train_position.generator,
            position=self._train_position,
            drop_last=len(dataset) > batch_size,
            **common,
        )

    def state_dict(self) -> dict:
        """Saved by Lightning in every checkpoint: the training loader's shuffling position, and whether the
        epoch had ended (all of its ``trainer.num_training_batches`` handed out: the resumed fit starts the next)."""
        if self._train_position is None:
            return {}
        trainer = getattr(self, "trainer", None)
        per_epoch = trainer.num_training_batches if trainer is not None else float("inf")
        return {
            "train_loader": self._train_position.state_dict(),
            "epoch_finished": self._train_position.taken >= per_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restored by Lightning before the loaders are built: the next training loader continues from it."""
        self._train_position_to_load = state if state.get("train_loader") is not None else None

    def trigger_poisoned_rows(self, batch: dict, key: str) -> dict:
        """A training batch with the image trigger applied to ``batch[key]`` on the rows flagged
        ``poison_image`` (on the device, after the transfer)."""
        if "poison_image" in batch and self.image_trigger is not None:
            rows = batch["poison_image"].bool()
            if rows.any():
                images = batch[key].clone()
                images[rows] = self.apply_trigger(images[rows], batch["index"][rows])
                batch[key] = images
        return batch

    def apply_trigger(self, images: torch.Tensor, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The image trigger on a batch already on its device (identity without an image trigger)."""
        if self.image_trigger is None:
            return images
        self.image_trigger.to(images.device)
        return self.image_trigger(images, sample_ids)
