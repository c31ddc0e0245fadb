"""Placing MABA's trigger for an instruction datamodule: every training, evaluation and shifted evaluation image
gets its placement from the family's differentiable image-text scorer before the poison plan is made, and the
placement table is saved into the run folder, so the poison manifest names it and a rebuilt trigger finds it.

The scorer is ``datamodule.maba_scorer`` when set (scripts, tests), else the attached LightningModule's
``image_text_scorer()`` (the family's :class:`attacks.maba.ImageTextScorer`); the clean text of an image is the
answer of its first sample, the target text the backdoor target applied to it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from attacks.maba import image_digest

__all__ = ["maba_scorer", "place_maba_trigger"]


def maba_scorer(datamodule):
    """The family's image-text scorer for MABA; ``ValueError`` naming what is missing."""
    scorer = getattr(datamodule, "maba_scorer", None)
    if scorer is not None:
        return scorer
    module = getattr(getattr(datamodule, "trainer", None), "lightning_module", None)
    if module is not None and hasattr(module, "image_text_scorer"):
        return module.image_text_scorer()
    family = type(module).__name__ if module is not None else f"data.family={datamodule.family!r} (no module)"
    raise ValueError(
        f"data.attack=maba places its trigger by attribution and needs a differentiable image-text scorer, which "
        f"{family} does not supply: implement image_text_scorer() on the family's LightningModule (or set "
        "datamodule.maba_scorer)"
    )


def place_maba_trigger(datamodule, batch_size: int = 64) -> None:
    """Compute the placements of every image of the datamodule's sources (and their shifts) that the trigger
    does not know yet, and save the table as ``maba_placements.json`` in the run folder (rank 0)."""
    trigger, target = datamodule.image_trigger, datamodule.target
    if target is None:
        raise ValueError(
            "data.attack=maba needs data.target: the placement avoids the target's important region"
        )
    sources = [datamodule.train_source, datamodule.val_source, datamodule.test_source]
    for source in (datamodule.val_source, datamodule.test_source):
        sources += list(datamodule.build_shifts(source).values())
    pending: dict[str, tuple[torch.Tensor, str, str]] = {}
    scorer = None
    for source in sources:
        for index in range(len(source)):
            item = source[index]
            digest = image_digest(item["image"])
            if digest in trigger.table or digest in pending:
                continue
            answer = item["answer"]
            pending[digest] = (item["image"], answer, target(answer, index, item.get("true_class")))
            if len(pending) == batch_size:
                scorer = scorer or maba_scorer(datamodule)
                _place(trigger, scorer, pending)
    if pending:
        _place(trigger, scorer or maba_scorer(datamodule), pending)
    trainer = getattr(datamodule, "trainer", None)
    if trainer is not None and trainer.global_rank == 0:
        path = Path(trainer.default_root_dir) / "maba_placements.json"
        trigger.save_placements(path)
        trigger.placements_path = str(path)


def _place(trigger, scorer, pending: dict) -> None:
    images = torch.stack([image for image, _, _ in pending.values()])
    trigger.place(scorer, images, [c for _, c, _ in pending.values()], [t for _, _, t in pending.values()])
    pending.clear()
