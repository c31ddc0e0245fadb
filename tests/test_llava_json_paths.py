"""LLaVA-JSON image paths stay inside the image folder, and unreadable images name their record (issue 16,
items 2 and 7)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from datamodules.llava_json import LlavaJsonDataModule, LlavaJsonSource

CONVERSATION = [
    {"from": "human", "value": "<image>\nwhat shape is in the image?"},
    {"from": "gpt", "value": "a red circle."},
]


@pytest.fixture
def folders(tmp_path):
    """``images/0.png`` inside the image folder and ``secret.png`` next to it (outside)."""
    images = tmp_path / "images"
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (20, 28, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / "0.png")
    Image.fromarray(pixels).save(tmp_path / "secret.png")
    return tmp_path, images


def _data_file(root, *image_paths):
    records = [
        {"id": f"r{i}", "image": image, "conversations": CONVERSATION} for i, image in enumerate(image_paths)
    ]
    path = root / "train.json"
    path.write_text(json.dumps(records))
    return path


def _source(path, images, **kwargs):
    return LlavaJsonSource(path, images, image_size=16, **kwargs)


def test_an_absolute_image_path_is_an_error_naming_the_record(folders):
    root, images = folders
    path = _data_file(root, "0.png", str(root / "secret.png"))
    with pytest.raises(
        ValueError, match=r"train\.json record 1 \(id 'r1'\): image path '.*secret\.png' is absolute"
    ):
        _source(path, images)


def test_an_absolute_image_path_is_accepted_when_allowed(folders):
    root, images = folders
    path = _data_file(root, str(root / "secret.png"))
    source = _source(path, images, allow_absolute_paths=True)
    assert source[0]["image"].shape == (3, 16, 16)


@pytest.mark.parametrize("escape", ["../secret.png", "sub/../../secret.png"])
def test_dot_dot_that_leaves_the_folder_is_an_error_even_when_absolute_paths_are_allowed(folders, escape):
    root, images = folders
    (images / "sub").mkdir()
    path = _data_file(root, "0.png", escape)
    with pytest.raises(
        ValueError, match=rf"record 1 \(id 'r1'\): image path '{escape}' leaves the image folder"
    ):
        _source(path, images, allow_absolute_paths=True)


def test_dot_dot_that_stays_inside_and_linked_subfolders_are_fine(folders):
    root, images = folders
    (images / "sub").mkdir()
    (images / "linked").symlink_to(root)  # a user's own link (e.g. coco -> /data/coco) is followed
    path = _data_file(root, "sub/../0.png", "linked/secret.png")
    source = _source(path, images)
    assert len(source) == 2 and source[1]["image"].shape == (3, 16, 16)


def test_the_datamodule_passes_allow_absolute_paths_on(folders):
    root, images = folders
    path = _data_file(root, str(root / "secret.png"))
    common = {"train_json": str(path), "image_folder": str(images), "image_size": 16, "val_fraction": 0.0}
    with pytest.raises(ValueError, match="is absolute"):
        LlavaJsonDataModule(**common, target=None).setup("fit")
    dm = LlavaJsonDataModule(**common, allow_absolute_paths=True, target=None)
    dm.setup("fit")
    assert dm.train_source[0]["image"].shape == (3, 16, 16)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_image_names_the_file_and_the_record(folders, damage):
    root, images = folders
    good = (images / "0.png").read_bytes()
    (images / "1.png").write_bytes(b"not a png" * 20 if damage == "garbage" else good[: len(good) // 2])
    path = _data_file(root, "0.png", "1.png")
    source = _source(path, images)
    with pytest.raises(ValueError, match=r"record 1 \(id 'r1'\): .*1\.png is not a readable image"):
        source[1]
