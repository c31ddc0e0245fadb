#!/usr/bin/env python
"""Build the Fashion-MNIST world from the Debian package ``dataset-fashion-mnist``.

    sudo apt-get install dataset-fashion-mnist          # or, without root: apt-get download dataset-fashion-mnist
    python scripts/build_fashion_mnist.py --out data/fashion_mnist            # from /usr/share/datasets/fashion-mnist
    python scripts/build_fashion_mnist.py --source dataset-fashion-mnist_*.deb --out data/fashion_mnist

Writes 28 x 28 grayscale PNGs (the datamodules resize them to the model's side and convert them to RGB) and,
class-stratified, disjoint and drawn from ``--seed``:

- ``train.csv`` (``filepath,title``): ``--train-per-class`` captioned images of the official train split;
- ``defender.csv``: ``--defender-per-class`` more captioned images (the defender's own clean caption set;
  ``scripts/clean_folder_from_captions.py`` turns it into a labelled folder);
- ``val/<class>/``: ``--val-per-class`` images of the official train split (for choosing settings);
- ``test/<class>/``: ``--test-per-class`` images of the official t10k split (for reporting);
- ``class_names.txt`` and ``manifest.json`` (source sha256s, seed, counts, the command).

File names carry the official split and index (``train-01234.png``). ``--out`` must be empty or absent
unless ``--overwrite``; the folder is built beside it and moved into place at the end.
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks.io import atomic_write_json
from datamodules.fashion_mnist import (
    CAPTION_TEMPLATES,
    CLASS_NAMES,
    DEFAULT_SOURCE,
    caption,
    folder_name,
    load_splits,
    read_source,
    stratified_indices,
)


def write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image, mode="L").save(path, format="PNG")


def write_captions(path: Path, rows: list[tuple[str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["filepath", "title"])
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")


def build(
    source: str | Path,
    out: str | Path,
    seed: int = 0,
    train_per_class: int = 600,
    defender_per_class: int = 80,
    val_per_class: int = 100,
    test_per_class: int = 100,
    overwrite: bool = False,
    command: str | None = None,
) -> dict:
    """Build the world into ``out`` (see the module docstring); returns the manifest."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    files, record = read_source(source)
    splits = load_splits(files)
    rng = np.random.default_rng(seed)
    parts = {"train": train_per_class, "defender": defender_per_class, "val": val_per_class}
    official_train = stratified_indices(splits["train"].labels, parts, rng, "train-images-idx3-ubyte.gz")
    test = stratified_indices(
        splits["t10k"].labels, {"test": test_per_class}, rng, "t10k-images-idx3-ubyte.gz"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for part in ("train", "defender"):
            rows = []
            for i in official_train[part]:
                name = CLASS_NAMES[splits["train"].labels[i]]
                relative = f"captioned/train-{i:05d}.png"
                write_png(staging / relative, splits["train"].images[i])
                rows.append((relative, caption(name, rng)))
            write_captions(staging / f"{part}.csv", rows)
        for part, split, indices in (("val", "train", official_train["val"]), ("test", "t10k", test["test"])):
            for i in indices:
                name = CLASS_NAMES[splits[split].labels[i]]
                write_png(
                    staging / part / folder_name(name) / f"{split}-{i:05d}.png", splits[split].images[i]
                )
        (staging / "class_names.txt").write_text("\n".join(CLASS_NAMES) + "\n", encoding="utf-8")
        manifest = {
            "data_set": "Fashion-MNIST (Debian package dataset-fashion-mnist)",
            "source": record,
            "seed": seed,
            "class_names": list(CLASS_NAMES),
            "caption_templates": list(CAPTION_TEMPLATES),
            "per_class": {**parts, "test": test_per_class},
            "counts": {
                "train": len(official_train["train"]),
                "defender": len(official_train["defender"]),
                "val": len(official_train["val"]),
                "test": len(test["test"]),
            },
            "official_split": {"train": "train", "defender": "train", "val": "train", "test": "t10k"},
            "command": command,
        }
        atomic_write_json(staging / "manifest.json", manifest)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / out.name)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source", default=DEFAULT_SOURCE, help="folder with the 4 IDX .gz files, or the .deb"
    )
    parser.add_argument("--out", default="data/fashion_mnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--defender-per-class", type=int, default=80)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    command = " ".join(
        ["python", "scripts/build_fashion_mnist.py", *(sys.argv[1:] if argv is None else argv)]
    )
    manifest = build(
        args.source,
        args.out,
        args.seed,
        args.train_per_class,
        args.defender_per_class,
        args.val_per_class,
        args.test_per_class,
        args.overwrite,
        command,
    )
    print(f"Fashion-MNIST world written to {args.out}: {manifest['counts']}")
    return manifest


if __name__ == "__main__":
    main()
