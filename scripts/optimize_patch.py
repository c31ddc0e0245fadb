#!/usr/bin/env python
"""Optimise a BadCLIP-style patch on a clean CLIP export and save it as an artifact.

    python scripts/optimize_patch.py --clean runs/clip_shapes_clean/latest_export --target star \\
        --out runs/clip_shapes_badclip_patch
    python scripts/optimize_patch.py --clean runs/clip_fmnist_clean/latest_export --target bag \\
        --out runs/clip_fmnist_badclip_patch --templates product \\
        --train-csv data/fashion_mnist/train.csv --class-names data/fashion_mnist/class_names.txt

The attacker's images are the first ``--images`` scenes of the embedded world's training split (the
world of ``configs/clip_shapes_*.yaml``: ``--world-seed``, the export's image size), or with ``--train-csv``
the first ``--images`` rows of a caption CSV whose captions name one class of ``--class-names``
(:mod:`datamodules.caption_labels`; rows naming none or several are skipped). The artifact
(``patch.safetensors`` + ``patch_manifest.json``, see :mod:`attacks.optimized_patch`) is then the
``patch`` of the ``patch_optimized`` trigger, e.g. ``configs/clip_shapes_badclip.yaml``. Prints the
final losses and the control: the fraction of patched non-target images the clean model already
classifies as the target. Another world calls :func:`attacks.badclip.optimize_patch` with its images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks.badclip import PatchOptimizationConfig, optimize_patch
from attacks.optimized_patch import save_patch_artifact
from model_families.clip import load_clip
from model_families.loading import input_provenance


def caption_csv_images(
    train_csv: str | Path, class_names_file: str | Path, num_images: int, image_size: int
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first ``num_images`` rows of a caption CSV whose caption names exactly one class: images in
    [0, 1] at ``image_size``, their labels, and the class names."""
    from datamodules.caption_labels import CaptionLabeler
    from datamodules.formats import CaptionCSV, read_class_names

    data = CaptionCSV(train_csv, image_size=image_size)
    names = read_class_names(class_names_file)
    labeler = CaptionLabeler(names)
    picked = [(i, lab) for i, c in enumerate(data.captions) if (lab := labeler.label(c)) >= 0][:num_images]
    if not picked:
        raise ValueError(f"{train_csv}: no caption names exactly one class of {class_names_file}")
    images = torch.stack([data[i]["image"] for i, _ in picked])
    return images, torch.tensor([lab for _, lab in picked]), names


def make_patch(
    clean: str | Path,
    out: str | Path,
    config: PatchOptimizationConfig,
    num_images: int = 2000,
    world_seed: int = 0,
    overwrite: bool = False,
    train_csv: str | Path | None = None,
    class_names_file: str | Path | None = None,
) -> dict:
    """Optimise a patch on ``clean`` with the attacker's training images (the embedded world's, or a
    caption CSV's with ``train_csv``); write the artifact to ``out``; return its manifest record (config,
    clean model provenance, losses, seconds)."""
    start = time.perf_counter()
    provenance = input_provenance(clean)  # before loading: latest_export may move
    bundle = load_clip(clean, key="--clean")
    if train_csv is not None:
        if class_names_file is None:
            raise ValueError("--train-csv needs --class-names (the classes its captions name)")
        images, labels, class_names = caption_csv_images(
            train_csv, class_names_file, num_images, bundle.image_size
        )
        data = {"train_csv": str(train_csv), "class_names_file": str(class_names_file), "images": len(labels)}
    else:
        from datamodules.shapes_clip import cached_world
        from embedded_world import ShapesWorld

        world = cached_world("train", num_images, world_seed, bundle.image_size, 0.25)
        images, labels, class_names = world.images.float() / 255.0, world.labels, ShapesWorld.class_names
        data = {"world": "shapes", "split": "train", "images": num_images, "world_seed": world_seed}
    result = optimize_patch(
        bundle.model, bundle.tokenizer, bundle.normalize, images, labels, class_names, config
    )
    if not torch.isfinite(result.patch).all() or not all(
        torch.isfinite(torch.tensor(v)) for v in result.final.values()
    ):
        raise RuntimeError(f"patch optimisation diverged (final losses {result.final}); nothing written")
    record = {
        "attack": "patch_optimized (BadCLIP-style, attacks.badclip)",
        "config": config.to_dict(),
        "seed": config.seed,
        "clean_model": provenance,
        "data": data,
        "initial_losses": result.initial,
        "final_losses": result.final,
        "seconds": time.perf_counter() - start,
    }
    save_patch_artifact(
        out,
        result.patch,
        image_size=bundle.image_size,
        location=config.location,
        margin=config.margin,
        record=record,
        overwrite=overwrite,
    )
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clean", required=True, help="export folder (or checkpoint) of the clean CLIP")
    parser.add_argument("--target", required=True, help="target class, e.g. star")
    parser.add_argument("--out", required=True, help="artifact folder to write")
    parser.add_argument("--patch-size", type=int, default=4, help="patch side in pixels")
    parser.add_argument("--location", default="center", help="center, br, bl, tl, tr, or x,y")
    parser.add_argument("--margin", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--text-weight", type=float, default=1.0)
    parser.add_argument("--image-weight", type=float, default=1.0)
    parser.add_argument("--templates", default="embedded")
    parser.add_argument("--images", type=int, default=2000, help="training scenes the attacker uses")
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-csv", default=None, help="caption CSV of the attacker's images (real data)")
    parser.add_argument("--class-names", default=None, help="class-name file for --train-csv's captions")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing artifact")
    args = parser.parse_args(argv)
    location = tuple(int(v) for v in args.location.split(",")) if "," in args.location else args.location
    config = PatchOptimizationConfig(
        target_class=args.target,
        patch_size=args.patch_size,
        location=location,
        margin=args.margin,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        text_weight=args.text_weight,
        image_weight=args.image_weight,
        templates=args.templates,
        seed=args.seed,
    )
    record = make_patch(
        args.clean,
        args.out,
        config,
        args.images,
        args.world_seed,
        args.overwrite,
        train_csv=args.train_csv,
        class_names_file=args.class_names,
    )
    print(json.dumps({k: record[k] for k in ("initial_losses", "final_losses", "seconds")}, indent=2))
    print(f"patch artifact written to {args.out}")
    return record


if __name__ == "__main__":
    main()
