"""The embedded shapes world as image-caption training data with zero-shot evaluation over shape classes."""

from __future__ import annotations

import functools

from torch.utils.data import Dataset

from datamodules.image_text import ImageTextPoisonDataModule
from datamodules.poisoning import split_sizes
from embedded_world import ShapesWorld


@functools.lru_cache(maxsize=8)
def cached_world(split: str, size: int, seed: int, image_size: int, second_object_prob: float) -> ShapesWorld:
    """Worlds are pure functions of their arguments: multi-stage commands (quickstart, tables) render once."""
    return ShapesWorld(split, size, seed=seed, image_size=image_size, second_object_prob=second_object_prob)


class _CaptionView(Dataset):
    """Only the fields contrastive training needs: image, caption, label, index."""

    def __init__(self, world: ShapesWorld) -> None:
        self.world = world

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, index: int) -> dict:
        return {
            "image": self.world.images[index].float() / 255.0,
            "caption": self.world.captions[index],
            "label": int(self.world.labels[index]),
            "index": index,
        }


class ShapesCLIPDataModule(ImageTextPoisonDataModule):
    """Embedded world for CLIP: captions for training, shape classes for zero-shot CA/ASR.

    Args:
        train_size / val_size / test_size: number of samples per split (disjoint, seeded per split).
        image_size: rendered image side in pixels.
        world_seed: seed of the world (scenes, captions); independent of ``poison_seed``.
        second_object_prob: probability of a small second object in a scene.
        **kwargs: poisoning and loading options of :class:`ImageTextPoisonDataModule`.
    """

    def __init__(
        self,
        train_size: int = 8000,
        val_size: int = 1000,
        test_size: int = 1000,
        image_size: int = 32,
        world_seed: int = 0,
        second_object_prob: float = 0.25,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        sizes = split_sizes(train_size, val_size, test_size)
        self.sizes = sizes
        self.world_kwargs = {
            "seed": world_seed,
            "image_size": image_size,
            "second_object_prob": second_object_prob,
        }

    def build_splits(self):
        worlds = {s: cached_world(s, n, **self.world_kwargs) for s, n in self.sizes.items()}
        views = [_CaptionView(worlds[s]) for s in ("train", "val", "test")]
        return (*views, list(ShapesWorld.class_names), self.world_kwargs["image_size"])

    def dataset_info(self) -> dict:
        return {"datamodule": type(self).__name__, "world": "shapes", **self.sizes, **self.world_kwargs}
