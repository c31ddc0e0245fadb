"""InverTune step 3 as a plain function: :func:`tune` (or :func:`begin_tuning` for a caller that runs
the iterations itself, as the LightningModule does) with its argument dataclass :class:`TuneConfig`.

:class:`TuneConfig` holds the tuner's hyperparameters (:class:`~defenses.invertune.tuner.TuneSettings`)
and the choices around them: the size of the single clean tuning batch, its augmented views, which
tuning images are the target's (``target_rows``) and which further trigger estimates to tune against.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from defenses.invertune.session import TuningSession
from defenses.invertune.tuner import ActivationTuner, ActivationTuningResult, TuneSettings, TuningCallback
from defenses.invertune.tuning_augment import TuningAugment
from defenses.invertune.zero_shot import Normalize, batch_images, eval_mode, zero_shot_predict
from model_families.clip.anatomy import OPEN_CLIP_ANATOMY, TowerAnatomy

log = logging.getLogger(__name__)

TargetRows = Literal["predicted", "label"]


@dataclass(frozen=True)
class TuneConfig:
    """Step 3's arguments; the names are the ``model`` keys of an InverTune config."""

    settings: TuneSettings = field(default_factory=TuneSettings)
    tuning_batch_size: int = 64
    augment: Mapping | None = None
    """A :class:`~defenses.invertune.tuning_augment.TuningAugment` block, or ``None`` (the batch itself)."""
    target_rows: TargetRows = "predicted"
    tune_with_uap: bool = False
    tune_with_warp: bool = False

    def __post_init__(self) -> None:
        if self.tuning_batch_size < 1:
            raise ValueError(f"model.tuning_batch_size must be >= 1, got {self.tuning_batch_size}")
        if self.target_rows not in ("predicted", "label"):
            raise ValueError(f"model.target_rows must be 'predicted' or 'label', got {self.target_rows!r}")
        if self.settings.spare_target_ratio is not None and self.target_rows != "label":
            raise ValueError(
                "model.spare_target_ratio compares the tuning images labelled with the target: it needs "
                f"model.target_rows: label, got {self.target_rows!r}"
            )
        TuningAugment.from_dict(self.augment)  # an unknown augmentation key fails here, not at step 1

    @classmethod
    def from_config(cls, config: Mapping) -> TuneConfig:
        """From an InverTune ``model`` block (absent keys: the defaults; other keys are ignored)."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "settings"]
        return cls(settings=TuneSettings.from_config(config), **{k: config[k] for k in names if k in config})

    @property
    def uses_target_rows(self) -> bool:
        """Whether the tuning images of the target are needed (``target_preserve_weight``, ``spare_target_ratio``)."""
        return bool(self.settings.target_preserve_weight) or self.settings.spare_target_ratio is not None

    @property
    def needs_labels(self) -> bool:
        """Whether the tuning batch must carry its clean-set labels."""
        return (self.target_rows == "label" and self.uses_target_rows) or bool(self.settings.label_weight)

    def build_tuner(
        self,
        model: nn.Module,
        normalize: Normalize,
        anatomy: TowerAnatomy = OPEN_CLIP_ANATOMY,
        callback: TuningCallback | None = None,
    ) -> ActivationTuner:
        """The :class:`ActivationTuner` of these settings (``augment`` becomes a :class:`TuningAugment`)."""
        augment = TuningAugment.from_dict(None if self.augment is None else dict(self.augment))
        return ActivationTuner(
            model, normalize, self.settings, augment=augment, anatomy=anatomy, callback=callback
        )

    def target_rows_of(
        self, target: int, labels: Tensor | None, predict: Callable[[], Tensor]
    ) -> Tensor | None:
        """The tuning images that ``target_preserve_weight`` holds and ``spare_target_ratio`` compares
        (``None`` when both are off): those whose ``labels`` are ``target`` (``target_rows: label``) or
        those the suspect predicts as it (``predicted``; ``predict()`` gives its zero-shot classes)."""
        if not self.uses_target_rows:
            return None
        if self.target_rows == "label":
            return labels == target
        return predict() == target

    def extra_trigger_estimates(self, uap: nn.Module | None, warp: nn.Module | None) -> list[nn.Module]:
        """The further trigger estimates tuned against besides the inverted trigger: the identification
        UAP (``tune_with_uap``) and the warp estimate (``tune_with_warp``); a missing one is an error."""
        extra = []
        if self.tune_with_uap:
            if uap is None:
                raise ValueError(
                    "model.tune_with_uap needs the identification UAP, but the target was given "
                    "(TriggerInversion.target) or loaded from a run without uap.safetensors; "
                    "set --model.tune_with_uap=false to tune against the inverted trigger only"
                )
            extra.append(uap)
        if self.tune_with_warp:
            if warp is None:
                raise ValueError(
                    "model.tune_with_warp needs a warp trigger estimate: set "
                    "--trainer.callbacks.init_args.warp_epochs to a positive number of epochs "
                    "(or --model.tune_with_warp=false)"
                )
            extra.append(warp)
        return extra


def draw_tuning_batch(
    loader: Iterable, size: int, seed: int, *, with_labels: bool = False, source: str = "the datamodule"
) -> tuple[Tensor, Tensor | None]:
    """``size`` clean images (and their labels with ``with_labels``) drawn in a ``seed``-ed order from
    the first batches of ``loader`` that hold at least ``size`` images; ``source`` names the loader in
    the errors (too few images, batches without a ``label`` key)."""
    images, labels, count = [], [], 0
    generator = torch.Generator().manual_seed(seed)
    for batch in loader:
        x = batch_images(batch, "clean images")
        if with_labels:
            if not isinstance(batch, dict) or "label" not in batch:
                raise ValueError(
                    "model.target_rows='label' and model.label_weight need clean batches with a "
                    f"'label' key; {source} gave none"
                )
            labels.append(torch.as_tensor(batch["label"]))
        images.append(x)
        count += x.shape[0]
        if count >= size:
            break
    if count == 0:
        raise ValueError("the defender's clean image set is empty: activation tuning needs clean images")
    if count < size:
        raise ValueError(
            f"the defender's clean set holds {count} images, fewer than model.tuning_batch_size={size}"
        )
    keep = torch.randperm(count, generator=generator)[:size]
    return torch.cat(images)[keep], (torch.cat(labels)[keep] if with_labels else None)


def begin_tuning(
    tuner: ActivationTuner,
    config: TuneConfig,
    images: Tensor,
    trigger: Callable[[Tensor], Tensor],
    target: int,
    class_text_embeds: Tensor,
    *,
    labels: Tensor | None = None,
    uap: nn.Module | None = None,
    warp: nn.Module | None = None,
) -> TuningSession:
    """Select the layers and neurons on the tuning batch ``images`` (and ``labels`` when
    ``config.needs_labels``) and open a :class:`TuningSession` against ``trigger`` and the extra
    estimates the config asks for; the caller runs its steps."""
    device = images.device
    extra = [estimate.to(device) for estimate in config.extra_trigger_estimates(uap, warp)]

    def predict() -> Tensor:
        with eval_mode(tuner.model):  # the suspect, before any tuning step
            return zero_shot_predict(tuner.model, images, class_text_embeds, tuner.normalize)

    target_rows = config.target_rows_of(target, labels, predict)
    if target_rows is not None:
        by_label = config.target_rows == "label"
        kind = "labelled" if by_label else "predicted"
        log.info(
            "activation tuning: %d of %d tuning images %s as the target",
            int(target_rows.sum()),
            len(images),
            kind,
        )
    with_label_loss = bool(config.settings.label_weight)
    session = tuner.begin(
        images,
        trigger,
        extra,
        target_rows,
        labels if with_label_loss else None,
        class_text_embeds if with_label_loss else None,
    )
    selection = {name: int(session.result.neurons[name].channel_mask.sum()) for name in session.layers}
    log.info("activation tuning: layers %s, selected neurons %s", list(session.layers), selection)
    return session


def tune(
    model: nn.Module,
    normalize: Normalize,
    config: TuneConfig,
    images: Tensor,
    trigger: Callable[[Tensor], Tensor],
    target: int,
    class_text_embeds: Tensor,
    *,
    labels: Tensor | None = None,
    uap: nn.Module | None = None,
    warp: nn.Module | None = None,
    anatomy: TowerAnatomy = OPEN_CLIP_ANATOMY,
) -> ActivationTuningResult:
    """Tune ``model`` in place on the clean batch ``images`` for ``config.settings.iterations`` steps and
    keep the lowest-loss state (:func:`begin_tuning`, then every step, then ``finish``)."""
    tuner = config.build_tuner(model, normalize, anatomy)
    session = begin_tuning(
        tuner, config, images, trigger, target, class_text_embeds, labels=labels, uap=uap, warp=warp
    )
    try:
        while not session.done:
            session.step()
        return session.finish()
    finally:
        session.close()
