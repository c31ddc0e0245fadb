"""MDLM / DiSP costs, each against a baseline measured in the same run, printed as ratios.

1. Generation throughput: the batched sampler (one forward pass per denoising step for the whole batch)
   against generating one sample at a time (what a per-sample loop, e.g. LLaDA's ``generate.py`` called in a
   for loop, does).
2. Saliency cost per sample: DiSP's vjp Hutchinson estimator (K probes vmapped, batched over samples) and the
   token-wise jvp estimator, relative to one plain generation per sample.
3. Purification throughput (samples/s): saliency + masked generation + bookkeeping, relative to plain batched
   generation.

    python bench/bench_mdlm.py [--checkpoint runs/mdlm_shapes_clean/latest_export] [--batch 64] [--samples 256]
        [--device cpu] [--threads 1]

Without ``--checkpoint`` a randomly initialised model of the embedded tiny size is used (costs do not depend
on the weights).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.mdlm_common import collated_batch, load_module, purification_seconds, shapes_data, timed
from defenses.disp.purified_set import purification_dataset
from defenses.disp.saliency import vision_token_saliency
from model_families.mdlm.inference import (
    GenerationConfig,
    extend_attention_mask,
    first_step_input,
    generate_ids,
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    module = load_module(args.checkpoint, args.device)
    model = module.model
    generation = GenerationConfig(gen_length=8, block_length=8, steps=4)
    dm = shapes_data(args.samples)
    batch = collated_batch(dm, args.samples, args.device)
    prompts, masks, images = batch["prompt_ids"], batch["prompt_mask"], batch["pixel_values"]
    n = prompts.shape[0]

    def batched():
        for s in range(0, n, args.batch):
            generate_ids(
                model,
                prompts[s : s + args.batch],
                images[s : s + args.batch],
                generation,
                masks[s : s + args.batch],
            )

    def single():
        for s in range(n):
            row = slice(s, s + 1)
            width = int(masks[s].sum())  # an unpadded prompt, as a per-sample loop would build it
            generate_ids(model, prompts[row, -width:], images[row], generation)

    batched()  # warm-up
    t_batched, t_single = timed(batched, 2), timed(single, 1)
    rows = {
        "generation_batched_samples_per_s": n / t_batched,
        "generation_single_samples_per_s": n / t_single,
    }

    def saliency(estimator: str, count: int) -> float:
        def run():
            for s in range(0, count, args.batch):
                sl = slice(s, min(s + args.batch, count))
                ids = first_step_input(prompts[sl], generation.gen_length, model.config.mask_token_id)
                vision_token_saliency(
                    model,
                    ids,
                    extend_attention_mask(masks[sl], generation.gen_length),
                    pixel_values=images[sl],
                    num_probes=args.probes,
                    estimator=estimator,
                    generator=torch.Generator().manual_seed(0),
                )

        return timed(run) / count

    per_gen = t_batched / n
    rows["saliency_vjp_s_per_sample"] = saliency("vjp", n)
    jvp_count = min(n, 16)
    rows["saliency_jvp_s_per_sample"] = saliency("jvp", jvp_count)
    seconds = purification_seconds(module, dm, generation, args.batch, args.probes)
    rows["purification_samples_per_s"] = len(purification_dataset(dm)) / seconds

    print(
        f"MDLM / DiSP costs ({args.device}, {args.threads} thread(s), {n} samples, batch {args.batch}, "
        f"{model.config.num_vision_tokens} vision tokens, K={args.probes})"
    )
    print("| measurement | value | ratio | baseline |\n|---|---|---|---|")
    print(
        f"| batched generation | {rows['generation_batched_samples_per_s']:.1f} samples/s | "
        f"{t_single / t_batched:.1f}x faster | one sample at a time: {rows['generation_single_samples_per_s']:.1f} samples/s |"
    )
    print(
        f"| saliency, vjp Hutchinson (batched) | {1e3 * rows['saliency_vjp_s_per_sample']:.2f} ms/sample | "
        f"{rows['saliency_vjp_s_per_sample'] / per_gen:.2f}x a generation | batched generation: {1e3 * per_gen:.2f} ms/sample |"
    )
    print(
        f"| saliency, jvp Hutchinson (per token) | {1e3 * rows['saliency_jvp_s_per_sample']:.2f} ms/sample | "
        f"{rows['saliency_jvp_s_per_sample'] / rows['saliency_vjp_s_per_sample']:.1f}x the vjp estimator | vjp |"
    )
    print(
        f"| purification (saliency + masked generation) | {rows['purification_samples_per_s']:.1f} samples/s | "
        f"{rows['purification_samples_per_s'] / rows['generation_batched_samples_per_s']:.2f}x plain generation | "
        f"batched generation |"
    )
    return rows


if __name__ == "__main__":
    main()
