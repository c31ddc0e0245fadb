"""(Poisoned) fine-tuning of InstructPix2Pix-style editors with the InstructPix2Pix objective.

Objective: :func:`model_families.pix2pix.training.instruct_pix2pix_loss` (noise-prediction MSE of diffusers'
``train_instruct_pix2pix.py``, with its conditioning dropout). Without ``snapshot`` the registered
``architecture`` is trained from random weights (the embedded world's clean editor); with ``snapshot`` (a
released InstructPix2Pix folder or an export of this module) it is fine-tuned, e.g. on a poisoned datamodule.

Batches are dicts with ``source`` and ``edited`` (B x 3 x H x W in [0, 1]) and ``instruction`` (B strings).
Logs ``train/loss`` and ``val/loss`` (the same objective with a fixed generator, so epochs compare). With a
``judge`` (a CLIP export), validation and test also sample every batch under the four trigger coalitions of
the datamodule's trigger pair (:func:`model_families.pix2pix.evaluation.evaluate_coalitions`) and log
:class:`~model_families.pix2pix.evaluation.CoalitionMetrics`: ASR per coalition, TMA / CTI with their CIs,
edit MSE / SSIM / accuracy (``val/asr/both``, ``test/tma/text_share``, ``test/edit/accuracy``, ...). The
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
from model_families.clip.judge import ClipJudge
from model_families.pix2pix import GuidanceConfig, create_pix2pix, sample_edits, save_snapshot
from model_families.pix2pix.evaluation import CoalitionMetrics, evaluate_coalitions
from model_families.pix2pix.sampler import coalition_generators
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
        judge: a CLIP export folder (e.g. ``runs/clip_shapes_clean/latest_export``) that scores the outputs
            (v(S), edit accuracy); None: validation and test log only the loss.
        guidance: sampling settings of the evaluation (:class:`~model_families.pix2pix.GuidanceConfig` keys:
            ``num_inference_steps``, ``guidance_scale``, ``image_guidance_scale``, ``sampler``, ``eta``).
        reference_snapshot: the clean editor whose edits of the same inputs, with the same noise, are z_clean
            in v(S) (the paper's reading for a poisoned model); None: this model's own coalition ``none``.
        eval_seed: the noise of sample ``i`` in every coalition (and in the reference editor) comes from a
            generator seeded ``eval_seed * 1_000_003 + i``.
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
        judge: str | None = None,
        guidance: dict | None = None,
        reference_snapshot: str | None = None,
        eval_seed: int = 0,
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
        # from_pretrained hands back eval-mode components; what is trained trains in train mode (Lightning keeps
        # the modes it finds), the frozen codec and text encoder stay in eval mode
        self.model.train()
        self.model.codec.eval()
        self.model.text_encoder.train(train_text_encoder)
        self.guidance = GuidanceConfig(**(guidance or {}))
        self.judge = ClipJudge.from_export(judge) if judge is not None else None
        self.reference = None
        if reference_snapshot is not None:
            self.reference = create_pix2pix(snapshot=reference_snapshot).requires_grad_(False).eval()
            self.inputs["model.reference_snapshot"] = snapshot_provenance(reference_snapshot)
        if judge is not None:
            from model_families.clip.export import read_export_meta

            self.inputs["model.judge"] = {"path": str(judge), "meta": read_export_meta(judge)}
        self.coalition_metrics = {"val": CoalitionMetrics(), "test": CoalitionMetrics()}
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
        self._evaluate("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate("test", batch)

    # --- coalition evaluation ------------------------------------------------------------------------------
    def _evaluate(self, stage: str, batch: dict) -> None:
        """Sample the batch under the four coalitions and add it to the stage's metrics (needs a judge)."""
        if self.judge is None:
            return
        dm = self.trainer.datamodule
        ids = batch["index"]
        seeds = [self.hparams.eval_seed * 1_000_003 + int(i) for i in ids.tolist()]
        reference = None
        if self.reference is not None:
            self.reference.to(self.device)
            reference = sample_edits(
                self.reference,
                batch["source"],
                batch["instruction"],
                self.guidance,
                coalition_generators(seeds),
            )
        evaluation = evaluate_coalitions(
            self.model,
            {**batch, "sample_id": ids},
            dm.image_trigger if dm.image_trigger is not None else (lambda images, sample_ids: images),
            dm.text_trigger if dm.text_trigger is not None else (lambda text, sample_id: text),
            dm.target_tensor(),
            self.judge,
            seeds,
            self.guidance,
            clean_reference=reference,
            attributes=dm.attribute_classes(),
        )
        self.coalition_metrics[stage].to(self.device).update(evaluation)

    def _log_coalition_metrics(self, stage: str) -> None:
        metrics = self.coalition_metrics[stage]
        if self.judge is None or int(metrics.edit_quality.count) == 0:
            return
        values = {f"{stage}/{k}": v for k, v in metrics.compute().items() if v.numel() == 1}
        self.log_dict(values, sync_dist=False)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_coalition_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_coalition_metrics("test")

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
