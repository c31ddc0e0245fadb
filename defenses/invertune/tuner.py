"""InverTune step 3, the tuner: its settings, the layer/neuron selection and the losses it minimises.

Losses (batch means, with the model being tuned; ``theta0`` = the model before tuning):
``L_act`` and ``L_preserve`` (:mod:`defenses.invertune.losses`), total ``1.0 * L_act + 0.5 * L_preserve``
plus the optional terms of :meth:`ActivationTuner.compute_losses`.

Updates. ``update_scope="neurons"`` (the paper, default): only the parameters that produce the
selected channels/units change (:mod:`defenses.invertune.masks`; the tower's residual writers,
``update_writers="last"`` or ``"all"``). Gradients are masked before clipping, and after every AdamW
step the unselected entries are restored, because decoupled weight decay moves parameters even with
zero gradients. ``update_scope="model_code"`` (the authors' code): masks act only inside the loss and
AdamW updates the whole image tower.

Optimiser: AdamW lr 2e-6, weight decay 1e-4, gradient-norm clip 1.0, cosine schedule over the
200 iterations (to ``min_lr`` = 1e-7, the code's ``eta_min``; the code's ``T_max`` is 100), and the
lowest-loss state is kept (:mod:`defenses.invertune.session`). BatchNorm statistics are frozen (eval
mode) by default; ``freeze_bn_stats=False`` runs the image tower in train mode as the code does.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defenses.invertune.capture import capture_activations
from defenses.invertune.losses import Denominator, Pairing, activation_loss, preserve_loss
from defenses.invertune.masks import neuron_parameter_masks
from defenses.invertune.selection import (
    Granularity,
    NeuronSelection,
    layer_divergence,
    select_layers,
    select_neurons,
    spare_target_selective,
)
from defenses.invertune.zero_shot import Normalize, eval_mode
from model_families.clip.anatomy import OPEN_CLIP_ANATOMY, TowerAnatomy, Writers

if TYPE_CHECKING:
    from defenses.invertune.session import TuningSession

UpdateScope = Literal["neurons", "model_code"]
Augmentation = Callable[[Tensor, torch.Generator], Tensor]
TuningCallback = Callable[[dict[str, float]], None]


@dataclass(frozen=True)
class TuneSettings:
    """The hyperparameters of activation tuning (the paper's values by default); checked when built.

    The names are the ``model`` keys of an InverTune config (``lightning_modules.invertune``) and the
    keyword arguments of :class:`ActivationTuner`; ``docs/invertune.md`` says what each does.
    """

    num_layers: int = 3
    granularity: Granularity = "channel"
    update_scope: UpdateScope = "neurons"
    update_writers: Writers = "last"
    iterations: int = 200
    lr: float = 2e-6
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    min_lr: float = 1e-7
    warmup_iterations: int = 0
    activation_weight: float = 1.0
    preserve_weight: float = 0.5
    freeze_bn_stats: bool = True
    normalize_features: bool = True
    pairing: Pairing = "batch_mean"
    act_denominator: Denominator = "tuned"
    invariance_weight: float = 0.0
    target_preserve_weight: float = 0.0
    label_weight: float = 0.0
    label_temperature: float = 0.07
    spare_target_ratio: float | None = None
    kmeans_iters: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.update_scope not in ("neurons", "model_code"):
            raise ValueError(f"update_scope must be 'neurons' or 'model_code', got {self.update_scope!r}")
        if self.granularity not in ("channel", "element"):
            raise ValueError(f"granularity must be 'channel' or 'element', got {self.granularity!r}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.update_writers not in ("last", "all"):
            raise ValueError(f"update_writers must be 'last' or 'all', got {self.update_writers!r}")
        if not 0 <= self.warmup_iterations < self.iterations:
            raise ValueError(
                f"warmup_iterations must be >= 0 and below iterations ({self.iterations}), "
                f"got {self.warmup_iterations}"
            )
        if self.pairing not in ("batch_mean", "per_sample"):
            raise ValueError(f"pairing must be 'batch_mean' or 'per_sample', got {self.pairing!r}")
        for name in (
            "activation_weight",
            "preserve_weight",
            "invariance_weight",
            "target_preserve_weight",
            "label_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.act_denominator not in ("tuned", "constant"):
            raise ValueError(f"act_denominator must be 'tuned' or 'constant', got {self.act_denominator!r}")
        if self.label_temperature <= 0:
            raise ValueError(f"label_temperature must be > 0, got {self.label_temperature}")
        if self.spare_target_ratio is not None and self.spare_target_ratio < 0:
            raise ValueError(f"spare_target_ratio must be >= 0 or None (off), got {self.spare_target_ratio}")

    @classmethod
    def from_config(cls, config: Mapping) -> TuneSettings:
        """The settings named in a config block (absent keys: the defaults; other keys are ignored)."""
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})


@dataclass
class ActivationTuningResult:
    """What one tuning run selected and how its loss went."""

    selected_layers: list[str]
    divergences: dict[str, float]
    neurons: dict[str, NeuronSelection]
    parameter_masks: dict[str, Tensor | None]
    """Trainable parameter names -> element masks (``None``: the whole tensor is trainable)."""
    history: list[dict[str, float]] = field(default_factory=list)
    best_loss: float = float("inf")
    best_iteration: int = -1
    """Iteration whose pre-step state was kept (``iterations``: the final state)."""


class ActivationTuner:
    """InverTune activation tuning of ``model``'s image tower, in place (see the module docstring).

    ``fit(images, inverted_trigger)`` selects layers and neurons on the batch, tunes for
    ``iterations`` AdamW steps, loads the lowest-loss state and returns an
    :class:`ActivationTuningResult`. ``settings`` (:class:`TuneSettings`) holds the hyperparameters;
    keyword ``overrides`` replace single fields of it. ``augment`` makes new views of the batch at
    every step, ``anatomy`` names the tower's layers and writers (open_clip's by default), and
    ``callback`` receives each iteration's record.
    """

    def __init__(
        self,
        model: nn.Module,
        normalize: Normalize,
        settings: TuneSettings | None = None,
        *,
        augment: Augmentation | None = None,
        anatomy: TowerAnatomy = OPEN_CLIP_ANATOMY,
        callback: TuningCallback | None = None,
        **overrides: object,
    ) -> None:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TuneSettings)})
        if unknown:
            raise TypeError(f"ActivationTuner got unknown settings {unknown}: see TuneSettings for the names")
        settings = dataclasses.replace(settings or TuneSettings(), **overrides)
        if not hasattr(model, "encode_image"):
            raise ValueError(
                f"model {type(model).__name__} has no encode_image: pass an open_clip CLIP model"
            )
        self.model = model
        self.normalize = normalize
        self.settings = settings
        self.anatomy = anatomy
        self.augment = augment
        if getattr(augment, "trigger_first", False) and settings.granularity == "element":
            warnings.warn(
                "augment.trigger_first with granularity='element': the element masks are chosen on the "
                "un-augmented batch, so a flipped or shifted trigger falls partly outside them; "
                "granularity='channel' does not depend on the position",
                UserWarning,
                stacklevel=2,
            )
        self.callback = callback

    def select(
        self, images: Tensor, triggered: Tensor, target_rows: Tensor | None = None
    ) -> tuple[dict[str, float], list[str], dict[str, NeuronSelection]]:
        """Layer divergences, the selected layers and their backdoor neurons (eval mode, no grad);
        with ``spare_target_ratio``, ``target_rows`` marks the images labelled with the target and the
        target-selective neurons are dropped (:func:`spare_target_selective`)."""
        if self.settings.spare_target_ratio is not None and target_rows is None:
            raise ValueError(
                "spare_target_ratio needs target_rows: the tuning images labelled with the target"
            )
        with eval_mode(self.model), torch.no_grad():
            clean_acts, _ = capture_activations(self.model, images, self.normalize, anatomy=self.anatomy)
            triggered_acts, _ = capture_activations(
                self.model, triggered, self.normalize, anatomy=self.anatomy
            )
        divergences = layer_divergence(clean_acts, triggered_acts)
        selected = select_layers(divergences, self.settings.num_layers)
        neurons = {
            name: select_neurons(
                clean_acts[name],
                triggered_acts[name],
                granularity=self.settings.granularity,
                iters=self.settings.kmeans_iters,
            )
            for name in selected
        }
        if self.settings.spare_target_ratio is not None:
            neurons = {
                name: spare_target_selective(
                    selection,
                    clean_acts[name],
                    triggered_acts[name],
                    target_rows,
                    self.settings.spare_target_ratio,
                )
                for name, selection in neurons.items()
            }
        return divergences, selected, neurons

    def trainable_masks(self, neurons: Mapping[str, NeuronSelection]) -> dict[str, Tensor | None]:
        if self.settings.update_scope == "model_code":
            _, prefix = self.anatomy.image_tower(self.model)
            return {name: None for name, _ in self.model.named_parameters() if name.startswith(prefix)}
        masks: dict[str, Tensor | None] = {}
        for layer_name, selection in neurons.items():
            layer_masks = neuron_parameter_masks(
                self.model, layer_name, selection.channel_mask, self.settings.update_writers, self.anatomy
            )
            for name, mask in layer_masks.items():  # several layers may share writers ("all")
                masks[name] = mask if masks.get(name) is None else masks[name] | mask
        return masks

    def compute_losses(
        self,
        images: Tensor,
        triggered: Tensor | Sequence[Tensor],
        layers: Mapping[str, nn.Module],
        loss_masks: Mapping[str, Tensor],
        reference: Tensor,
        target_rows: Tensor | None = None,
        labels: Tensor | None = None,
        class_text_embeds: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``loss = w_act * L_act + w_preserve * L_preserve [+ w_inv * L_invariance]`` (and the parts) of
        the current model on ``images`` / ``triggered``; ``reference`` holds ``F_theta0(images)``.
        ``L_invariance = ||F_theta(X') - F_theta0(X)||_F`` (the ``invariance_weight`` option) is
        ``L_preserve`` applied to the triggered batch. With several triggered batches (the inverted
        trigger and further trigger estimates) ``L_act`` and ``L_invariance`` are their means over
        them. ``L_target = ||F_theta(X_t) - F_theta0(X_t)||_F`` over the rows ``X_t`` of ``images`` that
        ``target_rows`` marks (the images the suspect assigns to the identified target) is added with
        ``target_preserve_weight`` (an option: unlearning a targeted backdoor also weakens the target
        class itself). ``L_label = CE(cos(F_theta(X), T) / label_temperature, y)``, the zero-shot
        cross-entropy of the clean images against their labels ``y`` over the class text embeddings
        ``T``, is added with ``label_weight`` (an option for a defender whose clean images are labelled:
        it holds every class' decisions, the target's included, without holding the suspect's own
        target predictions). Runs in the caller's mode."""
        triggered_batches = [triggered] if isinstance(triggered, Tensor) else list(triggered)
        clean_acts, features = capture_activations(self.model, images, self.normalize, layers, self.anatomy)
        act, invariance = 0.0, 0.0
        for batch in triggered_batches:
            triggered_acts, triggered_features = capture_activations(
                self.model, batch, self.normalize, layers, self.anatomy
            )
            act = act + activation_loss(
                clean_acts,
                triggered_acts,
                loss_masks,
                pairing=self.settings.pairing,
                denominator=self.settings.act_denominator,
            )
            if self.settings.invariance_weight:
                invariance = invariance + preserve_loss(
                    triggered_features, reference, normalize=self.settings.normalize_features
                )
        act = act / len(triggered_batches)
        preserve = preserve_loss(features, reference, normalize=self.settings.normalize_features)
        total = self.settings.activation_weight * act + self.settings.preserve_weight * preserve
        out = {"activation": act, "preserve": preserve}
        if self.settings.invariance_weight:
            invariance = invariance / len(triggered_batches)
            total = total + self.settings.invariance_weight * invariance
            out["invariance"] = invariance
        if self.settings.target_preserve_weight and target_rows is not None and bool(target_rows.any()):
            rows = target_rows.to(features.device)
            target = preserve_loss(
                features[rows], reference[rows], normalize=self.settings.normalize_features
            )
            total = total + self.settings.target_preserve_weight * target
            out["target_preserve"] = target
        if self.settings.label_weight and labels is not None:
            if class_text_embeds is None:
                raise ValueError("label_weight needs the class text embeddings")
            logits = F.normalize(features, dim=-1) @ F.normalize(class_text_embeds.to(features), dim=-1).T
            label = F.cross_entropy(logits / self.settings.label_temperature, labels.to(features.device))
            total = total + self.settings.label_weight * label
            out["label"] = label
        return {"loss": total, **out}

    def set_train_mode(self) -> None:
        self.model.eval()
        if not self.settings.freeze_bn_stats:
            self.anatomy.image_tower(self.model)[0].train()

    def begin(
        self,
        images: Tensor,
        inverted_trigger: Callable[[Tensor], Tensor],
        extra_triggers: Sequence[Callable[[Tensor], Tensor]] = (),
        target_rows: Tensor | None = None,
        labels: Tensor | None = None,
        class_text_embeds: Tensor | None = None,
    ) -> TuningSession:
        """Select layers and neurons on ``images`` and return a :class:`TuningSession` that runs the
        iterations one :meth:`TuningSession.step` at a time (a LightningModule's training steps).
        ``target_rows``: a boolean per image, the images the suspect assigns to the target (for
        ``target_preserve_weight``); ``labels`` (class index per image) and ``class_text_embeds``
        (``C x D``): for ``label_weight``."""
        from defenses.invertune.session import TuningSession

        return TuningSession(
            self, images, inverted_trigger, extra_triggers, target_rows, labels, class_text_embeds
        )

    def fit(
        self,
        images: Tensor,
        inverted_trigger: Callable[[Tensor], Tensor],
        extra_triggers: Sequence[Callable[[Tensor], Tensor]] = (),
        target_rows: Tensor | None = None,
        labels: Tensor | None = None,
        class_text_embeds: Tensor | None = None,
    ) -> ActivationTuningResult:
        """Tune ``self.model`` in place on one clean batch ``images`` (``B x 3 x H x W``, [0, 1]);
        ``extra_triggers``: further trigger estimates (e.g. the identification UAP) for the losses;
        the other arguments as in :meth:`begin`."""
        session = self.begin(images, inverted_trigger, extra_triggers, target_rows, labels, class_text_embeds)
        try:
            for _ in range(self.settings.iterations):
                session.step()
            return session.finish()
        finally:
            session.close()
