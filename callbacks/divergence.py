"""Stop a run whose loss or weights turned non-finite, with an error that names the step, the loss and the
key most likely at fault.

Without it a diverged run ends "successfully": its NaN model is exported, becomes ``latest_export``, and
scores ASR 0.000 (every image is given one class), which reads as a perfect defense.
"""

from __future__ import annotations

import lightning as L
import torch

from model_families.finite import NonFiniteError, describe_non_finite, non_finite_tensors


class DivergenceGuard(L.Callback):
    """Raise :class:`~model_families.finite.NonFiniteError` when a training loss is NaN/inf (checked after
    every training batch) or when a weight or persistent buffer is NaN/inf at the end of training (before
    ``on_fit_end``, so :class:`~callbacks.export.ExportOnFitEnd` never runs on a diverged model).

    Works for automatic and manual optimisation alike: it reads the loss that ``training_step`` returns
    (a tensor, a number or a dict with ``loss``). Under DDP the decision is shared, so all ranks stop
    together. A non-finite loss on the first batch of a run comes before any update: the message then
    blames the data or the starting weights instead of the learning rate.
    """

    def __init__(self) -> None:
        self._batches = 0  # training batches seen in this fit
        self._steps_before = 0  # optimizer steps done before the current batch

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._steps_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = _loss_of(outputs)
        first = self._batches == 0
        self._batches += 1
        bad = loss is not None and not bool(torch.isfinite(loss).all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        value = f"{float(loss[~torch.isfinite(loss)].flatten()[0])}" if bad else "non-finite on another rank"
        where = f"at global step {self._steps_before} (epoch {trainer.current_epoch}, batch {batch_idx})"
        if first:
            cause = (
                "it is the first training batch of this run, before any weight update: the learning rate "
                "is not at fault; check the data (NaN/inf inputs) and the starting weights "
                f"({_init_keys(pl_module)} or the --ckpt_path resumed from)"
            )
        else:
            cause = f"most likely the learning rate is too high: {_lr_keys(trainer, pl_module)}"
        raise NonFiniteError(
            f"training diverged: train loss is {value} {where}; {cause}. "
            "Stopped: no export was written and latest_export is unchanged."
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # what an export would hold: parameters and persistent buffers (a causal mask of -inf is legitimate)
        tensors = pl_module.state_dict()
        bad = non_finite_tensors(tensors)
        if not trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            return
        found = describe_non_finite(bad, len(tensors)) if bad else "non-finite weights on another rank"
        raise NonFiniteError(
            f"training diverged: the weights are non-finite at the end of training (global step "
            f"{trainer.global_step}): {found}; most likely the learning rate is too high: "
            f"{_lr_keys(trainer, pl_module)}. Stopped: no export was written and latest_export is unchanged."
        )


def _loss_of(outputs) -> torch.Tensor | None:
    """The loss ``training_step`` returned (Lightning wraps it as ``{"loss": ...}`` under automatic
    optimisation); None when the step returned nothing (a skipped batch)."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    if outputs is None:
        return None
    return torch.as_tensor(outputs).detach()


def _lr_keys(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    """``model.lr=...`` (every learning-rate hyperparameter), the optimizer's current lr and the clipping."""
    hparams = dict(getattr(pl_module, "hparams", {}) or {})
    keys = [
        f"model.{k}={v}" for k, v in hparams.items() if (k == "lr" or k.endswith("_lr")) and v is not None
    ] or ["the model's learning rate (model.lr)"]
    parts = [", ".join(keys)]
    if trainer.optimizers and trainer.optimizers[0].param_groups:  # none: a module's own loop (InverTune)
        parts.append(f"optimizer lr now {trainer.optimizers[0].param_groups[0]['lr']:g}")
    if trainer.gradient_clip_val is None and pl_module.automatic_optimization:
        parts.append("no gradient clipping (trainer.gradient_clip_val)")
    return "; ".join(parts)


def _init_keys(pl_module: L.LightningModule) -> str:
    hparams = dict(getattr(pl_module, "hparams", {}) or {})
    keys = [f"model.{k}={hparams[k]}" for k in ("init_from", "victim", "checkpoint") if k in hparams]
    return ", ".join(keys) or "the model's initialisation"
