"""PAR, Perturb and Recover (Singh, Croce and Hein, arXiv 2412.00727), as a LightningModule: fine-tune a
suspect CLIP model on clean pairs with ``L_CLIP(f(x~), g(t)) - 1/2 [thr(||f(x~) - f_p(x~)||^2) + thr(...)]``
against a frozen copy ``f_p`` of the suspect (:mod:`defenses.par`).

    python train.py --config configs/par_clip_shapes.yaml --model.victim=<export folder or .ckpt>

Evaluation and export are those of :class:`~lightning_modules.clip_finetune.CLIPFineTuning`.
"""

from __future__ import annotations

from typing import Literal

import torch

from defenses.cleanclip import augment_text
from defenses.frozen import FrozenCopy
from defenses.par import PARObjective
from defenses.victim import require_victim_path
from lightning_modules.clip_finetune import CLIPFineTuning


class PARFineTuning(CLIPFineTuning):
    """PAR fine-tuning of the model at ``victim``.

    Args:
        victim: the suspect model (export folder or Lightning ``.ckpt``); a missing path is an error.
        tau: threshold of ``thr(z) = z if z <= tau else 0`` (2.15).
        reduction: ``"batch_mean"`` (the authors' code: average, then threshold) or ``"per_sample"``.
        perturb_text: perturb the captions too (EDA deletion/swap); the authors' code does not.
        seed: seeds the image (and text) perturbations.
        lr, weight_decay, warmup_steps, ...: AdamW and schedule of :class:`CLIPFineTuning`
            (real scale: lr 3e-6, weight decay 1e-4).
    """

    init_from_key = "model.victim"  # super() loads `victim` as its init_from

    def __init__(
        self,
        victim: str,
        tau: float = 2.15,
        reduction: Literal["batch_mean", "per_sample"] = "batch_mean",
        perturb_text: bool = False,
        seed: int = 0,
        lr: float = 3e-6,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        zero_shot_templates: str | list[str] = "embedded",
        exclude_target_class: bool = True,
    ) -> None:
        require_victim_path(victim)
        super().__init__(
            init_from=victim,
            lr=lr,
            weight_decay=weight_decay,
            betas=betas,
            eps=eps,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
            zero_shot_templates=zero_shot_templates,
            exclude_target_class=exclude_target_class,
        )
        self.frozen = FrozenCopy(self.model)  # f_p: the poisoned model before fine-tuning
        self.objective = PARObjective(
            self.frozen.model,
            self.bundle.tokenizer,
            self.normalize,
            tau=tau,
            reduction=reduction,
            text_perturbation=augment_text if perturb_text else None,
            seed=seed,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.objective(self.model, batch["image"], batch["caption"])
        n = len(batch["caption"])
        self.log("train/loss", out.total, prog_bar=True, batch_size=n)
        self.log_dict(
            {
                "train/clip": out.clip,
                "train/image_distance": out.image_distance,
                "train/text_distance": out.text_distance,
            },
            batch_size=n,
        )
        return out.total
