#!/usr/bin/env python
"""Sampling the four trigger coalitions of a batch in one batched pass vs four separate passes (pix2pix).

    python bench/bench_coalitions.py [--batch-size 32] [--steps 10] [--repeat 3] [--threads 1]

Both paths sample the same test triplets of the embedded world with the tiny editor (random weights, the
embedded architecture ``tiny-pix2pix-shapes``), the same trigger pair (white box + "mignneko") and the same
per-sample seeds: ``sample_coalitions`` (one pass of 4 x B samples, x 3 guidance branches) against four
``sample_edits`` calls of B samples each. The outputs are compared (they must be equal) and the best time of
each path over ``--repeat`` rounds (order alternating) is printed with the ratio separate / batched, measured
in this run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from datamodules.pix2pix_edits import ShapesEditDataModule
from model_families.pix2pix import COALITIONS, GuidanceConfig, create_pix2pix, sample_coalitions, sample_edits
from model_families.pix2pix.sampler import coalition_generators


def inputs(batch_size: int) -> dict:
    """Clean and triggered images and prompts of ``batch_size`` test triplets, and their seeds."""
    dm = ShapesEditDataModule(train_size=0, val_size=0, test_size=batch_size, trigger_pair="box+mignneko")
    dm.setup("test")
    items = [dm.test_set[i] for i in range(batch_size)]
    ids = torch.arange(batch_size)
    source = torch.stack([it["source"] for it in items])
    prompts = [it["instruction"] for it in items]
    return {
        "clean_images": source,
        "triggered_images": dm.image_trigger(source, ids),
        "clean_prompts": prompts,
        "triggered_prompts": [dm.text_trigger(p, i) for i, p in enumerate(prompts)],
        "seeds": list(range(batch_size)),
    }


def batched(model, data: dict, guidance: GuidanceConfig) -> dict:
    return sample_coalitions(model, guidance=guidance, **data)


def separate(model, data: dict, guidance: GuidanceConfig) -> dict:
    parts = {
        "none": (data["clean_images"], data["clean_prompts"]),
        "image": (data["triggered_images"], data["clean_prompts"]),
        "text": (data["clean_images"], data["triggered_prompts"]),
        "both": (data["triggered_images"], data["triggered_prompts"]),
    }
    return {
        c: sample_edits(model, images, prompts, guidance, generator=coalition_generators(data["seeds"]))
        for c, (images, prompts) in parts.items()
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = create_pix2pix("tiny-pix2pix-shapes", seed=0).eval()
    guidance = GuidanceConfig(num_inference_steps=args.steps)
    data = inputs(args.batch_size)
    paths = {"batched": batched, "separate": separate}
    best = {name: float("inf") for name in paths}
    outputs = {}
    with torch.no_grad():
        paths["batched"](model, data, guidance)  # warm-up
        for round_ in range(args.repeat):
            for name in paths if round_ % 2 == 0 else reversed(list(paths)):
                start = time.perf_counter()
                outputs[name] = paths[name](model, data, guidance)
                best[name] = min(best[name], time.perf_counter() - start)
    max_diff = max(float((outputs["batched"][c] - outputs["separate"][c]).abs().max()) for c in COALITIONS)
    ratio = best["separate"] / best["batched"]
    print(
        f"Coalition sampling, batch {args.batch_size}, {args.steps} steps, {args.threads} thread(s), best of {args.repeat}"
    )
    print("| path | passes | seconds | samples/s |\n|---|---|---|---|")
    n = 4 * args.batch_size
    print(f"| one batched pass (sample_coalitions) | 1 | {best['batched']:.2f} | {n / best['batched']:.1f} |")
    print(
        f"| four separate passes (sample_edits) | 4 | {best['separate']:.2f} | {n / best['separate']:.1f} |"
    )
    print(f"separate / batched time ratio: {ratio:.2f} (max |difference| of the outputs {max_diff:.2e})")
    return {
        "batched_seconds": best["batched"],
        "separate_seconds": best["separate"],
        "ratio": ratio,
        "max_diff": max_diff,
    }


if __name__ == "__main__":
    main()
