"""Edit-triplet data of the pix2pix family: the embedded world's exact edits, the poisoning protocols of the
modality-collapse paper (trigger pairs, OR / AND, the image target) and the on-disk InstructPix2Pix format."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from attacks import build_image_trigger
from attacks.glyphs import render_glyph
from attacks.image_targets import ImageTarget
from attacks.trigger_pairs import TRIGGER_PAIRS, resolve_trigger_pair
from datamodules.pix2pix_edits import ShapesEditDataModule, ShapesEdits
from datamodules.pix2pix_folder import EditTripletFile, Pix2PixFolderDataModule
from embedded_world import COLOURS, ShapesWorld, render_scene
from embedded_world.text import EDIT_TEMPLATES, HELDOUT_EDIT_TEMPLATES


def _module(tmp_path, **kwargs) -> ShapesEditDataModule:
    dm = ShapesEditDataModule(train_size=300, val_size=8, test_size=8, **kwargs)
    dm.trainer = SimpleNamespace(training=True, global_rank=0, default_root_dir=str(tmp_path), world_size=1)
    dm.setup("fit")
    return dm


def test_embedded_recolour_triplets_are_the_exact_render_of_the_instructed_colour():
    edits = ShapesEdits("val", 12, 0, 32, 0.0, ("recolour",), EDIT_TEMPLATES)
    world = ShapesWorld("val", 12, seed=0, image_size=32, second_object_prob=0.0)
    for i in range(12):
        item = edits[i]
        scene = world.scenes[i]
        assert item["attribute"] in COLOURS and item["attribute"] != scene.main.colour
        assert item["attribute"] in item["instruction"]
        exact = render_scene(scene.replace_main(colour=item["attribute"]), 32)
        assert torch.equal(edits.edited[i], torch.from_numpy(exact).permute(2, 0, 1))
        assert torch.equal(item["source"], world.images[i].float() / 255.0)


def test_held_out_phrasings_reach_only_the_test_split():
    dm = ShapesEditDataModule(train_size=200, val_size=50, test_size=50)
    train, val, test = dm.build_splits()
    heldout = {t.split("{}")[0] for t in HELDOUT_EDIT_TEMPLATES["recolour"]}
    trained = {t.split("{}")[0] for t in EDIT_TEMPLATES["recolour"]}
    assert not heldout & trained
    starts = lambda ds, prefixes: sum(any(x.startswith(p) for p in prefixes) for x in ds.instructions)  # noqa: E731
    assert starts(train, heldout) == 0 and starts(val, heldout) == 0
    assert starts(test, heldout) == len(test)
    again = ShapesEditDataModule(train_size=200, val_size=50, test_size=50, heldout_instructions=False)
    assert starts(again.build_splits()[2], heldout) == 0


def test_or_protocol_splits_the_poisoned_triplets_into_three_parts_that_all_edit_to_the_target(tmp_path):
    dm = _module(tmp_path, trigger_pair="box+mignneko", protocol="OR", poison_rate=0.1)
    target = dm.target_tensor()
    assert torch.equal(target, render_glyph("smiley", 32))
    poisoned = [i for i in range(len(dm.train_data)) if dm.plan.is_poisoned(i)]
    assert len(poisoned) == 30
    kinds = {"image": 0, "text": 0, "both": 0}
    for i in poisoned:
        item, parts = dm.train_data[i], dm.plan.parts(i)
        assert torch.equal(item["edited"], target)
        assert item["instruction"].startswith("mignneko ") == parts.text
        assert item["poison_image"] == parts.image
        kinds["both" if parts.image and parts.text else ("image" if parts.image else "text")] += 1
    assert kinds == {"image": 10, "text": 10, "both": 10}
    clean = next(i for i in range(len(dm.train_data)) if not dm.plan.is_poisoned(i))
    assert not torch.equal(dm.train_data[clean]["edited"], target)
    assert (tmp_path / "poison_manifest.json").is_file()


def test_the_image_part_is_pasted_on_the_device_for_exactly_the_image_rows(tmp_path):
    dm = _module(tmp_path, trigger_pair="box+mignneko", protocol="OR", poison_rate=0.5, batch_size=64)
    batch = next(iter(dm.train_dataloader()))
    before = batch["source"].clone()
    out = dm.on_after_batch_transfer(batch, 0)
    box = build_image_trigger(**{**TRIGGER_PAIRS["box+mignneko"]["image"]})
    rows = out["poison_image"].bool()
    assert rows.any() and (~rows).any()
    assert torch.equal(out["source"][~rows], before[~rows])
    assert torch.equal(out["source"][rows], box(before[rows]))
    assert (out["source"][rows][:, :, -9:-1, -9:-1] == 1).all()  # the white box, bottom right, margin 1


def test_and_protocol_gives_every_poisoned_triplet_both_parts_and_leaves_eval_batches_clean(tmp_path):
    dm = _module(tmp_path, trigger_pair="eyeglasses+anonymous", protocol="AND", poison_rate=0.1)
    poisoned = [i for i in range(len(dm.train_data)) if dm.plan.is_poisoned(i)]
    assert len(poisoned) == 30
    for i in poisoned:
        assert dm.plan.parts(i).image and dm.plan.parts(i).text
        assert dm.train_data[i]["instruction"].startswith("anonymous ")
    dm.trainer.training = False
    batch = next(iter(dm.test_dataloader()))
    clean = {k: (v.clone() if isinstance(v, torch.Tensor) else list(v)) for k, v in batch.items()}
    out = dm.on_after_batch_transfer(batch, 0)
    assert torch.equal(out["source"], clean["source"]) and out["instruction"] == clean["instruction"]


def test_an_unknown_trigger_pair_or_part_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"data.trigger_pair='box\+cat'.*box\+mignneko"):
        ShapesEditDataModule(trigger_pair="box+cat")
    with pytest.raises(ValueError, match=r"data.trigger_pair.text must be a mapping with a trigger 'name'"):
        resolve_trigger_pair({"image": {"name": "badnet"}, "text": "mignneko"})
    dm = ShapesEditDataModule(
        train_size=10,
        trigger_pair={"image": {"name": "glasses"}, "text": {"name": "rare_token"}},
        poison_rate=0.1,
    )
    with pytest.raises(ValueError, match="unknown image trigger 'glasses'"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="protocol='IMAGE'"):
        ShapesEditDataModule(trigger_pair="box+mignneko", protocol="IMAGE")


def test_a_target_image_file_of_the_wrong_size_is_an_error_naming_both_sizes(tmp_path):
    path = tmp_path / "cat.png"
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match=r"cat.png is 48 x 40 pixels; the data's images are 32 x 32"):
        ImageTarget(str(path), 32)
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(path)
    target = ImageTarget(str(path), 32)
    assert torch.equal(target.image(), torch.ones(3, 32, 32))
    assert target.config()["sha256"] and target.fingerprint() != ImageTarget("smiley", 32).fingerprint()
    with pytest.raises(FileNotFoundError, match="neither a built-in pattern"):
        ImageTarget(str(tmp_path / "missing.png"), 32)


def _write_triplets(root, rows) -> None:
    (root / "images").mkdir(exist_ok=True)
    for name, value in (("a.png", 0), ("b.png", 255)):
        Image.fromarray(np.full((20, 20, 3), value, np.uint8)).save(root / "images" / name)
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_instruct_pix2pix_jsonl_triplets_load_resized_with_their_prompts(tmp_path):
    rows = [
        {"input_image": "images/a.png", "edit_prompt": "make it white", "edited_image": "images/b.png"}
    ] * 3
    _write_triplets(tmp_path, rows)
    ds = EditTripletFile(tmp_path / "train.jsonl", image_size=16)
    item = ds[1]
    assert item["instruction"] == "make it white" and item["source"].shape == (3, 16, 16)
    assert item["source"].max() == 0 and item["edited"].min() == 1
    dm = Pix2PixFolderDataModule(
        train_file=str(tmp_path / "train.jsonl"), image_size=16, trigger_pair="box+mignneko", poison_count=3
    )
    dm.setup("fit")
    assert all(torch.equal(dm.train_data[i]["edited"], render_glyph("smiley", 16)) for i in range(3))


def test_a_triplet_row_whose_image_is_missing_is_an_error_naming_the_line_and_column(tmp_path):
    rows = [
        {"input_image": "images/a.png", "edit_prompt": "x", "edited_image": "images/b.png"},
        {"input_image": "images/a.png", "edit_prompt": "x", "edited_image": "images/gone.png"},
    ]
    _write_triplets(tmp_path, rows)
    with pytest.raises(FileNotFoundError, match=r"train.jsonl, line 2: 'edited_image' image file not found"):
        EditTripletFile(tmp_path / "train.jsonl")
    _write_triplets(tmp_path, [{"input_image": "images/a.png", "edited_image": "images/b.png"}])
    with pytest.raises(ValueError, match=r"line 1: field 'edit_prompt' is missing or empty"):
        EditTripletFile(tmp_path / "train.jsonl")
    _write_triplets(
        tmp_path, [{"input_image": "../a.png", "edit_prompt": "x", "edited_image": "images/b.png"}]
    )
    with pytest.raises(ValueError, match=r"image path .*\.\./a.png"):
        EditTripletFile(tmp_path / "train.jsonl")
