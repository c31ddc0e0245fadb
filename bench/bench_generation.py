"""Masked-diffusion generation and DiSP purification costs, each a ratio against a baseline of the same run.

1. Generation: the project's batched sampler (``generate_ids``, each ``GenerationConfig.cache`` setting)
   against the official LLaDA algorithm run as a batch on the same weights and prompts. The official
   algorithm (LLaDA's ``generate.py``: Gumbel noise, the per-block transfer schedule, ``model(x).logits`` at
   every step, low-confidence remasking) is re-implemented below as :func:`llada_generate`; called with the
   model's full forward it re-encodes the image at every step. A second baseline calls it with the image
   encoded once (the projected tokens passed as ``vision_token_override``, as LLaDA-V's released code embeds
   the image once before its loop). The baseline computes the confidences' softmax in float64, as LLaDA's
   ``generate.py`` did until commit f51cb17 and as the project does; a third row runs the current revision
   (softmax in the logits' dtype, float32 here), which differs where two confidences tie in float32. Each row
   reports whether its tokens equal the baseline's: ``none`` must be identical, ``prefix`` / ``dual``
   (approximations) report the share of equal tokens.
2. DiSP purification throughput (samples/s, ``purify_dataset``: saliency, masked generation, decoding,
   chunk writes) with each cache setting, against ``cache: none``.

    python bench/bench_generation.py [--checkpoint runs/mdlm_shapes_clean/latest_export] [--batch 32]
        [--gen-lengths 64 128] [--block-length 32] [--caches none prefix dual] [--repeat 2] [--threads 1] [--quick]

Steps = gen_length (one token per step), greedy decoding. Without ``--checkpoint`` the tiny model is randomly
initialised (costs do not depend on the weights). ``--quick`` shrinks every size for the test. Exits with
status 1 if an exact setting (``none``, the image-once baseline) does not reproduce the official tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.mdlm_common import collated_batch, load_module, purification_seconds, shapes_data
from defenses.disp.purified_set import purification_dataset
from model_families.mdlm.inference import GenerationConfig, generate_ids, suppressed_token_ids

OFFICIAL = "official (image re-encoded each step)"
OFFICIAL_F32 = "official, float32 softmax (LLaDA's current code)"
OFFICIAL_ONCE = "official, image encoded once"
EXACT = (OFFICIAL_ONCE, "none")  # settings that must reproduce the official tokens
CACHES = ("none", "prefix", "dual")


# ------------------------------------------------------------------------- the official LLaDA algorithm
def llada_add_gumbel_noise(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """LLaDA's Gumbel-max scores: ``exp(logits) / (-log u)^temperature`` in float64, ``u`` from the global
    RNG; the logits themselves at temperature 0."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits, dtype=torch.float64)
    return logits.exp() / (-torch.log(noise)) ** temperature


def llada_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's schedule (B, steps): each row's masked count split evenly, the remainder one by one to the
    earliest steps."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    counts = torch.zeros(mask_num.size(0), steps, device=mask_index.device, dtype=torch.int64) + base
    for row in range(mask_num.size(0)):
        counts[row, : int(remainder[row])] += 1
    return counts


@torch.no_grad()
def llada_generate(
    model: Callable[..., Any],
    prompt: torch.Tensor,
    attention_mask: torch.Tensor | None,
    mask_id: int,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    suppress_ids: tuple[int, ...] = (),
    softmax_dtype: torch.dtype | None = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """The official LLaDA ``generate`` (no classifier-free guidance), step for step: ``gen_length`` mask
    tokens after the left-padded prompts, ``gen_length / block_length`` blocks of ``steps / blocks`` steps;
    each step runs ``model(x, attention_mask=..., **model_kwargs).logits`` on the whole sequence, takes x0 =
    argmax of the (noisy) scores, its softmax probability as confidence, -inf beyond the current block, and
    commits the scheduled number of most confident masked positions per row.

    ``softmax_dtype``: None computes the softmax in the logits' dtype, as LLaDA's current ``generate.py``;
    ``torch.float64`` as its earlier revisions (until commit f51cb17 "Remove float64 in softmax") and as the
    project's sampler. The two orders differ where two confidences tie in float32.

    ``model_kwargs`` reach the model at every step (``pixel_values``: the image re-encoded each step).
    ``suppress_ids`` is the project's one deliberate difference (it never commits the mask, image, pad, BOS
    or header ids): their noisy scores are -inf before the argmax; empty, this is LLaDA's code.
    Returns the (B, P + gen_length) ids.
    """
    batch, prompt_len = prompt.shape
    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :prompt_len] = prompt.clone()
    if attention_mask is not None:
        ones = torch.ones((batch, gen_length), dtype=attention_mask.dtype, device=prompt.device)
        attention_mask = torch.cat([attention_mask, ones], dim=-1)
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    suppress = torch.tensor(sorted(suppress_ids), dtype=torch.long, device=prompt.device)

    for num_block in range(num_blocks):
        start = prompt_len + num_block * block_length
        end = start + block_length
        transfer_counts = llada_num_transfer_tokens(x[:, start:end] == mask_id, steps)
        for i in range(steps):
            mask_index = x == mask_id
            logits = model(x, attention_mask=attention_mask, **model_kwargs).logits
            logits_with_noise = llada_add_gumbel_noise(logits, temperature)
            if len(suppress):
                logits_with_noise = logits_with_noise.index_fill(-1, suppress, -torch.inf)
            x0 = torch.argmax(logits_with_noise, dim=-1)
            if remasking == "low_confidence":
                p = F.softmax(logits if softmax_dtype is None else logits.to(softmax_dtype), dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            elif remasking == "random":
                x0_p = torch.rand((x0.shape[0], x0.shape[1]), device=x0.device)
            else:
                raise NotImplementedError(remasking)
            x0_p[:, end:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for row in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[row], k=int(transfer_counts[row, i]))
                transfer_index[row, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


# ------------------------------------------------------------------------------------------ measuring
def _round_robin(
    runs: dict[str, Callable[[], torch.Tensor]], repeat: int
) -> dict[str, tuple[float, torch.Tensor]]:
    """Best wall time (s) of each run over ``repeat`` rounds of all runs in turn (a burst of other jobs then
    hits one round of every setting, not all rounds of one), and the run's output."""
    best: dict[str, tuple[float, torch.Tensor]] = {}
    for _ in range(repeat):
        for name, fn in runs.items():
            start = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - start
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, out)
    return best


def project_config(gen_length: int, block_length: int, cache: str) -> GenerationConfig:
    """Greedy, one token per step, the given ``cache`` setting."""
    return GenerationConfig(gen_length=gen_length, block_length=block_length, steps=gen_length, cache=cache)


def official_ids(
    model: Any,
    batch: dict,
    gen_length: int,
    block_length: int,
    image_once: bool = False,
    softmax_dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """Response ids (B, gen_length) of :func:`llada_generate` on the model's full forward: the image
    re-encoded every step, or (``image_once``) encoded once and passed as ``vision_token_override``; the
    softmax in ``softmax_dtype`` (see :func:`llada_generate`)."""
    prompts, images = batch["prompt_ids"], batch["pixel_values"]
    if image_once:
        image = {"vision_token_override": model.encode_images(images)}
    else:
        image = {"pixel_values": images}
    out = llada_generate(
        model,
        prompts,
        batch["prompt_mask"],
        model.config.mask_token_id,
        steps=gen_length,
        gen_length=gen_length,
        block_length=block_length,
        suppress_ids=suppressed_token_ids(model.config),
        softmax_dtype=softmax_dtype,
        **image,
    )
    return out[:, prompts.shape[1] :]


def project_ids(model: Any, batch: dict, config: GenerationConfig) -> torch.Tensor:
    return generate_ids(model, batch["prompt_ids"], batch["pixel_values"], config, batch["prompt_mask"])


def measure_generation(
    model: Any, batch: dict, gen_lengths: list[int], block_length: int, caches: list[str], repeat: int
) -> list[dict]:
    """One row per (gen_length, setting): seconds, samples/s, tokens/s, the official baseline's time over the
    row's (``speedup``), the share of response tokens equal to the official ones (``agreement``) and
    ``identical``."""
    size = batch["prompt_ids"].shape[0]
    # Warm-up (allocator, kernels, each code path once), a single short block.
    official_ids(model, batch, block_length, block_length)
    for cache in caches:
        project_ids(model, batch, project_config(block_length, block_length, cache))
    rows = []
    for gen_length in gen_lengths:
        official = partial(official_ids, model, batch, gen_length, block_length)
        runs = {
            OFFICIAL: official,
            OFFICIAL_F32: partial(official, softmax_dtype=None),
            OFFICIAL_ONCE: partial(official, image_once=True),
        }
        for cache in caches:
            runs[cache] = partial(project_ids, model, batch, project_config(gen_length, block_length, cache))
        measured = _round_robin(runs, repeat)
        base, reference = measured[OFFICIAL]
        for setting, (seconds, ids) in measured.items():
            rows.append(
                {
                    "gen_length": gen_length,
                    "setting": setting,
                    "seconds": seconds,
                    "samples_per_s": size / seconds,
                    "tokens_per_s": size * gen_length / seconds,
                    "speedup": base / seconds,
                    "agreement": float((ids == reference).float().mean()),
                    "identical": bool(torch.equal(ids, reference)),
                }
            )
    return rows


def measure_purification(
    module: Any,
    samples: int,
    batch_size: int,
    gen_length: int,
    block_length: int,
    caches: list[str],
    probes: int,
    repeat: int = 1,
) -> list[dict]:
    """One row per cache setting: purification seconds (best of ``repeat`` rounds) and samples/s over
    ``samples`` items, and the ``none`` row's time over the row's (``speedup``)."""
    dm = shapes_data(samples)
    count = len(purification_dataset(dm))
    runs = {
        cache: partial(
            purification_seconds,
            module,
            dm,
            project_config(gen_length, block_length, cache),
            batch_size,
            probes,
        )
        for cache in caches
    }
    measured = _round_robin(runs, repeat)
    base = measured["none"][0]
    return [
        {
            "setting": cache,
            "samples": count,
            "seconds": seconds,
            "samples_per_s": count / seconds,
            "speedup": base / seconds,
        }
        for cache, (seconds, _) in measured.items()
    ]


def _equality(row: dict) -> str:
    if row["setting"] == OFFICIAL:
        return "(baseline)"
    if row["setting"] in EXACT:
        return "identical" if row["identical"] else f"NOT identical (agreement {row['agreement']:.4f})"
    return f"agreement {row['agreement']:.4f}"


def print_tables(
    args: argparse.Namespace, model: Any, generation: list[dict], purification: list[dict]
) -> None:
    print(
        f"Generation ({args.device}, {args.threads} thread(s), batch {args.batch}, block {args.block_length}, "
        f"steps = gen_length, greedy, {model.config.num_vision_tokens} vision tokens)"
    )
    print(
        "| gen_length | setting | seconds | samples/s | tokens/s | vs official batched | tokens vs official |\n"
        "|---|---|---|---|---|---|---|"
    )
    for row in generation:
        print(
            f"| {row['gen_length']} | {row['setting']} | {row['seconds']:.2f} | {row['samples_per_s']:.2f} | "
            f"{row['tokens_per_s']:.0f} | {row['speedup']:.2f}x | {_equality(row)} |"
        )
    if purification:
        print(
            f"\nDiSP purification (purify_dataset, {purification[0]['samples']} samples, batch {args.batch}, "
            f"gen_length {args.purify_gen_length}, block {args.block_length}, rho 0.45, K={args.probes})"
        )
        print("| cache | seconds | samples/s | vs cache none |\n|---|---|---|---|")
        for row in purification:
            print(
                f"| {row['setting']} | {row['seconds']:.2f} | {row['samples_per_s']:.2f} | "
                f"{row['speedup']:.2f}x |"
            )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--gen-lengths", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--caches", nargs="+", choices=CACHES, default=list(CACHES))
    parser.add_argument("--purify-samples", type=int, default=64)
    parser.add_argument("--purify-gen-length", type=int, default=128)
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument(
        "--repeat", type=int, default=2, help="rounds over all settings; each row keeps its best time"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny defaults (batch 4, gen_length 16, block 8, 4 purified samples; tests)",
    )
    if parser.parse_known_args(argv)[0].quick:  # smaller defaults; explicit options still win
        parser.set_defaults(batch=4, gen_lengths=[16], block_length=8, purify_samples=4, purify_gen_length=16)
    args = parser.parse_args(argv)
    if args.caches[0] != "none":
        parser.error("--caches must start with none (the purification baseline)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    module = load_module(args.checkpoint, args.device)
    batch = collated_batch(shapes_data(args.batch), args.batch, args.device)
    generation = measure_generation(
        module.model, batch, args.gen_lengths, args.block_length, args.caches, args.repeat
    )
    purification = measure_purification(
        module,
        args.purify_samples,
        args.batch,
        args.purify_gen_length,
        args.block_length,
        args.caches,
        args.probes,
        args.repeat,
    )
    print_tables(args, module.model, generation, purification)
    broken = [r for r in generation if r["setting"] in EXACT and not r["identical"]]
    for row in broken:
        print(f"ERROR: {row['setting']} at gen_length {row['gen_length']} differs from the official tokens")
    return {"generation": generation, "purification": purification, "exact": not broken}


if __name__ == "__main__":
    sys.exit(0 if main()["exact"] else 1)
