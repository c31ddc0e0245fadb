"""The defender's data in the embedded shapes world: a small clean image set plus the evaluation splits.

A backdoor defense (InverTune, CleanCLIP, PAR) sees only ``train_dataloader()``: ``clean_size`` clean
image-caption pairs drawn from the world's *validation* stream, disjoint from the attacker's training
split and from the test split. ``val_dataloader()`` (further validation-stream scenes) and
``test_dataloader()`` (the test split) carry ``image_triggered``, the *real* trigger applied by
``on_after_batch_transfer``: it is used only to report CA and ASR, never by a defense.
"""

from __future__ import annotations

from torch.utils.data import Dataset, Subset

from datamodules.shapes_clip import ShapesCLIPDataModule, _CaptionView
from embedded_world import ShapesWorld


class DefenderShapesDataModule(ShapesCLIPDataModule):
    """Clean defender images (training loader) and triggered evaluation splits (reporting only).

    Args:
        clean_size: number of clean image-caption pairs the defender holds (validation-stream scenes
            ``0 .. clean_size - 1``); must be >= 1.
        val_size: validation scenes ``clean_size .. clean_size + val_size - 1`` of the same stream.
        test_size: the test split (as in :class:`ShapesCLIPDataModule`).
        image_size, world_seed, second_object_prob: the world, as in :class:`ShapesCLIPDataModule`.
        **kwargs: loading and reporting options of :class:`ImageTextPoisonDataModule`: ``attack``,
            ``attack_kwargs`` and ``target_class`` configure the trigger used for ASR reporting only;
            ``poison_rate`` / ``poison_count`` must stay 0 (the defender's data are clean).
    """

    def __init__(
        self,
        clean_size: int = 800,
        val_size: int = 1000,
        test_size: int = 1000,
        image_size: int = 32,
        world_seed: int = 0,
        second_object_prob: float = 0.25,
        **kwargs,
    ) -> None:
        if kwargs.get("poison_rate") or kwargs.get("poison_count"):
            raise ValueError(
                "the defender's data are clean: data.poison_rate and data.poison_count must be 0 "
                f"(got poison_rate={kwargs.get('poison_rate')}, poison_count={kwargs.get('poison_count')})"
            )
        if clean_size < 1:
            raise ValueError(
                f"data.clean_size must be >= 1: the defender needs clean images, got {clean_size}"
            )
        super().__init__(
            train_size=clean_size,
            val_size=val_size,
            test_size=test_size,
            image_size=image_size,
            world_seed=world_seed,
            second_object_prob=second_object_prob,
            **kwargs,
        )
        self.clean_size = clean_size

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset, list[str], int]:
        stream = ShapesWorld("val", self.clean_size + self.sizes["val"], **self.world_kwargs)
        view = _CaptionView(stream)
        clean = Subset(view, range(self.clean_size))
        val = Subset(view, range(self.clean_size, self.clean_size + self.sizes["val"]))
        test = _CaptionView(ShapesWorld("test", self.sizes["test"], **self.world_kwargs))
        return clean, val, test, list(ShapesWorld.class_names), self.world_kwargs["image_size"]

    def dataset_info(self) -> dict:
        return {**super().dataset_info(), "defender_clean_split": "val", "clean_size": self.clean_size}
