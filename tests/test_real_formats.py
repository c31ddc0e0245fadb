"""Real on-disk formats (caption CSV/TSV, ImageFolder + class names), written here as small files."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.formats import CaptionCSV, ImageFolderClassification, read_class_names
from datamodules.real_clip import CaptionCSVDataModule

CLASSES = ["goldfish", "great white shark", "banana"]


def write_image(path: Path, colour, size=40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size + 8, 3), colour, dtype=np.uint8)).save(path)


def make_world(root: Path, sep=",") -> dict:
    rows = []
    for i in range(12):
        rel = f"images/{i:03d}.jpg"
        write_image(root / rel, (20 * i, 100, 200))
        rows.append(f"{rel}{sep}a photo number {i} of something")
    ext = "tsv" if sep == "\t" else "csv"
    csv_path = root / f"train.{ext}"
    csv_path.write_text(f"filepath{sep}title\n" + "\n".join(rows) + "\n")
    for c, wnid in enumerate(["n001", "n002", "n003"]):
        for j in range(3):
            write_image(root / "val" / wnid / f"{j}.png", (80 * c, 10 * j, 50))
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    return {
        "train_csv": str(csv_path),
        "val_folder": str(root / "val"),
        "class_names_file": str(root / "classnames.txt"),
    }


@pytest.mark.parametrize("sep", [",", "\t"])
def test_caption_csv_loads(tmp_path, sep):
    paths = make_world(tmp_path, sep)
    ds = CaptionCSV(paths["train_csv"], image_size=32)
    assert len(ds) == 12
    item = ds[3]
    assert item["caption"] == "a photo number 3 of something"
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert abs(float(item["image"][0].mean()) - 60 / 255) < 0.02


def test_image_folder_with_class_names(tmp_path):
    paths = make_world(tmp_path)
    ds = ImageFolderClassification(paths["val_folder"], paths["class_names_file"], image_size=32)
    assert ds.class_names == CLASSES and len(ds) == 9
    assert [ds[i]["label"] for i in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert ds[4]["caption"] == "a photo of a great white shark."


def test_csv_datamodule_poisons_with_the_same_machinery(tmp_path):
    paths = make_world(tmp_path)
    dm = CaptionCSVDataModule(
        **paths, image_size=32, attack="blended", poison_count=4, target_class="banana", batch_size=6
    )
    dm.trainer = SimpleNamespace(
        default_root_dir=str(tmp_path / "run"), global_rank=0, world_size=1, training=True
    )
    dm.setup("fit")
    assert dm.class_names == CLASSES and dm.target_index == 2 and len(dm.plan) == 4
    captions = [dm.train_data[i]["caption"] for i in dm.plan.indices]
    assert all("banana" in c for c in captions)
    assert (tmp_path / "run" / "poison_manifest.json").is_file()


def test_missing_image_in_csv_names_row_and_file(tmp_path):
    paths = make_world(tmp_path)
    (tmp_path / "images" / "005.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"row 7: image file not found: .*005\.jpg"):
        CaptionCSV(paths["train_csv"])


def test_unreadable_image_names_the_file(tmp_path):
    paths = make_world(tmp_path)
    (tmp_path / "images" / "002.jpg").write_bytes(b"not an image")
    ds = CaptionCSV(paths["train_csv"])
    with pytest.raises(ValueError, match=r"row 4: image file is unreadable: .*002\.jpg"):
        ds[2]


def test_missing_column_is_named(tmp_path):
    paths = make_world(tmp_path)
    with pytest.raises(ValueError, match=r"column 'caption' \(caption_key\) not found"):
        CaptionCSV(paths["train_csv"], caption_key="caption")


def test_missing_class_name_file(tmp_path):
    paths = make_world(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"class-name file not found: .*nope\.txt"):
        ImageFolderClassification(paths["val_folder"], tmp_path / "nope.txt")


def test_class_name_count_mismatch(tmp_path):
    paths = make_world(tmp_path)
    Path(paths["class_names_file"]).write_text("goldfish\nbanana\n")
    with pytest.raises(ValueError, match=r"2 class names for 3 class folders"):
        read_class_names(paths["class_names_file"], expected=3)
