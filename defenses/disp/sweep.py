"""Mask-ratio sweep of DiSP's inference-time masking (the paper's Fig. 2): ASR and clean score against rho.

The scores of each batch (saliency, attention or random) are computed once and reused for every rho, so a
sweep costs one saliency pass plus one generation per rho.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch

from defenses.disp.masking import DiSPMasking
from evaluation.generative import CAPTION_TASKS
from metrics.functional.string_rules import get_rule
from metrics.functional.vqa_accuracy import vqa_score
from model_families.mdlm.inference import GenerationConfig, decode_responses, generate_ids, stop_token_ids


def mask_ratio_sweep(
    model: Any,
    tokenizer: Any,
    loaders: dict[str, Iterable[dict]],
    rhos: Sequence[float],
    masking: DiSPMasking,
    generation: GenerationConfig,
    asr_spec: dict,
    prepare: Callable[[dict], dict] | None = None,
) -> list[dict[str, float]]:
    """For each rho: ``asr`` (triggered set), ``asr_wt`` (poisoned training samples), ``asr_clean`` and ``ca``
    (clean QA accuracy) when those sets are in ``loaders`` (names ``triggered``, ``poisoned_train``,
    ``clean``). ``prepare`` moves a batch to the device and applies triggers (the datamodule's transfer)."""
    rule = get_rule(asr_spec["rule"])
    target, phrases = asr_spec.get("target"), asr_spec.get("refusal_phrases")
    stop_ids = stop_token_ids(model)
    sums: dict[float, dict[str, list[float]]] = {float(r): {} for r in rhos}
    model.eval()
    for name, loader in loaders.items():
        for batch_index, batch in enumerate(loader):
            if prepare is not None:
                batch = prepare(batch)
            generator = torch.Generator().manual_seed(masking.seed * 1_000_003 + batch_index)
            scores = None
            if any(r > 0 for r in rhos):
                scores = masking.scores(
                    model,
                    batch["prompt_ids"],
                    batch["pixel_values"],
                    generation.gen_length,
                    batch["prompt_mask"],
                    generator,
                )
            for rho in rhos:
                kwargs = {}
                if rho > 0:
                    chosen = replace(masking, rho=float(rho))
                    kwargs = chosen.model_kwargs(chosen.select(scores))
                ids = generate_ids(
                    model,
                    batch["prompt_ids"],
                    batch["pixel_values"],
                    generation,
                    batch["prompt_mask"],
                    **kwargs,
                )
                responses = decode_responses(tokenizer, ids, stop_ids)
                classes = batch.get("true_class") or [None] * len(responses)
                hits = [
                    float(rule(r, target=target, true_class=c or "", refusal_phrases=phrases))
                    for r, c in zip(responses, classes)
                ]
                bucket = sums[float(rho)]
                key = {"triggered": "asr", "poisoned_train": "asr_wt", "clean": "asr_clean"}.get(name)
                if key is not None:
                    bucket.setdefault(key, []).extend(hits)
                if name == "clean":
                    qa = [i for i, t in enumerate(batch["task"]) if t not in CAPTION_TASKS]
                    bucket.setdefault("ca", []).extend(
                        vqa_score(responses[i], batch["reference"][i]) for i in qa
                    )
    rows = []
    for rho in rhos:
        row = {"rho": float(rho)}
        for key, values in sums[float(rho)].items():
            row[key] = sum(values) / len(values) if values else float("nan")
        rows.append(row)
    return rows
