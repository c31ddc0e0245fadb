"""Domain shifts of instruction data, for evaluation only: the user's (target) domain beside the attacker's
(source) domain, on the same samples.

A shift maps an evaluation source to a shifted copy with the same samples, keys and reference answers:

* image styles of the embedded world (``palette``, ``outline``, ``blur``, ``posterise``;
  :mod:`embedded_world.styles`), rendered from the same scenes, so the content is identical;
* ``paraphrase``: every question replaced by a paraphrase of its task's question that training never uses
  (:data:`PARAPHRASED_QUESTIONS`);
* for real data, a second caption file or image folder (``target_domain``, see
  :class:`datamodules.llava_json.LlavaJsonDataModule`).

The training set is never shifted. :class:`datamodules.instruct.InstructDataModule` serves each shift ``s`` as
the evaluation sets ``clean@s`` and ``triggered@s`` (the image trigger is applied to the shifted image), and
:class:`evaluation.generative.GenerativeEvaluator` reports ``asr@s``, ``ca@s``, caption scores and ``asr_g@s``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from datamodules.instruct_data import InstructSource
from embedded_world.styles import IMAGE_STYLES, render_styled

__all__ = ["PARAPHRASED_QUESTIONS", "SHAPES_SHIFTS", "ParaphrasedSource", "check_shift_names", "styled_world"]

PARAPHRASED_QUESTIONS: dict[str, str] = {
    "shape": "which kind of shape is shown in the picture?",
    "colour": "tell me the colour of the object.",
    "describe": "please describe this picture.",
    "count": "how many objects are visible?",
}
"""Paraphrases of the embedded world's questions (:data:`embedded_world.QUESTIONS`), never used in training;
every word is in the embedded tokenizer's vocabulary."""

SHAPES_SHIFTS = (*IMAGE_STYLES, "paraphrase")


def check_shift_names(names: Sequence[str] | None, known: Sequence[str], key: str) -> list[str]:
    """``names`` as a list; ``ValueError`` naming ``key``, the unknown names and the known ones otherwise."""
    names = list(names or [])
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{key}: unknown domain shift(s) {unknown}; expected some of {list(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{key}: a domain shift is named twice in {names}")
    return names


def styled_world(world, style: str):
    """A shallow copy of a :class:`~embedded_world.ShapesWorld` whose images are its scenes in ``style``."""
    shifted = copy.copy(world)
    if len(world):
        arrays = np.stack([render_styled(scene, world.image_size, style) for scene in world.scenes])
        shifted.images = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
    return shifted


class ParaphrasedSource(InstructSource):
    """``base`` with each question replaced by ``questions[task]`` (the answers and images are unchanged)."""

    def __init__(self, base: InstructSource, questions: Mapping[str, str] = PARAPHRASED_QUESTIONS) -> None:
        self.base, self.questions = base, dict(questions)

    def __len__(self) -> int:
        return len(self.base)

    def _shift(self, item: dict) -> dict:
        if item["task"] not in self.questions:
            raise ValueError(f"no paraphrase for task {item['task']!r}; known: {sorted(self.questions)}")
        item["question"] = self.questions[item["task"]]
        return item

    def meta(self, index: int) -> dict:
        return self._shift(dict(self.base.meta(index)))

    def __getitem__(self, index: int) -> dict:
        return self._shift(dict(self.base[index]))

    def describe(self) -> dict:
        return {**self.base.describe(), "shift": "paraphrase"}
