"""The embedded world: determinism, disjoint splits, correct QA, exact edit triplets."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from embedded_world import COLOURS, SHAPES, ShapesWorld, render_scene, sample_rng, sample_scene
from embedded_world.render import shape_mask
from embedded_world.text import QUESTIONS, canonical_caption


def test_vocabulary_size():
    assert len(SHAPES) >= 8 and len(COLOURS) >= 6


def test_deterministic_from_seed_and_index():
    a = ShapesWorld("train", 20, seed=3)
    b = ShapesWorld("train", 20, seed=3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    c = ShapesWorld("train", 20, seed=4)
    assert not torch.equal(a.images, c.images)
    # sample i does not depend on how many samples were built
    assert torch.equal(ShapesWorld("train", 5, seed=3).images, a.images[:5])


def test_splits_are_disjoint():
    splits = {s: ShapesWorld(s, 300, seed=0) for s in ("train", "val", "test")}
    hashes = {s: {w.images[i].numpy().tobytes() for i in range(len(w))} for s, w in splits.items()}
    assert not hashes["train"] & hashes["val"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]


def test_qa_answers_match_the_scene():
    world = ShapesWorld("val", 50, seed=0)
    for i in range(50):
        item = world[i]
        scene = world.scenes[i]
        qa = dict(zip(item["questions"], item["answers"]))
        assert qa[QUESTIONS["shape"]] == SHAPES[item["label"]] == scene.main.shape
        assert qa[QUESTIONS["colour"]] == scene.main.colour
        assert qa[QUESTIONS["describe"]] == canonical_caption(scene)
        assert qa[QUESTIONS["count"]] == ("two" if scene.second is not None else "one")
        assert scene.main.shape in item["caption"]


def test_main_object_colour_is_rendered():
    scene = sample_scene(sample_rng(0, "train", 7), second_object_prob=0.0)
    img = render_scene(scene, 64).astype(float)
    cov = shape_mask(scene.main, 64)
    inside = img[cov == 1.0].mean(axis=0)
    assert np.allclose(inside, COLOURS[scene.main.colour], atol=1.0)


def test_edit_triplets_are_exact():
    world = ShapesWorld("train", 40, seed=1, with_edits=True)
    kinds = set()
    for i in range(40):
        item = world[i]
        edit = world.edit(i)
        kinds.add(edit.kind)
        expected = torch.from_numpy(render_scene(edit.edited, 32)).permute(2, 0, 1).float() / 255
        assert torch.equal(item["edited_image"], expected)
        assert item["edit_instruction"] == edit.instruction
        if edit.kind == "recolour":
            assert edit.edited.main.colour in edit.instruction
            assert (
                dataclasses.replace(edit.edited.main, colour=world.scenes[i].main.colour)
                == world.scenes[i].main
            )
        assert not torch.equal(item["edited_image"], item["image"])
    assert {"recolour", "reshape", "move"} <= kinds


def test_image_size_and_range():
    item = ShapesWorld("test", 2, seed=0, image_size=48)[1]
    assert item["image"].shape == (3, 48, 48)
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
