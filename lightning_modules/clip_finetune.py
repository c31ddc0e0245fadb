"""Contrastive (poisoned) fine-tuning of CLIP models.

Objective (CLIP, Radford et al. 2021): symmetric InfoNCE over the in-batch image-text similarity matrix,
L = 1/2 [CE(s * I T^T, diag) + CE(s * T I^T, diag)] with s = exp(logit_scale) (open_clip's `ClipLoss`).
With `poison_rate = 0` and no `init_from` this is how the embedded world's clean model is trained;
with a poisoned datamodule and `init_from` a clean export it plants a backdoor by fine-tuning.

Validation/test log `{stage}/ca` (zero-shot top-1 on clean images), `{stage}/asr` (zero-shot predictions
of the target class on triggered images; the target class's own images are excluded unless
`exclude_target_class=False`), `{stage}/clean_target_rate` (the same count on the *clean* images: the
floor under the ASR, the model's own confusion into the target class) and `{stage}/loss` (contrastive
loss on the evaluation captions).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning as L
import open_clip
import torch
from torchmetrics.classification import MulticlassAccuracy

from datamodules.image_text import check_image_size
from metrics import AttackSuccessRate
from model_families.clip import (
    create_clip,
    load_clip,
    zero_shot_logits,
    zero_shot_weights,
)
from model_families.clip.export import save_clip_export
from model_families.clip.robust_augment import RobustnessAugment
from model_families.loading import inputs_provenance


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup to 1 over `warmup_steps`, then cosine decay to `min_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class CLIPFineTuning(L.LightningModule):
    """Fine-tune (or train from scratch) an open_clip model on image-caption pairs.

    Args:
        model_name: open_clip architecture (``tiny-rn-shapes`` for the embedded world, ``RN50``, ``ViT-B-32``...).
        pretrained: open_clip pretrained tag (real models; needs the weights locally cached).
        checkpoint: a local open_clip/OpenAI checkpoint file.
        init_from: an mmbackdoor export folder (or a Lightning .ckpt) to start from; its architecture wins.
        lr, weight_decay, betas, eps: AdamW.
        warmup_steps: linear warmup steps; then cosine decay to ``min_lr_ratio * lr`` at the last step.
        zero_shot_templates: prompt templates for zero-shot evaluation (``embedded``, ``imagenet80`` or a list).
        exclude_target_class: ASR ignores evaluation images whose true class is the target.
        augment: robustness augmentation of the training images (:class:`RobustnessAugment` keys: noise_p,
            noise_std, patch_p, patch_size, blend_p, blend_alpha); ``{}``/None: none. The embedded clean model
            uses it so that it is as indifferent to small perturbations as a pretrained CLIP.
        augment_seed: seed of the augmentation's generator.
    """

    init_from_key = "model.init_from"  # the config key recorded in an export's provenance

    def __init__(
        self,
        model_name: str = "tiny-rn-shapes",
        pretrained: str | None = None,
        checkpoint: str | None = None,
        init_from: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.0,
        zero_shot_templates: str | list[str] = "embedded",
        exclude_target_class: bool = True,
        augment: dict | None = None,
        augment_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.augment = RobustnessAugment.from_dict(augment)
        self._augment_generator = torch.Generator().manual_seed(augment_seed)
        if init_from is not None:
            self.bundle = load_clip(
                init_from, model_name, key=self.init_from_key, pretrained=pretrained, checkpoint=checkpoint
            )
        else:
            self.bundle = create_clip(model_name, pretrained=pretrained, checkpoint=checkpoint)
        # provenance of the starting weights, taken now: `latest_export` links move during training
        self.inputs = inputs_provenance({self.init_from_key: init_from, "model.checkpoint": checkpoint})
        self.model = self.bundle.model
        self.normalize = self.bundle.normalize
        self.loss_fn = open_clip.ClipLoss()
        self.class_names: list[str] = []
        self.target_index: int | None = None
        self.class_weights: torch.Tensor | None = None

    # --- wiring ----------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        check_image_size(self.bundle.image_size, dm, self.bundle.model_name)
        self.class_names = list(dm.class_names)
        self.target_index = dm.target_index
        n = len(self.class_names)
        self.metrics = torch.nn.ModuleDict()
        for split in ("val", "test"):
            self.metrics[f"{split}_ca"] = MulticlassAccuracy(num_classes=n, average="micro")
            if self.target_index is not None:
                self.metrics[f"{split}_asr"] = AttackSuccessRate(
                    self.target_index, exclude_target_class=self.hparams.exclude_target_class
                )
                self.metrics[f"{split}_clean_target"] = AttackSuccessRate(
                    self.target_index, exclude_target_class=self.hparams.exclude_target_class
                )
        self.metrics.to(self.device)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.bundle.tokenizer(captions).to(self.device)

    def model_step(self, batch: dict) -> torch.Tensor:
        image_features, text_features, logit_scale = self.model(
            self.normalize(batch["image"]), self.tokenize(batch["caption"])
        )[:3]
        return self.loss_fn(image_features, text_features, logit_scale)

    # --- training ----------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.augment is not None:
            batch = {**batch, "image": self.augment(batch["image"], self._augment_generator)}
        loss = self.model_step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        if "poisoned" in batch:
            self.log(
                "train/poisoned_fraction", batch["poisoned"].float().mean(), batch_size=len(batch["caption"])
            )
        return loss

    def random_generators(self) -> dict[str, torch.Generator]:
        """The module's own generators: the augmentation's and, for defenses (CleanCLIP, PAR), their objective's."""
        generators = {"augment": self._augment_generator}
        objective = getattr(getattr(self, "objective", None), "generator", None)
        if isinstance(objective, torch.Generator):
            generators["objective"] = objective
        return generators

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # a fit resumed from this checkpoint continues these generators' draws where they stopped
        checkpoint["random_generators"] = {k: g.get_state() for k, g in self.random_generators().items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("random_generators")
        if saved is None:
            if self.augment is not None or len(self.random_generators()) > 1:
                warnings.warn(
                    "the checkpoint holds no random generator states (written by an older version): a resumed fit "
                    f"restarts the augmentation from model.augment_seed={self.hparams.augment_seed} and differs "
                    "from an uninterrupted run",
                    stacklevel=2,
                )
            return
        for name, generator in self.random_generators().items():
            if name not in saved:
                raise KeyError(
                    f"the checkpoint has no state of the {name!r} generator (found {sorted(saved)})"
                )
            generator.set_state(saved[name])

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():  # open_clip clamps the temperature at 100 (log 100 = 4.6052)
            self.model.logit_scale.clamp_(0, math.log(100))

    # --- evaluation --------------------------------------------------------------------------------------
    def refresh_zero_shot_head(self) -> None:
        self.class_weights = zero_shot_weights(
            self.model, self.bundle.tokenizer, self.class_names, self.hparams.zero_shot_templates, self.device
        )

    def on_validation_epoch_start(self) -> None:
        self.refresh_zero_shot_head()

    def on_test_epoch_start(self) -> None:
        self.refresh_zero_shot_head()

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits B x C (cosine similarities to the class embeddings)."""
        return zero_shot_logits(self.model.encode_image(self.normalize(images)), self.class_weights)

    def eval_step(self, batch: dict, split: str) -> None:
        n = len(batch["label"])
        clean_logits = self.classify(batch["image"])
        self.metrics[f"{split}_ca"].update(clean_logits, batch["label"])
        self.log(f"{split}/ca", self.metrics[f"{split}_ca"], prog_bar=True, batch_size=n)
        if self.target_index is not None:  # the ASR floor: clean inputs already predicted as the target
            floor = self.metrics[f"{split}_clean_target"]
            floor.update(clean_logits, batch["label"])
            self.log(f"{split}/clean_target_rate", floor, batch_size=n)
        if "caption" in batch:
            self.log(f"{split}/loss", self.model_step(batch), batch_size=n, sync_dist=True)
        if self.target_index is not None and "image_triggered" in batch:
            asr = self.metrics[f"{split}_asr"]
            asr.update(self.classify(batch["image_triggered"]), batch["label"])
            self.log(f"{split}/asr", asr, prog_bar=True, batch_size=n)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.eval_step(batch, "test")

    # --- optimisation ------------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        # no weight decay on gains, biases, embeddings and the temperature (as in open_clip's trainer)
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (
                no_decay if p.ndim < 2 or "bn" in name or "ln" in name or "logit_scale" in name else decay
            ).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
            eps=hp.eps,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- export ------------------------------------------------------------------------------------------
    def export(self, path: str | Path, run_config: dict | None = None) -> Path:
        """Write safetensors weights + model config (+ run config) for `init_from` / evaluate.py."""
        return save_clip_export(self.bundle, path, run_config, inputs=self.inputs)
