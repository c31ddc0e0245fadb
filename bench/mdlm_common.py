"""Set-up shared by the MDLM benchmarks: the tiny embedded LLaDA-V, the poisoned shapes data, one collated
batch and the purification timing (one implementation, used by ``bench_mdlm.py`` and ``bench_generation.py``).

The tiny model is the one the shipped embedded configs train (``configs/mdlm_shapes_clean.yaml``: SigLIP
with 3 layers, patch 8 on 32 px, so 16 vision tokens); without a checkpoint it is randomly initialised,
which leaves the costs unchanged (they do not depend on the weights).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from datamodules.mdlm_shapes import ShapesInstructDataModule
from defenses.disp.masking import DiSPMasking
from defenses.disp.purified_set import purification_dataset
from defenses.disp.purify import purify_dataset
from lightning_modules.mdlm_finetune import MDLMFineTuning
from model_families.mdlm.inference import GenerationConfig

TINY = {"vision": {"patch_size": 8, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3}}
BADNET = {"patch_size": 6, "pattern": "checkerboard", "location": "br", "margin": 1}


def timed(fn, repeat: int = 1) -> float:
    """Best wall time (s) of ``repeat`` calls of ``fn``."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def load_module(checkpoint: str | None, device: str) -> MDLMFineTuning:
    """The module of an export (``checkpoint``) or of the randomly initialised tiny model, its model in eval
    mode on ``device``."""
    torch.manual_seed(0)
    module = MDLMFineTuning(init_from=checkpoint) if checkpoint else MDLMFineTuning(tiny_config=TINY)
    module.model.to(device).eval()
    return module


def shapes_data(samples: int) -> ShapesInstructDataModule:
    """The embedded BadNet / content-insertion data set, set up, with at least ``samples`` purification items
    (each shapes image is served once per task, so half as many images suffice)."""
    dm = ShapesInstructDataModule(
        train_size=max(1, samples // 2),
        val_size=2,
        test_size=2,
        attack="badnet",
        attack_kwargs=BADNET,
        poison_rate=0.1,
        target="content_insertion",
    )
    dm.setup("fit")
    available = len(purification_dataset(dm))
    if available < samples:
        raise ValueError(f"the shapes data set serves {available} purification items, {samples} were asked")
    return dm


def collated_batch(dm: ShapesInstructDataModule, samples: int, device: str) -> dict[str, Any]:
    """The first ``samples`` purification items collated as the purifier does (left-padded ``prompt_ids``,
    ``prompt_mask``, ``pixel_values``), on ``device``."""
    dataset = purification_dataset(dm)
    batch = dm.collator([dataset[i] for i in range(samples)])
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def purification_seconds(
    module: MDLMFineTuning,
    dm: ShapesInstructDataModule,
    generation: GenerationConfig,
    batch_size: int,
    probes: int,
) -> float:
    """Wall time (s) of :func:`purify_dataset` over ``dm``'s whole purification set (DiSP masking rho 0.45,
    ``probes`` vjp probes, saliency + masked generation + decoding + atomic chunk writes), in a temporary
    folder."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        purify_dataset(
            module.model,
            purification_dataset(dm),
            dm.collator,
            Path(tmp) / "purified",
            module.tokenizer,
            DiSPMasking(rho=0.45, num_probes=probes),
            generation,
            batch_size=batch_size,
            chunk_size=max(batch_size, 256),
            source={"fingerprint": dm.source_fingerprint()},
        )
        return time.perf_counter() - start
