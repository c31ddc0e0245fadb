"""InverTune step 3, the tuning loop: one :class:`TuningSession` of an :class:`ActivationTuner`.

AdamW with masked gradients, gradient-norm clipping, the restore of unselected entries after each
step, the cosine schedule (:func:`tuning_schedule`) and the lowest-loss state kept at the end. A
session runs one step at a time, so a LightningModule's training steps can drive it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from defenses.invertune.tuner import ActivationTuner, ActivationTuningResult
from defenses.invertune.zero_shot import eval_mode, model_device


def tuning_schedule(
    optimizer: torch.optim.Optimizer, iterations: int, min_lr: float, warmup_iterations: int = 0
) -> torch.optim.lr_scheduler.LRScheduler:
    """The tuning learning rate: cosine decay from the base ``lr`` to ``min_lr`` over ``iterations``
    (the paper, the authors' code); with ``warmup_iterations = w > 0`` (an option, not in the paper)
    step ``i < w`` uses ``lr * (i + 1) / (w + 1)`` and the cosine runs over the remaining
    ``iterations - w`` steps: ``min_lr + (lr - min_lr) * (1 + cos(pi * (i - w) / (iterations - w))) / 2``."""
    if warmup_iterations == 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=min_lr)
    base = optimizer.param_groups[0]["lr"]

    def factor(i: int) -> float:
        if i < warmup_iterations:
            return (i + 1) / (warmup_iterations + 1)
        progress = (i - warmup_iterations) / (iterations - warmup_iterations)
        return (min_lr + (base - min_lr) * (1 + math.cos(math.pi * progress)) / 2) / base

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TuningSession:
    """One activation-tuning run of an :class:`ActivationTuner`, driven step by step.

    Construction selects the layers and neurons, computes ``F_theta0(X)``, freezes every parameter
    outside the trainable set and builds AdamW with its cosine schedule. :meth:`step` runs one
    iteration (the loss is recorded *before* the update, so the lowest-loss state is a state that
    was evaluated); :meth:`finish` also evaluates the final state, loads the lowest-loss one and
    restores the ``requires_grad`` flags and module modes (:meth:`close` only restores). Every step
    re-applies the tuning modes, so a caller (e.g. Lightning) may switch modes between steps.
    """

    def __init__(
        self,
        tuner: ActivationTuner,
        images: Tensor,
        inverted_trigger: Callable[[Tensor], Tensor],
        extra_triggers: Sequence[Callable[[Tensor], Tensor]] = (),
        target_rows: Tensor | None = None,
        labels: Tensor | None = None,
        class_text_embeds: Tensor | None = None,
    ) -> None:
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"images is empty or not a B x 3 x H x W tensor: shape {tuple(images.shape)}")
        if target_rows is not None and tuple(target_rows.shape) != (images.shape[0],):
            raise ValueError(
                f"target_rows must hold one flag per image ({images.shape[0]}), got shape {tuple(target_rows.shape)}"
            )
        self.tuner = tuner
        self.target_rows = None if target_rows is None else target_rows.bool()
        if labels is not None and tuple(labels.shape) != (images.shape[0],):
            raise ValueError(
                f"labels must hold one class per image ({images.shape[0]}), got shape {tuple(labels.shape)}"
            )
        if tuner.settings.label_weight and (labels is None or class_text_embeds is None):
            raise ValueError("label_weight > 0 needs the tuning images' labels and the class text embeddings")
        self.labels = None if labels is None else labels.long()
        self.class_text_embeds = class_text_embeds
        model = tuner.model
        device = model_device(model)
        self.x = images.to(device)
        self.trigger = inverted_trigger
        with torch.no_grad():
            self.x_triggered = inverted_trigger(self.x).detach()
            self.extra_triggers = list(extra_triggers)
            self.x_extra = [trigger(self.x).detach() for trigger in self.extra_triggers]
        divergences, selected, neurons = tuner.select(self.x, self.x_triggered, self.target_rows)
        all_layers = tuner.anatomy.candidate_layers(model)
        self.layers = {name: all_layers[name] for name in selected}
        self.loss_masks = {name: neurons[name].loss_mask.to(device) for name in selected}
        with eval_mode(model), torch.no_grad():
            self.reference = model.encode_image(tuner.normalize(self.x)).detach()  # F_theta0(X)
        # with augmentation every step sees new views of the batch: F_theta0 of them needs theta0
        self.frozen = copy.deepcopy(model).eval().requires_grad_(False) if tuner.augment else None
        self.generator = torch.Generator().manual_seed(tuner.settings.seed)

        self.masks = tuner.trainable_masks(neurons)
        self.params = dict(model.named_parameters())
        self.trainable = [self.params[name] for name in self.masks]
        self.originals = {
            name: self.params[name].detach().clone() for name, mask in self.masks.items() if mask is not None
        }
        self.watched_buffers = (
            []
            if tuner.settings.freeze_bn_stats
            else list(tuner.anatomy.image_tower(model)[0].named_buffers())
        )
        self._flags = {name: p.requires_grad for name, p in self.params.items()}
        self._modes = [(m, m.training) for m in model.modules()]
        self.result = ActivationTuningResult(selected, divergences, neurons, self.masks)
        self.iteration = 0
        self._best_state: dict[str, Tensor] | None = None
        self._closed = False
        for name, p in self.params.items():
            p.requires_grad_(name in self.masks)
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=tuner.settings.lr, weight_decay=tuner.settings.weight_decay
        )
        self.scheduler = tuning_schedule(
            self.optimizer, tuner.settings.iterations, tuner.settings.min_lr, tuner.settings.warmup_iterations
        )

    @property
    def done(self) -> bool:
        """Whether the tuner's ``iterations`` steps have run."""
        return self.iteration >= self.tuner.settings.iterations

    def _snapshot(self) -> dict[str, Tensor]:
        state = {name: self.params[name].detach().clone() for name in self.masks}
        state.update({f"buffer:{name}": b.detach().clone() for name, b in self.watched_buffers})
        return state

    def losses(self) -> dict[str, Tensor]:
        """The losses of the current model on the tuning batch (in the caller's grad mode)."""
        return self.tuner.compute_losses(
            self.x,
            [self.x_triggered, *self.x_extra],
            self.layers,
            self.loss_masks,
            self.reference,
            self.target_rows,
            self.labels,
            self.class_text_embeds,
        )

    def augmented_losses(self) -> dict[str, Tensor]:
        """The losses on a fresh augmented view ``aug(X)`` of the batch, its triggered copy and
        ``F_theta0(aug(X))`` (the tuner's ``augment`` option). The triggered copy is
        ``trigger(aug(X))``, or ``aug(trigger(X))`` with the same random view when the augmentation has
        ``trigger_first`` set (the trigger then moves and flips with the image)."""
        state = self.generator.get_state()
        x = self.tuner.augment(self.x, self.generator)
        with torch.no_grad():
            if getattr(self.tuner.augment, "trigger_first", False):
                x_triggered = [
                    self.tuner.augment(batch, torch.Generator().set_state(state)).detach()
                    for batch in (self.x_triggered, *self.x_extra)
                ]
            else:
                x_triggered = [trigger(x).detach() for trigger in (self.trigger, *self.extra_triggers)]
            with eval_mode(self.frozen):
                reference = self.frozen.encode_image(self.tuner.normalize(x))
        return self.tuner.compute_losses(
            x,
            x_triggered,
            self.layers,
            self.loss_masks,
            reference,
            self.target_rows,
            self.labels,
            self.class_text_embeds,
        )

    def step(self) -> dict[str, float]:
        """One AdamW iteration (masked gradients, clipping, restore of unselected entries, schedule);
        returns and records ``{iteration, lr, grad_norm, loss, activation, preserve}``."""
        if self._closed:
            raise RuntimeError("this tuning session is finished; begin a new one")
        tuner, result, params = self.tuner, self.result, self.params
        with torch.enable_grad():
            for name, p in params.items():
                p.requires_grad_(name in self.masks)
            tuner.set_train_mode()
            if tuner.augment is None:
                losses = self.losses()
                batch_losses = losses
            else:  # the kept state is the one of lowest loss on the batch itself
                with torch.no_grad():
                    batch_losses = self.losses()
                losses = self.augmented_losses()
            loss_value = batch_losses["loss"].item()
            if loss_value < result.best_loss:
                result.best_loss, result.best_iteration = loss_value, self.iteration
                self._best_state = self._snapshot()
            self.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
        with torch.no_grad():
            for name, mask in self.masks.items():
                if mask is not None and params[name].grad is not None:
                    params[name].grad.mul_(mask)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, tuner.settings.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        with torch.no_grad():
            for name, original in self.originals.items():
                params[name].copy_(torch.where(self.masks[name], params[name], original))
        self.scheduler.step()
        record = {"iteration": float(self.iteration), "lr": lr, "grad_norm": float(grad_norm)}
        record.update({key: value.item() for key, value in batch_losses.items()})
        if tuner.augment is not None:
            record["augmented_loss"] = losses["loss"].item()
        result.history.append(record)
        if tuner.callback is not None:
            tuner.callback(record)
        self.iteration += 1
        return record

    def finish(self) -> ActivationTuningResult:
        """Evaluate the final state, load the lowest-loss state, restore flags and modes."""
        if self._closed:
            return self.result
        result = self.result
        try:
            self.tuner.set_train_mode()
            with torch.no_grad():
                final = self.losses()["loss"].item()
            if final < result.best_loss:
                result.best_loss, result.best_iteration, self._best_state = final, self.iteration, None
            if self._best_state is not None:
                with torch.no_grad():
                    for name in self.masks:
                        self.params[name].copy_(self._best_state[name])
                    for name, buffer in self.watched_buffers:
                        buffer.copy_(self._best_state[f"buffer:{name}"])
        finally:
            self.close()
        return result

    def close(self) -> None:
        """Restore the ``requires_grad`` flags and module modes of before the session (idempotent)."""
        if self._closed:
            return
        for name, p in self.params.items():
            p.requires_grad_(self._flags[name])
        for module, mode in self._modes:
            module.train(mode)
        self._best_state = None
        self.frozen = None
        self._closed = True
