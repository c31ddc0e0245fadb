"""The Fashion-MNIST world: the data builder (IDX files and the Debian .deb), caption labels, the defender's
clean folder made from captions, and the --world option of the attack / defense tables."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.caption_labels import NO_CLASS, SEVERAL_CLASSES, CaptionLabeler
from datamodules.fashion_mnist import CLASS_NAMES, FILES, IMAGE_MAGIC, LABEL_MAGIC
from datamodules.formats import CaptionCSV, ImageFolderClassification
from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
PER_CLASS = {"train": 3, "defender": 1, "val": 2}


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """A gzip-compressed IDX file in the official format (big-endian magic and dimensions, then bytes)."""
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def synthetic_files(per_class_train: int = 6, per_class_test: int = 2) -> dict[str, bytes]:
    """Four IDX files; image i's pixel (0, 0) is i % 256 and pixel (0, 1) its label, to recognise it."""
    out = {}
    for split, per_class in (("train", per_class_train), ("t10k", per_class_test)):
        labels = np.tile(np.arange(10), per_class)
        images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(len(labels)) % 256
        images[:, 0, 1] = labels * 20
        images[:, 5:20, 5:20] = 128
        out[FILES[split][0]], out[FILES[split][1]] = (
            idx_bytes(images, IMAGE_MAGIC),
            idx_bytes(labels, LABEL_MAGIC),
        )
    return out


def write_folder(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def write_deb(path: Path, files: dict[str, bytes]) -> Path:
    """A .deb as dpkg writes it: an ar archive with debian-binary, control.tar.xz and data.tar.xz."""
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"./usr/share/datasets/fashion-mnist/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    members = {"debian-binary": b"2.0\n", "control.tar.xz": b"x", "data.tar.xz": tar_buffer.getvalue()}
    blob = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}".encode() + b"`\n"
        blob += header + data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(blob)
    return path


def build(source, out, **kwargs):
    counts = {f"{k}_per_class": v for k, v in PER_CLASS.items()}
    return load_script("build_fashion_mnist").build(source, out, test_per_class=2, **counts, **kwargs)


def image_ids(paths) -> set[tuple[str, int]]:
    """(official split, index) of each written image, from its file name."""
    return {(p.stem.split("-")[0], int(p.stem.split("-")[1])) for p in map(Path, paths)}


def test_builder_writes_disjoint_stratified_splits_with_captions_naming_the_class(tmp_path):
    source = write_folder(tmp_path / "src", synthetic_files())
    manifest = build(source, tmp_path / "fm", seed=0)
    out = tmp_path / "fm"
    train = CaptionCSV(out / "train.csv", image_size=32)
    defender = CaptionCSV(out / "defender.csv", image_size=32)
    names = {"class_names_file": out / "class_names.txt", "image_size": 32}
    val, test = (
        ImageFolderClassification(out / "val", **names),
        ImageFolderClassification(out / "test", **names),
    )
    assert (len(train), len(defender), len(val), len(test)) == (30, 10, 20, 20)
    assert manifest["counts"] == {"train": 30, "defender": 10, "val": 20, "test": 20}
    assert val.class_names == list(CLASS_NAMES)
    splits = [image_ids(train.images), image_ids(defender.images), image_ids(p for p, _ in val.samples)]
    assert sum(map(len, splits)) == len(set().union(*splits)) == 60  # disjoint: every train image once
    assert {s for s, _ in image_ids(p for p, _ in test.samples)} == {"t10k"}
    labeler = CaptionLabeler(CLASS_NAMES)
    for data in (train, defender):
        for path, text in zip(data.images, data.captions, strict=True):
            pixels = np.array(Image.open(path))
            assert pixels.shape == (28, 28) and labeler.label(text) == pixels[0, 1] // 20  # names its class
    assert np.bincount([labeler.label(c) for c in train.captions]).tolist() == [3] * 10  # stratified
    assert len({c.replace("bag", "{}") for c in train.captions}) > 1  # several templates
    for path, label in test.samples:
        assert np.array(Image.open(path))[0, 1] // 20 == label
    assert train[0]["image"].shape == (3, 32, 32)  # the datamodules give RGB at the model's size
    for name in (n for pair in FILES.values() for n in pair):
        assert manifest["source"][name] == hashlib.sha256((source / name).read_bytes()).hexdigest()
    assert json.loads((out / "manifest.json").read_text())["seed"] == 0


def test_builder_reads_the_deb_and_draws_the_same_splits_as_from_the_folder(tmp_path):
    files = synthetic_files()
    deb = write_deb(tmp_path / "dataset-fashion-mnist_all.deb", files)
    from_deb = build(deb, tmp_path / "a", seed=3)
    build(write_folder(tmp_path / "src", files), tmp_path / "b", seed=3)
    assert from_deb["source"]["deb_sha256"] == hashlib.sha256(deb.read_bytes()).hexdigest()
    assert (tmp_path / "a" / "train.csv").read_text() == (tmp_path / "b" / "train.csv").read_text()
    other = build(deb, tmp_path / "c", seed=4)
    assert other["seed"] == 4
    assert (tmp_path / "c" / "train.csv").read_text() != (tmp_path / "a" / "train.csv").read_text()


@pytest.mark.parametrize("damage", ["magic", "truncated"])
def test_builder_error_names_the_damaged_idx_file(tmp_path, damage):
    files = synthetic_files()
    name = "train-labels-idx1-ubyte.gz"
    raw = gzip.decompress(files[name])
    raw = struct.pack(">I", IMAGE_MAGIC) + raw[4:] if damage == "magic" else raw[:-3]
    files[name] = gzip.compress(raw)
    with pytest.raises(
        ValueError, match=name + ".*" + ("magic number" if damage == "magic" else "truncated")
    ):
        build(write_folder(tmp_path / "src", files), tmp_path / "fm")
    assert not (tmp_path / "fm").exists()


def test_builder_missing_source_names_the_path_and_the_apt_package(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*apt-get install dataset-fashion-mnist"):
        build(tmp_path / "nowhere", tmp_path / "fm")
    src = write_folder(
        tmp_path / "src", {k: v for k, v in synthetic_files().items() if "t10k-images" not in k}
    )
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte\.gz not found"):
        build(src, tmp_path / "fm")


def test_builder_refuses_a_non_empty_out_unless_overwrite(tmp_path):
    source = write_folder(tmp_path / "src", synthetic_files())
    (tmp_path / "fm").mkdir()
    (tmp_path / "fm" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="--overwrite"):
        build(source, tmp_path / "fm")
    assert (tmp_path / "fm" / "mine.txt").read_text() == "keep"
    build(source, tmp_path / "fm", overwrite=True)
    assert not (tmp_path / "fm" / "mine.txt").exists() and (tmp_path / "fm" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fm", "src"]  # no staging folders left


def test_caption_labels_match_whole_words_longest_name_first():
    labeler = CaptionLabeler(CLASS_NAMES)
    shirt, tshirt, boot = (
        CLASS_NAMES.index("shirt"),
        CLASS_NAMES.index("t-shirt"),
        CLASS_NAMES.index("ankle boot"),
    )
    assert labeler.label("a photo of a T-Shirt.") == tshirt  # not also "shirt"
    assert labeler.label("a shirt, studio shot") == shirt
    assert labeler.label("two Ankle_Boots on a shelf") == boot  # normalised, plural
    assert labeler.label("a bagel and a coaster") == NO_CLASS  # words, not substrings
    assert labeler.label("a dress and a coat") == SEVERAL_CLASSES
    assert labeler.label("a coat, another coat") == CLASS_NAMES.index("coat")  # one class named twice


def _caption_set(tmp_path: Path, captions: list[str]) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i, text in enumerate(captions):
        Image.fromarray(np.full((28, 28), i, dtype=np.uint8), mode="L").save(images / f"{i}.png")
        rows.append((f"images/{i}.png", text))
    path = tmp_path / "captions.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("filepath", "title"), *rows])
    names = tmp_path / "classes.txt"
    names.write_text("coat\nbag\n")
    return path, names


def test_clean_folder_from_captions_skips_ambiguous_rows_and_copies_files(tmp_path):
    script = load_script("clean_folder_from_captions")
    captions = ["a coat.", "a bag.", "a coat and a bag.", "a hat.", "two bags"]
    csv_path, names = _caption_set(tmp_path, captions)
    before = {p: p.read_bytes() for p in (tmp_path / "images").iterdir()}
    summary = script.make_clean_folder(csv_path, names, tmp_path / "clean")
    assert summary["per_class"] == {"coat": 1, "bag": 2}
    assert summary["skipped_rows"] == {"no class named": 1, "several classes named": 1}
    assert summary["skipped_lines"] == {"no class named": [5], "several classes named": [4]}
    folder = ImageFolderClassification(tmp_path / "clean", class_names_file=names, image_size=32)
    assert sorted((Path(p).name, folder.class_names[y]) for p, y in folder.samples) == [
        ("000000-0.png", "coat"),
        ("000001-1.png", "bag"),
        ("000004-4.png", "bag"),
    ]
    assert {p: p.read_bytes() for p in (tmp_path / "images").iterdir()} == before  # inputs untouched
    with pytest.raises(FileExistsError, match="not empty"):
        script.make_clean_folder(csv_path, names, tmp_path / "clean")


def test_clean_folder_from_captions_errors_on_a_class_without_images(tmp_path):
    script = load_script("clean_folder_from_captions")
    csv_path, names = _caption_set(tmp_path, ["a coat.", "a coat and a bag."])
    with pytest.raises(ValueError, match=r"no image labelled \['bag'\]"):
        script.make_clean_folder(csv_path, names, tmp_path / "clean")


def test_clean_folder_zero_shot_labels_follow_the_model_not_the_captions(tmp_path, monkeypatch):
    script = load_script("clean_folder_from_captions")
    csv_path, names = _caption_set(tmp_path, ["a coat.", "a bag.", "a coat.", "a hat."])
    monkeypatch.setattr(script, "zero_shot_labels", lambda export, images, classes, templates: [1, 1, 0, 0])
    summary = script.make_clean_folder(csv_path, names, tmp_path / "clean", zero_shot="export")
    assert summary["per_class"] == {"coat": 2, "bag": 2}  # the hat is labelled too
    assert summary["zero_shot_agreement_with_captions"] == pytest.approx(2 / 3)  # rows 0 wrong, 1 and 2 right
    assert sorted(p.name for p in (tmp_path / "clean" / "bag").iterdir()) == ["000000-0.png", "000001-1.png"]


def test_badclip_images_from_a_caption_csv_carry_their_caption_labels(tmp_path):
    script = load_script("optimize_patch")
    csv_path, names = _caption_set(tmp_path, ["a coat.", "a hat.", "two bags", "a bag."])
    images, labels, classes = script.caption_csv_images(csv_path, names, 2, image_size=32)
    assert classes == ["coat", "bag"] and labels.tolist() == [0, 1] and images.shape == (2, 3, 32, 32)
    assert images[1].mul(255).round().unique().tolist() == [2.0]  # the third row (the hat is skipped)


def test_attack_table_prepares_the_fmnist_patch_from_the_worlds_captions(tmp_path, monkeypatch):
    import yaml

    table = load_script("attack_table")
    assert list(table.WORLDS["fmnist"]["attacks"]) == ["badnet", "blended", "sig", "badclip"]
    config = yaml.safe_load((ROOT / "configs" / "clip_fmnist_badclip.yaml").read_text())
    config["data"]["init_args"]["attack_kwargs"]["patch"] = str(tmp_path / "patch")
    path = tmp_path / "badclip.yaml"
    path.write_text(yaml.safe_dump(config))
    calls = []
    monkeypatch.setattr(table, "input_provenance", lambda clean: {"sha256": "x"})
    monkeypatch.setattr(table, "make_patch", lambda *args, **kwargs: calls.append((args, kwargs)))
    table.prepare_trigger(str(path), tmp_path / "clean")
    (_, _, patch_config), kwargs = calls[0]
    assert patch_config.target_class == "bag" and patch_config.templates == "product"
    assert kwargs["train_csv"] == "data/fashion_mnist/train.csv"
    assert kwargs["class_names_file"] == "data/fashion_mnist/class_names.txt"


def test_defense_table_world_picks_the_worlds_configs_and_models(tmp_path):
    table = load_script("defense_table")
    with pytest.raises(FileNotFoundError, match=r"clip_fmnist_badnet.*--world fmnist"):
        table.main(["--world", "fmnist", "--models", str(tmp_path), "--root", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match=r"clip_shapes_badnet"):
        table.main(["--models", str(tmp_path), "--root", str(tmp_path / "out")])
