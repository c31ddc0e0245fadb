"""Train InputAware's trigger generator and mask network on a surrogate CLIP and save them as the trigger's
artifact (weights.safetensors + manifest.json), for ``data.attack: input_aware`` with
``data.attack_kwargs: {artifact: <out>}``.

    python scripts/train_input_aware.py --surrogate runs/clip_shapes_clean/latest_export \\
        --out runs/input_aware/shapes --target-class banana

The surrogate is a CLIP export folder (the tiny CLIP of ``configs/clip_shapes_clean.yaml``); the images are the
embedded world's training split (``--train-size``, ``--world-seed``). The target class is a name the surrogate
classifies zero-shot among the world's shapes (default ``star``; a class outside the world, e.g. ``banana``, is
added to the prompts). The surrogate's rate of the target class on the triggered images is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks.input_aware import save_input_aware
from attacks.input_aware_training import (
    InputAwareTrainingConfig,
    clip_surrogate_classifier,
    train_input_aware,
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--surrogate", required=True, help="CLIP export folder (model.safetensors + mmbackdoor.json)"
    )
    parser.add_argument("--out", required=True, help="artifact folder to create (never overwritten)")
    parser.add_argument("--target-class", default="star")
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--mask-steps", type=int, default=200)
    parser.add_argument("--generator-steps", type=int, default=400)
    parser.add_argument(
        "--mask-density", type=float, default=0.032,
        help="the mask's mean above which its density loss starts (the reference's 0.032)",
    )  # fmt: skip
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument(
        "--no-mask-threshold", dest="mask_threshold", action="store_false",
        help="keep M's raw sigmoid mask instead of the reference's near-binary soft step",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from embedded_world import SHAPES, ShapesWorld
    from model_families.clip import load_clip

    classes = list(SHAPES) if args.target_class in SHAPES else [*SHAPES, args.target_class]
    bundle = load_clip(args.surrogate, key="--surrogate")
    world = ShapesWorld("train", args.train_size, seed=args.world_seed, image_size=args.image_size)
    images = world.images.float() / 255.0
    config = InputAwareTrainingConfig(
        target_class=classes.index(args.target_class),
        mask_steps=args.mask_steps,
        generator_steps=args.generator_steps,
        mask_density=args.mask_density,
        width=args.width,
        mask_threshold=args.mask_threshold,
        seed=args.seed,
    )
    classify = clip_surrogate_classifier(bundle, classes)
    networks, log = train_input_aware(classify, images, config)
    training = {
        **config.to_dict(),
        "classes": classes,
        "train_size": args.train_size,
        "world_seed": args.world_seed,
        **log,
    }
    folder = save_input_aware(args.out, networks, seed=args.seed, surrogate=args.surrogate, training=training)
    print(json.dumps({"artifact": str(folder), **log}, indent=2))
    return {"artifact": str(folder), **log}


if __name__ == "__main__":
    main()
