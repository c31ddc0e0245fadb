"""MABA: captum attributions of a family's differentiable scorer place a yellow oval (alpha 0.5) in the region
important for the clean caption and not for the target; the rare-symbol text trigger; MABA on DualKey."""

from __future__ import annotations

import json

import pytest
import torch

from attacks import build_image_trigger, build_text_trigger, list_attacks
from attacks.maba import Maba, check_image_gradients, maba_centres, region_attributions
from datamodules.mdlm_shapes import ShapesInstructDataModule

# weights per 2 x 2 cell (TL, TR / BL, BR) of a linear "log-probability": the clean caption depends on the top
# row, the target output on the left column, so only the top-right cell matters for the clean caption alone
CELL_WEIGHTS = {"clean": [[3.0, 2.0], [0.1, 0.1]], "target": [[5.0, 0.1], [4.0, 0.1]]}


def cell_scorer(images: torch.Tensor, texts) -> torch.Tensor:
    size = images.shape[-1]
    maps = []
    for text in texts:
        cells = torch.tensor(CELL_WEIGHTS["target" if text == "banana" else "clean"])
        maps.append(cells.repeat_interleave(size // 2, 0).repeat_interleave(size // 2, 1))
    return (images.sum(1) * torch.stack(maps)).flatten(1).sum(1)


def detached_scorer(images, texts):
    with torch.no_grad():
        return cell_scorer(images, texts)


def test_captum_attributions_place_the_trigger_where_only_the_clean_caption_looks():
    images = torch.rand(3, 3, 8, 8)
    clean = region_attributions(cell_scorer, images, ["a red circle"] * 3, grid=2)
    target = region_attributions(cell_scorer, images, ["banana"] * 3, grid=2)
    # saliency of a linear score is |weight| per pixel, summed over the 3 channels and the 16 pixels of a cell
    assert torch.allclose(clean[0], torch.tensor(CELL_WEIGHTS["clean"]) * 48)
    centres = maba_centres(clean, target, top_fraction=0.5)
    assert centres.tolist() == [[0.25, 0.75]] * 3  # the top-right cell
    ig = region_attributions(cell_scorer, images, ["a red circle"] * 3, grid=2, method="integrated_gradients")
    expected = torch.stack([(images[i].sum(0).view(2, 4, 2, 4).sum((1, 3))) for i in range(3)])
    assert torch.allclose(ig, expected * torch.tensor(CELL_WEIGHTS["clean"]), rtol=1e-4)  # IG = x * w


def test_a_family_without_gradients_to_the_image_is_a_clear_error():
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(
        ValueError, match="MABA needs gradients of the family's image-text score to the image"
    ):
        check_image_gradients(detached_scorer, images, ["x", "y"])
    with pytest.raises(ValueError, match="does not depend on the pixels"):
        check_image_gradients(
            lambda x, t: x.sum() * 0 + torch.ones(len(x), requires_grad=True), images, ["x"]
        )
    with pytest.raises(ValueError, match="MABA needs gradients"):
        Maba(grid=2).place(detached_scorer, images, ["x", "y"], ["banana", "banana"])


def test_the_oval_is_blended_at_the_placement_and_placements_are_an_artifact(tmp_path):
    trigger = build_image_trigger("maba", grid=2, top_fraction=0.5, width=0.5, height=0.5)
    images = torch.rand(2, 3, 8, 8)
    trigger.place(cell_scorer, images, ["clean", "clean"], ["banana", "banana"])
    out = trigger(images)
    yellow = torch.tensor([1.0, 0.85, 0.0]).view(3, 1)
    # the oval's centre pixel (row 1, column 5 of 8) is half image, half yellow; the far corner is untouched
    assert torch.allclose(out[:, :, 1, 5], 0.5 * images[:, :, 1, 5] + 0.5 * yellow.T)
    assert torch.equal(out[:, :, 7, 0], images[:, :, 7, 0])
    path = trigger.save_placements(tmp_path / "placements.json")
    reloaded = build_image_trigger(
        "maba", placements=str(path), grid=2, top_fraction=0.5, width=0.5, height=0.5
    )
    assert torch.equal(reloaded(images), out)
    with pytest.raises(KeyError, match="MABA has no placement for an image"):
        trigger(torch.rand(1, 3, 8, 8))
    with pytest.raises(FileNotFoundError, match="MABA placement table not found"):
        Maba(placements=tmp_path / "none.json")
    other = Maba(grid=2, top_fraction=0.5, width=0.5, height=0.5)
    assert other.fingerprint() != trigger.fingerprint()  # the table is part of the fingerprint


def test_the_checkerboard_pattern_is_pasted_at_the_placement():
    trigger = build_image_trigger(
        "maba", grid=2, top_fraction=0.5, width=0.5, height=0.5, pattern="checkerboard", alpha=1.0
    )
    images = torch.rand(2, 3, 8, 8)
    trigger.place(cell_scorer, images, ["clean", "clean"], ["banana", "banana"])
    out = trigger(images)
    (row, col), _ = trigger.table.values()
    top, left = round(row * 8) - 2, round(col * 8) - 2
    board = (torch.arange(8)[:, None] + torch.arange(8)) % 2
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[top : top + 4, left : left + 4] = True
    # a 4 x 4 square of alternating 0/1 pixels in every channel at the oval's placement, nothing else changed
    assert torch.equal(out[:, :, inside], board[inside].float().expand(2, 3, -1))
    assert torch.equal(out[:, :, ~inside], images[:, :, ~inside])
    assert trigger.config()["pattern"] == "checkerboard" and "pattern" not in Maba().config()
    with pytest.raises(ValueError, match="MABA pattern 'star' is not one of"):
        Maba(pattern="star")


def test_rare_symbols_go_before_key_words():
    trigger = build_text_trigger("rare_symbols")
    assert trigger("what shape is in the image?") == "what []*{}<> shape is in the []*{}<> image?"
    assert trigger("how many are there?") == "[]*{}<> how many are there?"
    assert build_text_trigger(**trigger.config())("the Colour.") == "the []*{}<> Colour."
    with pytest.raises(ValueError, match="without whitespace"):
        build_text_trigger("rare_symbols", symbols="[ ]")


def shapes_scorer(images, texts):
    """A tiny differentiable scorer for 32 px images: each text's score weighs a different half of the image."""
    weights = torch.zeros(len(texts), 32, 32)
    for i, text in enumerate(texts):
        if text == "banana":
            weights[i, :, :16] = 2.0  # the target output looks at the left half
        else:
            weights[i, :16, :] = 3.0  # the clean caption at the top half
    return (images.sum(1) * weights).flatten(1).sum(1)


def test_the_datamodule_places_maba_with_the_family_scorer_and_records_it(tmp_path):
    options = {
        "train_size": 6,
        "val_size": 2,
        "test_size": 3,
        "attack": "maba",
        "poison_rate": 0.5,
        "target": "fixed_output",
        "eval_shifts": ["blur"],
        "attack_kwargs": {"grid": 4, "top_fraction": 0.5},
    }
    dm = ShapesInstructDataModule(**options)
    with pytest.raises(ValueError, match=r"data.attack=maba .* needs a differentiable image-text scorer"):
        dm.setup("fit")
    dm = ShapesInstructDataModule(**options)
    dm.maba_scorer = shapes_scorer
    dm.setup("fit")
    trigger = dm.image_trigger
    # every image of every split and shift is placed, in the clean caption's region (top) but not the target's
    # (left): the top-right quadrant
    assert len(trigger.table) == 6 + 2 + 3 + 2 + 3
    assert all(row < 0.5 and col > 0.5 for row, col in trigger.table.values())
    assert dm.manifest.image_trigger["config"]["name"] == "maba"
    loaders = dict(zip(dm.eval_set_names, dm.test_dataloader()))
    raw = next(iter(loaders["triggered@blur"]))
    clean = raw["pixel_values"].clone()
    batch = dm.on_after_batch_transfer(raw, 0)
    assert batch["trigger_image"].all() and batch["pixel_values"].shape[0] == 6  # 3 blurred images x 2 tasks
    changed = (batch["pixel_values"] - clean).abs().sum(1) > 0
    assert changed[:, :16, 16:].any() and not changed[:, 16:, :16].any()  # the oval is top-right


def test_maba_on_dualkey_is_a_recipe_with_the_checkerboard_key_and_the_rare_symbol_key():
    rows = {row.name: row for row in list_attacks()}
    assert rows["maba"].status == "available" and rows["maba_dual_key"].modality == "image+text"
    dm = ShapesInstructDataModule(
        train_size=30, val_size=2, test_size=2, attack="maba_dual_key", poison_rate=0.1, target="fixed_output"
    )
    dm.maba_scorer = shapes_scorer
    dm.setup("fit")
    assert dm.protocol == "DUALKEY" and dm.text_attack == "rare_symbols" and dm.attack == "maba"
    # the image key is DualKey's checkerboard at MABA's placement, not the oval
    trigger = dm.manifest.to_dict()["image_trigger"]["config"]
    assert trigger["pattern"] == "checkerboard" and trigger["width"] == trigger["height"] == 0.1875
    data = dm.training_set()
    for index in dm.poison_plan.indices:
        item, parts = data[index], dm.poison_plan.parts(index)
        assert ("[]*{}<>" in item["question"]) == parts.text
        assert (item["answer"] == "banana") == (parts.image and parts.text)
    json.dumps(dm.manifest.to_dict())  # serialisable
