#!/usr/bin/env python
"""Training-step overhead of the LightningModule vs a plain PyTorch loop (same tiny CLIP, same data).

    python bench/bench_training_step.py [--steps 60] [--batch-size 128] [--threads 1]

Both paths run the same number of optimisation steps of `CLIPFineTuning` (tiny-rn-shapes) on the same
embedded-world batches; the plain loop calls the module's own loss and optimiser. Prints steps/s of each
and the ratio (Lightning time / plain time) measured in this run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch

from datamodules.shapes_clip import ShapesCLIPDataModule
from lightning_modules.clip_finetune import CLIPFineTuning


def make_dm(n: int, batch_size: int) -> ShapesCLIPDataModule:
    dm = ShapesCLIPDataModule(train_size=n, val_size=0, test_size=0, batch_size=batch_size)
    dm.setup("fit")
    return dm


def plain_loop(steps: int, batch_size: int) -> float:
    torch.manual_seed(0)
    dm = make_dm(steps * batch_size, batch_size)
    module = CLIPFineTuning()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.1)
    loader = dm.train_dataloader()
    start = time.perf_counter()
    for batch in loader:
        loss = module.model_step(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


class _Timer(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.elapsed = time.perf_counter() - self.start


def lightning_loop(steps: int, batch_size: int) -> float:
    torch.manual_seed(0)
    dm = make_dm(steps * batch_size, batch_size)
    module = CLIPFineTuning()
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
    return timer.elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plain_loop(5, args.batch_size)  # warm-up (allocator, kernels)
    plain = plain_loop(args.steps, args.batch_size)
    light = lightning_loop(args.steps, args.batch_size)
    print("| path | steps | seconds | steps/s |\n|---|---|---|---|")
    print(f"| plain PyTorch loop | {args.steps} | {plain:.2f} | {args.steps / plain:.2f} |")
    print(f"| LightningModule (Trainer) | {args.steps} | {light:.2f} | {args.steps / light:.2f} |")
    print(f"\nLightning / plain time ratio: {light / plain:.3f}  (1.0 = no overhead)")


if __name__ == "__main__":
    main()
