"""CleanCLIP (Bansal et al., ICCV 2023) as a LightningModule: fine-tune a suspect CLIP model on clean
pairs with ``L_CLIP + L_NCE(x, aug(x)) + L_NCE(t, aug(t))`` (:mod:`defenses.cleanclip`).

    python train.py --config configs/cleanclip_clip_shapes.yaml --model.victim=<export folder or .ckpt>

Evaluation (``{stage}/ca``, ``{stage}/asr``, ``{stage}/loss`` with the plain CLIP loss) and export are
those of :class:`~lightning_modules.clip_finetune.CLIPFineTuning`.
"""

from __future__ import annotations

import torch

from defenses.cleanclip import CleanCLIPObjective
from defenses.victim import require_victim_path
from lightning_modules.clip_finetune import CLIPFineTuning


class CleanCLIPFineTuning(CLIPFineTuning):
    """CleanCLIP fine-tuning of the model at ``victim``.

    Args:
        victim: the suspect model (export folder or Lightning ``.ckpt``); a missing path is an error.
        clip_weight, image_weight, text_weight: weights of ``L_CLIP``, ``L_NCE(I, I_aug)``,
            ``L_NCE(T, T_aug)`` (1 each, the spec).
        seed: seeds the image and text augmentations.
        lr, weight_decay, warmup_steps, ...: AdamW and schedule of :class:`CLIPFineTuning`
            (real scale: lr 1e-5, batch 64, 10 epochs).
    """

    init_from_key = "model.victim"  # super() loads `victim` as its init_from

    def __init__(
        self,
        victim: str,
        clip_weight: float = 1.0,
        image_weight: float = 1.0,
        text_weight: float = 1.0,
        seed: int = 0,
        lr: float = 1e-5,
        weight_decay: float = 0.1,
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
        self.objective = CleanCLIPObjective(
            self.bundle.tokenizer,
            self.normalize,
            clip_weight=clip_weight,
            image_weight=image_weight,
            text_weight=text_weight,
            seed=seed,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.objective(self.model, batch["image"], batch["caption"])
        n = len(batch["caption"])
        self.log("train/loss", out.total, prog_bar=True, batch_size=n)
        self.log_dict(
            {"train/clip": out.clip, "train/image_nce": out.image_nce, "train/text_nce": out.text_nce},
            batch_size=n,
        )
        return out.total
