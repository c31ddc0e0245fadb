"""(Poisoned) fine-tuning of InstructPix2Pix-style editors with the InstructPix2Pix objective.

Objective: :func:`model_families.pix2pix.training.instruct_pix2pix_loss` (noise-prediction MSE of diffusers'
``train_instruct_pix2pix.py``, with its conditioning dropout). Without ``snapshot`` the registered
``architecture`` is trained from random weights (the embedded world's clean editor); with ``snapshot`` (a
released InstructPix2Pix folder or an export of this module) it is fine-tuned, e.g. on a poisoned datamodule.

Batches are dicts with ``source`` and ``edited`` (B x 3 x H x W in [0, 1]) and ``instruction`` (B strings).
Logs ``train/loss`` and ``val/loss`` (the same objective with a fixed generator, so epochs compare). The
export is a diffusers-layout snapshot (:func:`model_families.pix2pix.save_snapshot`) with ``mmbackdoor.json``;
with EMA the averaged UNet weights are exported.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel

from lightning_modules.clip_finetune import warmup_cosine
from model_families.pix2pix import create_pix2pix, save_snapshot
from model_families.pix2pix.snapshot import snapshot_provenance
from model_families.pix2pix.training import check_conditioning_dropout_prob, instruct_pix2pix_loss


class Pix2PixFineTuning(L.LightningModule):
    """Train or fine-tune a :class:`~model_families.pix2pix.Pix2PixModel`.

    Args:
        architecture: registered size when training from scratch (``tiny-pix2pix-shapes``, ``instruct-pix2pix-sd15``).
        snapshot: a local diffusers-layout snapshot folder to start from (its architecture wins).
        lr, weight_decay, betas, eps: AdamW.
        warmup_steps: linear warmup steps, then cosine decay to ``min_lr_ratio * lr`` at the last step.
        min_lr_ratio: final LR as a fraction of ``lr``.
        conditioning_dropout_prob: the example's p: text alone, both, image alone each dropped with probability p.
        train_text_encoder: also train the CLIP text encoder (the embedded world trains it jointly; the
            released recipe freezes it). The VAE is always frozen.
        ema_decay: keep an EMA of the UNet (``diffusers.training_utils.EMAModel``) with this decay; ``None``: no EMA.
        seed: seed of the random weights (no ``snapshot``) and of the validation loss's generator.
    """

    def __init__(
        self,
        architecture: str = "tiny-pix2pix-shapes",
        snapshot: str | None = None,
        lr: float = 5e-4,
        weight_decay: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        conditioning_dropout_prob: float = 0.05,
        train_text_encoder: bool = True,
        ema_decay: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_conditioning_dropout_prob(conditioning_dropout_prob)  # at construction, not at the first step
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay={ema_decay} must be in (0, 1), or None for no EMA")
        if snapshot is not None:
            self.model = create_pix2pix(snapshot=snapshot)
            self.inputs = {"model.snapshot": snapshot_provenance(snapshot)}
        else:
            self.model = create_pix2pix(architecture, seed=seed)
            self.inputs = {}
        self.model.codec.requires_grad_(False)
        self.model.text_encoder.requires_grad_(train_text_encoder)
        self.ema: EMAModel | None = None
        if ema_decay is not None:
            unet = self.model.unet
            self.ema = EMAModel(
                unet.parameters(), decay=ema_decay, model_cls=UNet2DConditionModel, model_config=unet.config
            )

    def model_step(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        input_ids = self.model.tokenize(batch["instruction"])
        return instruct_pix2pix_loss(
            self.model,
            batch["source"],
            batch["edited"],
            input_ids,
            self.hparams.conditioning_dropout_prob,
            generator,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.model_step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["instruction"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        generator = torch.Generator().manual_seed(self.hparams.seed + batch_idx)
        loss = self.model_step(batch, generator)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["instruction"]))

    # --- EMA ---------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.step(self.model.unet.parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    # --- optimisation ------------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, weight_decay=hp.weight_decay
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- export ------------------------------------------------------------------------------------------
    def export(self, path: str | Path, run_config: dict | None = None) -> Path:
        """A diffusers-layout snapshot (safetensors + ``mmbackdoor.json``); the EMA UNet when EMA is on."""
        if self.ema is None:
            return save_snapshot(self.model, path, run_config, inputs=self.inputs)
        unet_params = list(self.model.unet.parameters())
        self.ema.store(unet_params)
        self.ema.copy_to(unet_params)
        try:
            return save_snapshot(self.model, path, run_config, inputs=self.inputs)
        finally:
            self.ema.restore(unet_params)
