"""Real on-disk formats (caption CSV/TSV, ImageFolder + class names), written here as small files."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.formats import (
    CaptionCSV,
    ImageFolderClassification,
    normalise_class_name,
    read_class_names,
)
from datamodules.real_clip import CaptionCSVDataModule, ImageFolderCLIPDataModule

CLASSES = ["goldfish", "great white shark", "banana"]
WNIDS = ["n001", "n002", "n003"]  # ImageNet-style folders named by id (the map gives their names)


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
    for c, wnid in enumerate(WNIDS):
        for j in range(3):
            write_image(root / "val" / wnid / f"{j}.png", (80 * c, 10 * j, 50))
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "class_map.tsv").write_text("".join(f"{w}\t{c}\n" for w, c in zip(WNIDS, CLASSES, strict=True)))
    return {
        "train_csv": str(csv_path),
        "val_folder": str(root / "val"),
        "class_names_file": str(root / "classnames.txt"),
        "class_map_file": str(root / "class_map.tsv"),
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
    ds = ImageFolderClassification(
        paths["val_folder"], paths["class_names_file"], image_size=32, class_map_file=paths["class_map_file"]
    )
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
    with pytest.raises(FileNotFoundError, match=r"train\.csv, line 7: image file not found: .*005\.jpg"):
        CaptionCSV(paths["train_csv"])


def test_unreadable_image_names_the_file(tmp_path):
    paths = make_world(tmp_path)
    (tmp_path / "images" / "002.jpg").write_bytes(b"not an image")
    ds = CaptionCSV(paths["train_csv"])
    with pytest.raises(ValueError, match=r"train\.csv, line 4: image file is unreadable: .*002\.jpg"):
        ds[2]


def test_missing_column_is_named(tmp_path):
    paths = make_world(tmp_path)
    with pytest.raises(ValueError, match=r"column 'caption' \(caption_key\) not found"):
        CaptionCSV(paths["train_csv"], caption_key="caption")


def test_missing_class_name_file(tmp_path):
    paths = make_world(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"class-name file not found: .*nope\.txt"):
        ImageFolderClassification(paths["val_folder"], tmp_path / "nope.txt")


# --- class names are matched to the class folders, never assigned by position alone ---------------------


def named_folders(root: Path, folders: list[str], images_per_class: int = 2) -> Path:
    """An ImageFolder whose class folders are ``folders``; each image's colour encodes its folder."""
    for c, folder in enumerate(folders):
        for j in range(images_per_class):
            write_image(root / folder / f"{j}.png", (60 * c, 10 * j, 50), size=8)
    return root


def folder_of(ds: ImageFolderClassification, index: int) -> str:
    return ds.samples[index][0].parent.name


def test_class_names_in_label_order_are_matched_to_the_folders_by_name(tmp_path):
    """Folders sort as banana, goldfish, great_white_shark; the file lists the names in label order. By
    position banana's images would be captioned "goldfish" (issue 16: CA 0.36 instead of 0.88)."""
    root = named_folders(tmp_path / "val", ["Great_White-Shark", "goldfish", "banana"])
    names = tmp_path / "classnames.txt"
    names.write_text("goldfish\ngreat white shark\nbanana\n")
    ds = ImageFolderClassification(root, names, image_size=8)
    assert ds.class_names == CLASSES
    expected = {"goldfish": "goldfish", "Great_White-Shark": "great white shark", "banana": "banana"}
    for i in range(len(ds)):
        assert ds.class_names[ds[i]["label"]] == expected[folder_of(ds, i)]
        assert ds[i]["caption"] == f"a photo of a {expected[folder_of(ds, i)]}."


def test_folders_named_by_id_need_a_class_map_and_the_error_says_so(tmp_path):
    paths = make_world(tmp_path)
    with pytest.raises(ValueError) as err:
        ImageFolderClassification(paths["val_folder"], paths["class_names_file"])
    message = str(err.value)
    assert "data.class_map_file" in message and "none of the 3 class folders" in message
    assert "[n001, n002, n003]" in message and "[goldfish, great white shark, banana]" in message


def test_partly_matching_names_list_the_unmatched_folders_and_names(tmp_path):
    root = named_folders(tmp_path / "val", ["banana", "goldfish", "shark"])
    names = tmp_path / "classnames.txt"
    names.write_text("goldfish\ngreat white shark\nbanana\n")
    with pytest.raises(ValueError) as err:
        ImageFolderClassification(root, names)
    message = str(err.value)
    assert "Folders without a name in" in message and "[shark]" in message
    assert "names without a folder: [great white shark]" in message
    assert "All folders (the folder names): [banana, goldfish, shark]" in message


def test_a_class_name_file_with_fewer_names_than_folders_is_an_error(tmp_path):
    root = named_folders(tmp_path / "val", ["banana", "goldfish", "great_white_shark"])
    names = tmp_path / "classnames.txt"
    names.write_text("goldfish\nbanana\n")
    with pytest.raises(ValueError, match=r"Folders without a name in .*\[great_white_shark\]"):
        ImageFolderClassification(root, names)


def test_names_equal_after_normalising_are_an_error(tmp_path):
    names = tmp_path / "classnames.txt"
    names.write_text("great white shark\nGreat_White_Shark\n")
    with pytest.raises(ValueError, match=r"'great white shark' and 'Great_White_Shark' are the same name"):
        read_class_names(names)


def test_normalising_ignores_case_underscores_hyphens_and_spaces():
    assert normalise_class_name("  Great_White-shark ") == normalise_class_name("great  white shark")
    assert normalise_class_name("banana") != normalise_class_name("bananas")


@pytest.mark.parametrize(
    ("filename", "text"),
    [
        (
            "map.json",
            json.dumps({"n003": "banana", "n001": "goldfish", "n002": "great white shark", "n999": "x"}),
        ),
        ("map.tsv", "n003\tbanana\nn001\tgoldfish\nn002\tgreat white shark\n"),
        ("map.csv", 'n003,banana\nn001,goldfish\nn002,"great white shark"\n'),
        ("LOC_synset_mapping.txt", "n003 banana\nn001 goldfish\nn002 great white shark\n"),
    ],
)
def test_a_class_map_names_folders_named_by_id(tmp_path, filename, text):
    root = named_folders(tmp_path / "val", WNIDS)
    (tmp_path / filename).write_text(text)
    ds = ImageFolderClassification(root, class_map_file=tmp_path / filename, image_size=8)
    assert ds.class_names == CLASSES  # labels in sorted folder order; the extra entry n999 is ignored
    for i in range(len(ds)):
        assert ds.class_names[ds[i]["label"]] == CLASSES[WNIDS.index(folder_of(ds, i))]


def test_with_a_map_and_a_name_file_the_file_gives_the_label_order(tmp_path):
    root = named_folders(tmp_path / "val", WNIDS)
    (tmp_path / "map.tsv").write_text("n001\tgoldfish\nn002\tgreat white shark\nn003\tbanana\n")
    (tmp_path / "names.txt").write_text("banana\ngoldfish\ngreat white shark\n")
    ds = ImageFolderClassification(root, tmp_path / "names.txt", 8, class_map_file=tmp_path / "map.tsv")
    assert ds.class_names == ["banana", "goldfish", "great white shark"]
    assert ds.folder_labels == {"n001": 1, "n002": 2, "n003": 0}


def test_a_folder_missing_from_the_class_map_is_named(tmp_path):
    root = named_folders(tmp_path / "val", WNIDS)
    (tmp_path / "map.tsv").write_text("n001\tgoldfish\nn002\tgreat white shark\n")
    with pytest.raises(ValueError, match=r"class folders \[n003\] have no entry in the class map .*map\.tsv"):
        ImageFolderClassification(root, class_map_file=tmp_path / "map.tsv")


def test_a_class_map_row_without_a_name_names_the_line(tmp_path):
    root = named_folders(tmp_path / "val", WNIDS)
    (tmp_path / "map.tsv").write_text("n001\tgoldfish\nn002\nn003\tbanana\n")
    with pytest.raises(ValueError, match=r"map\.tsv, line 2: expected two fields"):
        ImageFolderClassification(root, class_map_file=tmp_path / "map.tsv")


def test_a_datamodule_without_class_names_or_map_is_an_error(tmp_path):
    paths = make_world(tmp_path)
    with pytest.raises(ValueError, match=r"data\.class_names_file .* or data\.class_map_file"):
        CaptionCSVDataModule(paths["train_csv"], paths["val_folder"])


def test_splits_with_other_class_folders_are_an_error(tmp_path):
    named_folders(tmp_path / "train", ["banana", "goldfish"])
    named_folders(tmp_path / "val", ["banana", "goldfish", "great white shark"])
    (tmp_path / "names.txt").write_text("banana\ngoldfish\n")
    (tmp_path / "names3.txt").write_text("banana\ngoldfish\ngreat white shark\n")
    dm = ImageFolderCLIPDataModule(
        str(tmp_path / "train"), str(tmp_path / "val"), str(tmp_path / "names3.txt"), image_size=8
    )
    with pytest.raises(ValueError, match=r"names without a folder: \[great white shark\]"):
        dm.setup("fit")
    (tmp_path / "map.json").write_text(
        json.dumps({"banana": "banana", "goldfish": "goldfish", "great white shark": "shark"})
    )
    dm = ImageFolderCLIPDataModule(
        str(tmp_path / "train"),
        str(tmp_path / "val"),
        class_map_file=str(tmp_path / "map.json"),
        image_size=8,
    )
    with pytest.raises(ValueError, match=r"the train folder .*train has other classes than the val folder"):
        dm.setup("fit")


# --- empty folders and incomplete CSV rows fail at setup, naming the folder / line / column -------------


def test_a_class_folder_without_images_is_an_error_naming_it(tmp_path):
    root = named_folders(tmp_path / "val", ["banana", "goldfish"])
    (root / "lemon").mkdir()
    (root / "lemon" / "README.txt").write_text("not an image")
    (root / "lemon" / "._0.png").write_bytes(b"AppleDouble metadata, not an image")
    (tmp_path / "names.txt").write_text("banana\ngoldfish\nlemon\n")
    with pytest.raises(ValueError, match=r"val: 1 of 3 class folders have no image files .*: \[lemon\]"):
        ImageFolderClassification(root, tmp_path / "names.txt")


def test_an_image_folder_with_classes_but_no_images_is_an_error(tmp_path):
    for name in ("banana", "goldfish"):
        (tmp_path / "val" / name).mkdir(parents=True)
    (tmp_path / "names.txt").write_text("banana\ngoldfish\n")
    with pytest.raises(ValueError, match=r"2 of 2 class folders have no image files .*\[banana, goldfish\]"):
        ImageFolderClassification(tmp_path / "val", tmp_path / "names.txt")


def test_hidden_folders_are_not_classes(tmp_path):
    root = named_folders(tmp_path / "val", ["banana", "goldfish"])
    (root / ".ipynb_checkpoints").mkdir()
    (tmp_path / "names.txt").write_text("banana\ngoldfish\n")
    assert ImageFolderClassification(root, tmp_path / "names.txt").class_names == ["banana", "goldfish"]


def write_csv(tmp_path: Path, body: str) -> Path:
    for i in range(3):
        write_image(tmp_path / "images" / f"{i}.jpg", (40 * i, 0, 0), size=8)
    path = tmp_path / "train.csv"
    path.write_text("filepath,title\n" + body)
    return path


def test_a_csv_row_with_a_missing_caption_names_the_file_line_and_column(tmp_path):
    path = write_csv(tmp_path, "images/0.jpg,a red thing\nimages/1.jpg\nimages/2.jpg,a blue thing\n")
    with pytest.raises(ValueError, match=r"train\.csv, line 3: column 'title' \(caption_key\) is missing"):
        CaptionCSV(path)


def test_a_csv_row_with_an_empty_image_path_names_the_line_and_column(tmp_path):
    path = write_csv(tmp_path, "images/0.jpg,a red thing\n,a green thing\n")
    with pytest.raises(ValueError, match=r"train\.csv, line 3: column 'filepath' \(image_key\) is empty"):
        CaptionCSV(path)


def test_a_csv_row_with_an_unquoted_separator_is_an_error(tmp_path):
    path = write_csv(tmp_path, "images/0.jpg,a red thing\nimages/1.jpg,a cat, a dog\n")
    with pytest.raises(ValueError, match=r"train\.csv, line 3: 3 fields for the 2 columns .*quote fields"):
        CaptionCSV(path)


def test_quoted_separators_and_multi_line_captions_keep_their_line_numbers(tmp_path):
    path = write_csv(tmp_path, 'images/0.jpg,"a cat, a dog"\nimages/1.jpg,"two\nlines"\nimages/9.jpg,x\n')
    with pytest.raises(FileNotFoundError, match=r"train\.csv, line 5: image file not found: .*9\.jpg"):
        CaptionCSV(path)
    path.write_text('filepath,title\nimages/0.jpg,"a cat, a dog"\n')
    assert CaptionCSV(path, image_size=8)[0]["caption"] == "a cat, a dog"


def test_a_csv_without_rows_is_an_empty_split_error(tmp_path):
    path = write_csv(tmp_path, "")
    with pytest.raises(ValueError, match=r"train\.csv: no data rows"):
        CaptionCSV(path)
