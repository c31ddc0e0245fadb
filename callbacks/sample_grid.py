"""Log a grid of clean vs triggered training samples (top row clean, bottom row with the trigger)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torchvision.utils import make_grid

from attacks.io import atomic_save_image


class PoisonSampleGrid(L.Callback):
    """At the start of fit: `num_samples` poisoned training images, clean and triggered, saved as PNG
    in the run folder and logged to W&B (when the logger is a WandbLogger). The image and text fields of a
    training item are ``dm.preview_keys`` (default ``("image", "caption")``)."""

    def __init__(self, num_samples: int = 8, filename: str = "poison_samples.png") -> None:
        self.num_samples, self.filename = num_samples, filename

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if trainer.global_rank != 0 or getattr(dm, "plan", None) is None or dm.image_trigger is None:
            return
        ids = [i for i, img in zip(dm.plan.indices, dm.plan.image) if img][: self.num_samples]
        if not ids:
            return
        # a datamodule names its image and text fields (edit triplets: "source" / "instruction")
        image_key, text_key = getattr(dm, "preview_keys", ("image", "caption"))
        clean = torch.stack([dm.train_set[i][image_key] for i in ids])
        triggered = dm.apply_trigger(clean.clone(), torch.tensor(ids)).cpu()
        captions = [dm.train_data[i][text_key] for i in ids]
        grid = make_grid(torch.cat([clean, triggered]), nrow=len(ids), padding=1)
        path = Path(trainer.default_root_dir) / self.filename
        atomic_save_image(grid, path)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image("poison/samples", [grid], caption=[" | ".join(captions)])
