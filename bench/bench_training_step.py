#!/usr/bin/env python
"""Training-step overhead of the LightningModule vs a plain PyTorch loop (same model, same data), per family.

    python bench/bench_training_step.py [--family clip mdlm pix2pix llava] [--steps 60] [--batch-size N] [--threads 1]

* ``clip``: `CLIPFineTuning` (tiny-rn-shapes) on embedded-world batches (default batch 128); the plain loop
  calls the module's own ``model_step`` loss.
* ``pix2pix``: `Pix2PixFineTuning` (tiny-pix2pix-shapes, random weights, constant learning rate) on the
  embedded recolour triplets (default batch 64); the plain loop is the diffusers ``train_instruct_pix2pix.py``
  kind of loop: the InstructPix2Pix loss (`instruct_pix2pix_loss`: noise, timesteps, conditioning dropout,
  what ``training_step`` computes) and AdamW with the module's settings, the global RNG seeded alike.
* ``llava``: `LlavaFineTuning` (tiny-llava-shapes, random weights, constant learning rate, no weight decay) on
  the embedded instruction data (shape, colour, describe; default batch 64); the plain loop is a plain
  transformers loop: ``LlavaForConditionalGeneration`` called with the response-only ``labels`` (its own
  shifted cross-entropy) and AdamW with the module's learning rate and betas. Nothing is random in a step, so
  the losses agree step for step (the test checks it).
* ``mdlm``: `MDLMFineTuning` (the tiny LLaDA-V of the embedded configs, randomly initialised, constant
  learning rate) on the embedded instruction data (default batch 64); the plain loop runs the masked
  diffusion loss (`masked_diffusion_loss`, what ``training_step`` computes for this module) and AdamW with
  the module's learning rate and betas. Both loops draw the masks from the global RNG seeded alike and load
  the same seeded batches, so their losses agree step for step (the test checks it).

Both paths run the same number of optimisation steps (forward, loss, backward, AdamW), after a full plain
warm-up pass, in ``--repeat`` rounds whose order alternates (plain first, then Lightning first, ...). Prints
the best steps/s of each and the ratios Lightning / plain of the best total times and of the median step
times (the median is robust to bursts of other jobs on a shared CPU), all measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch

from bench.mdlm_common import TINY
from datamodules.mdlm_shapes import ShapesInstructDataModule
from datamodules.pix2pix_edits import ShapesEditDataModule
from datamodules.shapes_clip import ShapesCLIPDataModule
from lightning_modules.clip_finetune import CLIPFineTuning
from lightning_modules.llava_finetune import LlavaFineTuning
from lightning_modules.mdlm_finetune import MDLMFineTuning
from lightning_modules.pix2pix_finetune import Pix2PixFineTuning
from model_families.llava.modeling import expand_image_tokens, normalize_images, position_ids, response_labels
from model_families.mdlm.diffusion import masked_diffusion_loss


@dataclass(frozen=True)
class Family:
    """How to build one family's module and data, and the plain loop's loss and optimiser."""

    name: str
    default_batch: int
    module: Callable[[], L.LightningModule]
    datamodule: Callable[[int, int], L.LightningDataModule]  # (steps, batch size)
    loss: Callable[[Any, dict], torch.Tensor]
    optimizer: Callable[[Any], torch.optim.Optimizer]


def _clip_data(steps: int, batch_size: int) -> ShapesCLIPDataModule:
    return ShapesCLIPDataModule(train_size=steps * batch_size, val_size=0, test_size=0, batch_size=batch_size)


def _mdlm_module() -> MDLMFineTuning:
    return MDLMFineTuning(tiny_config=TINY, scheduler="constant", warmup_ratio=0.0)


def _mdlm_data(steps: int, batch_size: int) -> ShapesInstructDataModule:
    # each shapes image is served once per task (2 tasks): steps * batch_size items
    return ShapesInstructDataModule(
        train_size=steps * batch_size // 2, val_size=2, test_size=2, batch_size=batch_size
    )


def _mdlm_loss(module: MDLMFineTuning, batch: dict) -> torch.Tensor:
    return masked_diffusion_loss(
        module.model,
        batch["input_ids"],
        batch["response_mask"],
        module.model.config.mask_token_id,
        eps=module.hparams.loss_eps,
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
    )


def _mdlm_optimizer(module: MDLMFineTuning) -> torch.optim.Optimizer:
    hp = module.hparams
    return torch.optim.AdamW(
        module.model.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay
    )


def _llava_module() -> LlavaFineTuning:
    # no weight decay: the module decays matrices only, the plain loop's AdamW would decay everything
    return LlavaFineTuning(scheduler="constant", warmup_ratio=0.0, weight_decay=0.0)


def _llava_data(steps: int, batch_size: int) -> ShapesInstructDataModule:
    # 3 tasks per image (the clean config's); the longest caption and its </s> in 16 response tokens
    return ShapesInstructDataModule(
        train_size=-(-steps * batch_size // 3), val_size=2, test_size=2, family="llava",
        tasks=["shape", "colour", "describe"], response_length=16, batch_size=batch_size,
    )  # fmt: skip


def _llava_loss(module: LlavaFineTuning, batch: dict) -> torch.Tensor:
    """The plain transformers step: ``LlavaForConditionalGeneration(..., labels=...)`` on the batch's ids with
    the image slot expanded, the response-only labels and the images normalised with the snapshot's statistics."""
    model = module.model
    ids, mask, response = expand_image_tokens(
        batch["input_ids"], model.config.image_token_index, module.image_tokens,
        batch["attention_mask"], batch["response_mask"],
    )  # fmt: skip
    size = model.config.vision_config.image_size
    pixels = normalize_images(batch["pixel_values"], module.image_mean, module.image_std, size, model.dtype)
    labels = response_labels(ids, response, batch["response_tokens"])
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), pixel_values=pixels,
        labels=labels, use_cache=False,
    )  # fmt: skip
    return out.loss


def _pix2pix_module() -> Pix2PixFineTuning:
    return Pix2PixFineTuning(warmup_steps=0, min_lr_ratio=1.0)  # constant LR, as the plain loop's AdamW


def _pix2pix_data(steps: int, batch_size: int) -> ShapesEditDataModule:
    return ShapesEditDataModule(train_size=steps * batch_size, val_size=0, test_size=0, batch_size=batch_size)


def _pix2pix_optimizer(module: Pix2PixFineTuning) -> torch.optim.Optimizer:
    hp = module.hparams
    params = [p for p in module.model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, weight_decay=hp.weight_decay
    )


FAMILIES = {
    "clip": Family(
        "clip",
        128,
        CLIPFineTuning,
        _clip_data,
        lambda module, batch: module.model_step(batch),
        lambda module: torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.1),
    ),
    "mdlm": Family("mdlm", 64, _mdlm_module, _mdlm_data, _mdlm_loss, _mdlm_optimizer),
    "llava": Family("llava", 64, _llava_module, _llava_data, _llava_loss, _mdlm_optimizer),
    "pix2pix": Family(
        "pix2pix",
        64,
        _pix2pix_module,
        _pix2pix_data,
        lambda module, batch: module.model_step(batch),
        _pix2pix_optimizer,
    ),
}


def _setup(family: Family, steps: int, batch_size: int) -> tuple[L.LightningModule, L.LightningDataModule]:
    torch.manual_seed(0)
    dm = family.datamodule(steps, batch_size)
    dm.setup("fit")
    return family.module(), dm


def plain_loop(family: Family, steps: int, batch_size: int) -> tuple[list[float], list[float]]:
    """The end time of each of ``steps`` plain forward/loss/backward/AdamW steps (first entry: the start),
    and the losses."""
    module, dm = _setup(family, steps, batch_size)
    module.train()
    opt = family.optimizer(module)
    loader = dm.train_dataloader()
    losses, times = [], [time.perf_counter()]
    for batch in loader:
        loss = family.loss(module, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        times.append(time.perf_counter())
    return times, [float(v) for v in losses]


class _Timer(L.Callback):
    """The epoch's start time and each step's end time, and each step's loss."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.times = [time.perf_counter()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())
        self.times.append(time.perf_counter())


def lightning_loop(family: Family, steps: int, batch_size: int) -> tuple[list[float], list[float]]:
    """Like :func:`plain_loop` for ``steps`` steps of ``Trainer.fit`` on the module."""
    module, dm = _setup(family, steps, batch_size)
    timer = _Timer()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=dm)
    return timer.times, [float(v) for v in timer.losses]


def measure(family: Family, steps: int, batch_size: int, repeat: int = 1) -> dict:
    """Best total seconds of each path over ``repeat`` rounds (the order alternates: plain first in even
    rounds), the median step of all rounds, the ratios (Lightning / plain) and the last round's losses.
    A full plain pass over the same data warms up first (allocator, kernels, first touch of the data)."""
    plain_loop(family, steps, batch_size)
    paths = {"plain": plain_loop, "lightning": lightning_loop}
    totals = {name: float("inf") for name in paths}
    step_times: dict[str, list[float]] = {name: [] for name in paths}
    losses: dict[str, list[float]] = {}
    for round_ in range(repeat):
        for name in paths if round_ % 2 == 0 else reversed(paths):
            times, losses[name] = paths[name](family, steps, batch_size)
            totals[name] = min(totals[name], times[-1] - times[0])
            step_times[name] += [b - a for a, b in pairwise(times)]
    median = {name: statistics.median(values) for name, values in step_times.items()}
    return {
        "family": family.name,
        "steps": steps,
        "batch_size": batch_size,
        "plain_seconds": totals["plain"],
        "lightning_seconds": totals["lightning"],
        "ratio": totals["lightning"] / totals["plain"],
        "median_step_ratio": median["lightning"] / median["plain"],
        "plain_losses": losses["plain"],
        "lightning_losses": losses["lightning"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--family", nargs="+", choices=sorted(FAMILIES), default=["clip", "mdlm", "pix2pix", "llava"]
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: 128 for clip, 64 for mdlm, pix2pix and llava"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2, help="rounds of both paths, order alternating")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [
        measure(FAMILIES[name], args.steps, args.batch_size or FAMILIES[name].default_batch, args.repeat)
        for name in args.family
    ]
    print(f"Training step, {args.threads} thread(s), best of {args.repeat} round(s) per path")
    print("| family | path | steps | batch | seconds | steps/s |\n|---|---|---|---|---|---|")
    for row in rows:
        for path, key in (
            ("plain PyTorch loop", "plain_seconds"),
            ("LightningModule (Trainer)", "lightning_seconds"),
        ):
            print(
                f"| {row['family']} | {path} | {row['steps']} | {row['batch_size']} | {row[key]:.2f} | "
                f"{row['steps'] / row[key]:.2f} |"
            )
    print()
    for row in rows:
        print(
            f"{row['family']}: Lightning / plain time ratio: {row['ratio']:.3f}, median step ratio "
            f"{row['median_step_ratio']:.3f}  (1.0 = no overhead)"
        )
    return rows


if __name__ == "__main__":
    main()
