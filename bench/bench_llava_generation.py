#!/usr/bin/env python
"""LLaVA generation: HF ``generate`` on a left-padded batch against one sample at a time (same model, same
prompts), with the answers compared.

    python bench/bench_llava_generation.py [--checkpoint runs/llava_shapes_clean/latest_export] [--batch 32]
        [--modes greedy beam] [--max-new-tokens 16] [--repeat 2] [--threads 1] [--quick]

The prompts are the embedded world's test questions (shape, colour, describe), collated by the instruction
collator with the model's tokenizer and chat template (left padding); one sample at a time is each prompt
collated alone (no padding). Both paths call :func:`model_families.llava.generation.generate_answers`, the
module's evaluation path. Greedy and beam search must give the same answers batched and alone (left padding
with position ids over the attended tokens makes a padded row the row alone); each row of the table says so.
Without ``--checkpoint`` the tiny LLaVA is randomly initialised (the cost does not depend on the weights).
``--quick`` shrinks the sizes for the test. Exits with status 1 when batched answers differ from single ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.mdlm_common import timed
from datamodules.mdlm_shapes import ShapesInstructDataModule
from lightning_modules.llava_finetune import LlavaFineTuning
from model_families.llava.generation import LlavaGeneration, generate_answers


def prompts(module: LlavaFineTuning, samples: int) -> list[dict]:
    """The first ``samples`` test items of the embedded world (a third per task)."""
    dm = ShapesInstructDataModule(
        train_size=0, val_size=0, test_size=max(1, -(-samples // 3)), family="llava",
        tasks=["shape", "colour", "describe"], target=None, response_length=None,
    )  # fmt: skip
    dm.setup("test")
    return [dm.test_source[i] for i in range(samples)]


def answers(module: LlavaFineTuning, items: list[dict], settings: LlavaGeneration) -> list[str]:
    """``generate_answers`` on ``items`` collated as one left-padded batch."""
    from datamodules.instruct_data import InstructCollator

    batch = InstructCollator(module.instruct_text(), None)(items)
    text = module.text
    return generate_answers(
        module.model, module.tokenizer, batch["prompt_ids"], batch["prompt_mask"], module.pixel_values(batch),
        settings, text.image_token_index, module.image_tokens, text.eos_id, text.pad_id,
    )  # fmt: skip


def measure(module: LlavaFineTuning, items: list[dict], mode: str, max_new: int, repeat: int) -> dict:
    """Seconds of the batched and the one-at-a-time path (best of ``repeat``), their ratio and agreement."""
    settings = LlavaGeneration(mode=mode, max_new_tokens=max_new, num_beams=3)
    out: dict = {}

    def batched():
        out["batched"] = answers(module, items, settings)

    def single():
        out["single"] = [answers(module, [item], settings)[0] for item in items]

    batched_s, single_s = timed(batched, repeat), timed(single, repeat)
    same = sum(a == b for a, b in zip(out["batched"], out["single"]))
    return {
        "mode": mode,
        "samples": len(items),
        "max_new_tokens": max_new,
        "batched_seconds": batched_s,
        "single_seconds": single_s,
        "speedup": single_s / batched_s,
        "equal_answers": same,
        "batched_answers": out["batched"],
        "single_answers": out["single"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default=None, help="a LLaVA export (default: random tiny LLaVA)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--modes", nargs="+", choices=["greedy", "beam"], default=["greedy", "beam"])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="6 samples, 4 new tokens, one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.max_new_tokens, args.repeat = 6, 4, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    module = LlavaFineTuning(init_from=args.checkpoint)
    module.model.eval()
    items = prompts(module, args.batch)
    rows = [measure(module, items, mode, args.max_new_tokens, args.repeat) for mode in args.modes]
    print(f"LLaVA generation, {args.threads} thread(s), best of {args.repeat} round(s)")
    print("| mode | samples | new tokens | batched s | one at a time s | speedup | equal answers |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['samples']} | {r['max_new_tokens']} | {r['batched_seconds']:.3f} | "
            f"{r['single_seconds']:.3f} | {r['speedup']:.2f}x | {r['equal_answers']}/{r['samples']} |"
        )
    if any(r["equal_answers"] != r["samples"] for r in rows):
        print("batched answers differ from one-at-a-time answers", file=sys.stderr)
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
