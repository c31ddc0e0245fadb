#!/usr/bin/env python
"""Make the defender's labelled clean folder (``<out>/<class>/<image>``) from a caption set.

    python scripts/clean_folder_from_captions.py --csv data/fashion_mnist/defender.csv \\
        --class-names data/fashion_mnist/class_names.txt --out data/fashion_mnist/defender
    python scripts/clean_folder_from_captions.py ... --zero-shot runs/clip_fmnist_clean/latest_export

InverTune, CleanCLIP and PAR's ``ImageFolderCLIPDataModule`` take a folder of clean images labelled by class;
a user usually holds captions. By default each image's class is the one its caption names
(:mod:`datamodules.caption_labels`: normalised word matching; a caption naming no class or several classes is
skipped and counted). With ``--zero-shot EXPORT`` the class is the zero-shot prediction of that (clean) CLIP
instead, with the templates of ``--templates`` (and the agreement with the caption labels is reported).
Files are copied (inputs are never moved or changed); ``--out`` must not exist or be empty. Prints per-class
counts and the skipped rows, and writes ``<out>/labels.json``; a class without images is an error naming it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks.io import atomic_write_json
from datamodules.caption_labels import NO_CLASS, SEVERAL_CLASSES, CaptionLabeler
from datamodules.fashion_mnist import folder_name
from datamodules.formats import CaptionCSV, image_transform, load_image, read_class_names


@torch.no_grad()
def zero_shot_labels(
    export: str | Path, images: list[str], class_names: list[str], templates: str, batch_size: int = 256
) -> list[int]:
    """The zero-shot class of each image under the CLIP ``export`` (the CLIP family's classifier)."""
    from model_families.clip import load_clip
    from model_families.clip.zero_shot import zero_shot_predict, zero_shot_weights

    bundle = load_clip(export, key="--zero-shot")
    bundle.model.eval()
    weights = zero_shot_weights(bundle.model, bundle.tokenizer, class_names, templates)
    transform = image_transform(bundle.image_size)
    labels: list[int] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        batch = torch.stack([transform(load_image(Path(p), "--csv")) for p in chunk])
        labels += zero_shot_predict(bundle.model, batch, weights, bundle.normalize).tolist()
    return labels


def make_clean_folder(
    csv_path: str | Path,
    class_names_file: str | Path,
    out: str | Path,
    image_key: str = "filepath",
    caption_key: str = "title",
    zero_shot: str | Path | None = None,
    templates: str = "product",
) -> dict:
    """Copy the CSV's images into ``out/<class folder>/`` by class (see the module docstring); the summary."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out folder")
    data = CaptionCSV(csv_path, image_key, caption_key)
    names = read_class_names(class_names_file)
    labeler = CaptionLabeler(names)
    caption_labels = [labeler.label(c) for c in data.captions]
    skipped = {
        "no class named": [line for line, lab in zip(data.lines, caption_labels) if lab == NO_CLASS],
        "several classes named": [
            line for line, lab in zip(data.lines, caption_labels) if lab == SEVERAL_CLASSES
        ],
    }
    agreement = None
    if zero_shot is not None:
        labels = zero_shot_labels(zero_shot, data.images, names, templates)
        scored = [(z, c) for z, c in zip(labels, caption_labels, strict=True) if c >= 0]
        agreement = sum(z == c for z, c in scored) / len(scored) if scored else None
        skipped = {}
    else:
        labels = caption_labels
    counts = Counter(lab for lab in labels if lab >= 0)
    empty = [names[i] for i in range(len(names)) if counts[i] == 0]
    if empty:
        raise ValueError(
            f"{csv_path}: no image labelled {empty} ({'zero-shot' if zero_shot else 'no caption names them'}; "
            f"{sum(len(v) for v in skipped.values())} rows skipped); every class of {class_names_file} needs images"
        )
    for row, (image, label) in enumerate(zip(data.images, labels, strict=True)):
        if label < 0:
            continue
        target = out / folder_name(names[label]) / f"{row:06d}-{Path(image).name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, target)
    summary = {
        "csv": str(csv_path),
        "labels_from": f"zero-shot {zero_shot} ({templates})" if zero_shot else "captions",
        "per_class": {names[i]: counts[i] for i in range(len(names))},
        "images": sum(counts.values()),
        "skipped_rows": {k: len(v) for k, v in skipped.items()},
        "skipped_lines": skipped,
        "zero_shot_agreement_with_captions": agreement,
    }
    atomic_write_json(out / "labels.json", summary)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--csv", required=True, help="caption CSV/TSV (columns --image-key, --caption-key)")
    parser.add_argument("--class-names", required=True, help="one class name per line")
    parser.add_argument("--out", required=True, help="new folder for <class>/<image> copies")
    parser.add_argument("--image-key", default="filepath")
    parser.add_argument("--caption-key", default="title")
    parser.add_argument(
        "--zero-shot", default=None, help="clean CLIP export: label by its zero-shot prediction"
    )
    parser.add_argument("--templates", default="product", help="zero-shot template set (with --zero-shot)")
    args = parser.parse_args(argv)
    summary = make_clean_folder(
        args.csv, args.class_names, args.out, args.image_key, args.caption_key, args.zero_shot, args.templates
    )
    print(f"{summary['images']} images labelled from {summary['labels_from']} into {args.out}")
    for name, n in summary["per_class"].items():
        print(f"  {name}: {n}")
    for reason, n in summary["skipped_rows"].items():
        print(f"  skipped ({reason}): {n}")
    if summary["zero_shot_agreement_with_captions"] is not None:
        print(
            f"  zero-shot agreement with the caption labels: {summary['zero_shot_agreement_with_captions']:.3f}"
        )
    return summary


if __name__ == "__main__":
    main()
