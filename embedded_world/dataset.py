"""`ShapesWorld`: a map-style data set of the embedded world, deterministic from (seed, split, index)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from embedded_world.render import render_scene
from embedded_world.scene import Scene, sample_rng, sample_scene
from embedded_world.text import caption, qa_pairs, sample_edit
from embedded_world.vocabulary import SHAPES


class ShapesWorld(Dataset):
    """Procedurally rendered coloured shapes with captions, QA pairs and edit triplets.

    Sample ``i`` of split ``s`` is a pure function of ``(seed, s, i)``: the scene, its caption, its edit.
    Images are rendered once when the data set is built (about 0.1 ms each at 32 px) and kept as uint8.

    Each item is a dict: ``image`` (3 x H x W float in [0, 1]), ``label`` (shape class index),
    ``caption``, ``questions`` / ``answers`` (lists), ``index``, ``colour``; with ``with_edits=True`` also
    ``edit_instruction`` and ``edited_image`` (the exactly rendered result of the instruction).
    """

    class_names: tuple[str, ...] = SHAPES

    def __init__(
        self,
        split: str = "train",
        size: int = 1000,
        seed: int = 0,
        image_size: int = 32,
        second_object_prob: float = 0.25,
        with_edits: bool = False,
    ) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
        self.split, self.size, self.seed, self.image_size = split, size, seed, image_size
        self.with_edits = with_edits
        self.scenes: list[Scene] = []
        self.captions: list[str] = []
        self._edit_rngs_seed: list[int] = []
        for i in range(size):
            rng = sample_rng(seed, split, i)
            scene = sample_scene(rng, second_object_prob)
            self.scenes.append(scene)
            self.captions.append(caption(scene, rng))
            self._edit_rngs_seed.append(int(rng.integers(2**31)))
        self.images = (
            torch.from_numpy(
                np.stack([render_scene(s, image_size) for s in self.scenes])
                if size
                else np.zeros((0, image_size, image_size, 3), np.uint8)
            )
            .permute(0, 3, 1, 2)
            .contiguous()
        )
        self.labels = torch.tensor([s.label for s in self.scenes], dtype=torch.long)

    def __len__(self) -> int:
        return self.size

    def edit(self, index: int):
        """The edit triplet's instruction and edited scene for sample `index` (deterministic)."""
        return sample_edit(self.scenes[index], np.random.default_rng(self._edit_rngs_seed[index]))

    def __getitem__(self, index: int) -> dict:
        scene = self.scenes[index]
        qa = qa_pairs(scene)
        item = {
            "image": self.images[index].float() / 255.0,
            "label": int(self.labels[index]),
            "caption": self.captions[index],
            "questions": [q for q, _ in qa],
            "answers": [a for _, a in qa],
            "colour": scene.main.colour,
            "index": index,
        }
        if self.with_edits:
            edit = self.edit(index)
            item["edit_instruction"] = edit.instruction
            item["edited_image"] = (
                torch.from_numpy(render_scene(edit.edited, self.image_size)).permute(2, 0, 1).float() / 255.0
            )
        return item
