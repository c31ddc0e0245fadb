"""InverTune step 3 as a LightningModule: activation tuning of a suspect CLIP model.

    python train.py --config configs/invertune_clip_shapes.yaml --model.victim=<export folder or .ckpt>

The :class:`callbacks.trigger_inversion.TriggerInversion` callback (steps 1 and 2, at ``on_fit_start``)
identifies the target class and inverts its trigger on the datamodule's clean images and hands the
result to :meth:`InverTuneModule.receive_inversion`. At ``on_train_start`` the module draws one batch
of ``tuning_batch_size`` clean images (64) and begins an activation-tuning session
(:func:`defenses.invertune.begin_tuning` with the :class:`~defenses.invertune.TuneConfig` of the ``model``
keys); every training step runs one tuning iteration on that same batch (the incoming batch only paces
Lightning's loop). After ``iterations`` steps the lowest-loss state is loaded and the trainer stops.

Validation and test log, on clean and really-triggered evaluation images (the real trigger is used for
reporting only): ``before/ca``, ``before/asr`` (the untouched suspect, a frozen copy) and ``{stage}/ca``,
``{stage}/asr`` (the tuned model), ``*/clean_target_rate`` (clean images predicted as the target: the
floor under the ASR), plus ``before/inverted_asr`` / ``{stage}/inverted_asr`` (the inverted
trigger towards the identified target; a diagnostic). ``export()`` writes the tuned model in the
standard export format, so ``evaluate.py`` and ``init_from`` accept it."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from attacks.io import atomic_write_json
from datamodules.image_text import check_image_size
from defenses.frozen import FrozenCopy
from defenses.invertune import ActivationTuningResult, TuningSession, true_target_check
from defenses.invertune.pipeline import TuneConfig, begin_tuning, draw_tuning_batch
from defenses.victim import load_victim
from metrics import AttackSuccessRate
from model_families.clip import zero_shot_logits, zero_shot_weights
from model_families.clip.export import save_clip_export
from model_families.loading import inputs_provenance

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message=r".*configure_optimizers` returned `None`.*")


class InverTuneModule(L.LightningModule):
    """Activation tuning of a possibly backdoored CLIP model with an inverted trigger (InverTune step 3).

    Args:
        victim: the suspect model: an export folder, a Lightning ``.ckpt`` or (with ``model_name``) an
            open_clip checkpoint file. A missing path is a ``FileNotFoundError`` naming it.
        model_name: architecture of a plain checkpoint file (unused for export folders).
        tuning_batch_size: clean images in the single tuning batch (64 in the paper).
        iterations: tuning iterations (training steps) on that batch.
        num_layers, granularity, update_scope, lr, weight_decay, grad_clip, min_lr, activation_weight,
            preserve_weight, freeze_bn_stats: :class:`defenses.invertune.TuneSettings` (``update_scope``:
            ``neurons``, the paper's restricted updates, or ``model_code``, masks only inside the loss).
        update_writers: with ``update_scope="neurons"``, the selected rows of the layer's own block only
            (``last``) or of every block adding into the same residual channels (``all``: the stage's
            earlier bottlenecks, the earlier ViT blocks); the same on a one-block-per-stage model.
        warmup_iterations: linear learning-rate warm-up steps before the cosine decay (0: none, the
            paper); :func:`defenses.invertune.session.tuning_schedule`.
        pairing: ``L_act`` on batch means (``batch_mean``, the paper) or per image pair (``per_sample``).
        act_denominator: ``tuned`` (the paper and the code: gradients also flow through the denominator of
            ``L_act``, so the ratio can fall by inflating the selected neurons' clean activations) or
            ``constant`` (the denominator is detached; only closing the clean/triggered gap helps).
        invariance_weight: weight of the optional ``||F_theta(X') - F_theta0(X)||_F`` term (0: off, the paper).
        target_preserve_weight: weight of an extra ``||F_theta(X_t) - F_theta0(X_t)||_F`` over the tuning-batch
            images ``X_t`` that the suspect assigns to the identified target (0: off, the paper): tuning
            against a trigger that sends images to the target also weakens the target class itself.
        target_rows: which tuning images ``X_t`` are: those the suspect *predicts* as the target
            (``predicted``, label-free) or those whose clean-set *label* is the target (``label``: the
            defender's class-labelled clean images, as ``TriggerInversion.reference_source: label``; a
            backdoor that leaks onto clean images makes the suspect predict the target for some of them,
            and ``predicted`` would preserve that leak).
        label_weight: weight of an extra zero-shot cross-entropy of the clean tuning images against their
            clean-set labels (0: off, the paper); needs labelled clean batches. ``label_temperature``: its
            temperature (CLIP's 0.07).
        spare_target_ratio: drop from the neuron selection the neurons that the clean images *labelled*
            with the identified target drive at least this many times as strongly as the trigger moves them
            (:func:`defenses.invertune.selection.spare_target_selective`; ``None``: off, the paper);
            needs ``target_rows: label``.
        augment: optional views of the tuning batch, a :class:`defenses.invertune.tuning_augment.TuningAugment`
            block (``flip_p``, ``vflip_p``, ``max_shift``, ``noise_std``, ``trigger_first``); ``null``: the
            batch itself (the paper).
        tune_with_uap: also tune against the identification UAP (step 1's universal perturbation, which
            sends most clean images to the target) as a second trigger estimate: ``L_act`` and
            ``L_invariance`` become means over the two triggered batches. Not in the paper; off by default.
        tune_with_warp: also tune against the warp trigger estimate of ``TriggerInversion`` (its
            ``warp_epochs > 0``; for WaNet-style warps, which a mask and pattern cannot express). Not in the
            paper; off by default.
        zero_shot_templates: prompt templates of the zero-shot head (``embedded``, ``imagenet80``, a list).
        exclude_target_class: ASR ignores evaluation images whose true class is the target.
        seed: seeds the choice of the tuning batch and the augmented views.
    """

    def __init__(
        self,
        victim: str,
        model_name: str | None = None,
        tuning_batch_size: int = 64,
        iterations: int = 200,
        num_layers: int = 3,
        granularity: Literal["channel", "element"] = "channel",
        update_scope: Literal["neurons", "model_code"] = "neurons",
        update_writers: Literal["last", "all"] = "last",
        lr: float = 2e-6,
        weight_decay: float = 1e-4,
        grad_clip: float = 1.0,
        min_lr: float = 1e-7,
        warmup_iterations: int = 0,
        activation_weight: float = 1.0,
        preserve_weight: float = 0.5,
        freeze_bn_stats: bool = True,
        pairing: Literal["batch_mean", "per_sample"] = "batch_mean",
        act_denominator: Literal["tuned", "constant"] = "tuned",
        invariance_weight: float = 0.0,
        target_preserve_weight: float = 0.0,
        target_rows: Literal["predicted", "label"] = "predicted",
        label_weight: float = 0.0,
        label_temperature: float = 0.07,
        spare_target_ratio: float | None = None,
        augment: dict | None = None,
        tune_with_uap: bool = False,
        tune_with_warp: bool = False,
        zero_shot_templates: str | list[str] = "embedded",
        exclude_target_class: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tune_config = TuneConfig.from_config(self.hparams)
        self.bundle = load_victim(victim, model_name)
        self.inputs = inputs_provenance({"model.victim": victim})  # before `latest_export` can move
        self.model = self.bundle.model
        self.normalize = self.bundle.normalize
        self.frozen = FrozenCopy(self.model)  # theta0: the suspect before tuning
        self.automatic_optimization = False
        self.tuner = self.tune_config.build_tuner(self.model, self.normalize)
        self.class_names: list[str] = []
        self.report_target: int | None = None  # the true target, for ASR reporting only
        # why report_target is None (the reports say it when they cannot compare with the true target)
        self.true_target_unknown = "the module was never set up with a datamodule"
        self.inversion = None  # defenses.invertune.artifacts.InversionOutcome
        self.session: TuningSession | None = None
        self.tuning_result: ActivationTuningResult | None = None
        self.timings: dict[str, float] = {}
        self._text_embeds: Tensor | None = None

    # --- what the TriggerInversion callback uses ------------------------------------------------------
    @property
    def suspect_model(self) -> nn.Module:
        """The untouched suspect model (theta0): identification and inversion run on it."""
        return self.frozen.model

    def class_text_embeds(self) -> Tensor:
        """``C x D`` zero-shot class embeddings of the suspect (cached; the text tower is never tuned)."""
        if not self.class_names:
            raise ValueError("the datamodule gave no class names: InverTune needs the class vocabulary")
        if self._text_embeds is None or self._text_embeds.device != self.device:
            self._text_embeds = zero_shot_weights(
                self.suspect_model,
                self.bundle.tokenizer,
                self.class_names,
                self.hparams.zero_shot_templates,
                self.device,
            )
        return self._text_embeds

    def receive_inversion(self, outcome) -> None:
        """Store the identified target and inverted trigger (from the callback)."""
        if not 0 <= outcome.target < len(self.class_names):
            raise ValueError(
                f"identified target {outcome.target} is not in the class vocabulary of {len(self.class_names)}"
            )
        self.inversion = outcome
        self.timings.update(outcome.timings)
        self._build_inverted_metrics()

    # --- wiring -------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        check_image_size(self.bundle.image_size, dm, self.bundle.model_name)
        names = list(getattr(dm, "class_names", []) or [])
        if not names:
            raise ValueError(f"{type(dm).__name__} has no class_names: InverTune needs the class vocabulary")
        if self.class_names and names != self.class_names:
            self._text_embeds = None
        self.class_names = names
        self.report_target = getattr(dm, "target_index", None)
        self.true_target_unknown = (
            f"{type(dm).__name__} has no attack target (data.target_class is null), so the true target is "
            "unknown: nothing to compare the identified target with"
            if hasattr(dm, "target_index")
            else f"{type(dm).__name__} has no target_index: the true target is unknown"
        )
        n = len(names)
        self.metrics = nn.ModuleDict()
        for split in ("val", "test"):
            for when in ("before", "after"):
                self.metrics[f"{split}_{when}_ca"] = MulticlassAccuracy(num_classes=n, average="micro")
                if self.report_target is not None:
                    for name in ("asr", "clean_target"):
                        self.metrics[f"{split}_{when}_{name}"] = AttackSuccessRate(
                            self.report_target, exclude_target_class=self.hparams.exclude_target_class
                        )
        self.metrics.to(self.device)
        if self.inversion is not None:
            self._build_inverted_metrics()

    def _build_inverted_metrics(self) -> None:
        if not hasattr(self, "metrics"):
            return
        for split in ("val", "test"):
            for when in ("before", "after"):
                self.metrics[f"{split}_{when}_inverted_asr"] = AttackSuccessRate(
                    self.inversion.target, exclude_target_class=self.hparams.exclude_target_class
                ).to(self.device)

    def configure_optimizers(self) -> None:
        """The tuning session owns its AdamW (it is built once the neurons are selected)."""
        return None

    # --- tuning -------------------------------------------------------------------------------------
    def tuning_batch(self, with_labels: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``tuning_batch_size`` clean images from the datamodule's clean loader, in a seeded order
        (and their labels with ``with_labels``: the clean batches must then carry a ``label`` key)."""
        dm = self.trainer.datamodule
        images, labels = draw_tuning_batch(
            dm.train_dataloader(),
            self.hparams.tuning_batch_size,
            self.hparams.seed,
            with_labels=with_labels,
            source=type(dm).__name__,
        )
        if with_labels:
            return images.to(self.device), labels.to(self.device)
        return images.to(self.device)

    def on_train_start(self) -> None:
        if self.inversion is None:
            raise RuntimeError(
                "no inverted trigger: add callbacks.trigger_inversion.TriggerInversion to trainer.callbacks "
                "(it runs target identification and trigger inversion before tuning)"
            )
        start = time.perf_counter()
        config, inversion = self.tune_config, self.inversion
        config.extra_trigger_estimates(inversion.uap, inversion.warp)  # a missing one fails before the batch
        batch, labels = (
            self.tuning_batch(with_labels=True) if config.needs_labels else (self.tuning_batch(), None)
        )
        trigger = inversion.tuning_trigger  # the real trigger: TriggerInversion.oracle_trigger
        if trigger is None:
            trigger = inversion.trigger
        self.session = begin_tuning(
            self.tuner,
            config,
            batch,
            trigger,
            inversion.target,
            self.class_text_embeds(),
            labels=labels,
            uap=inversion.uap,
            warp=inversion.warp,
        )
        self._tuning_start = start
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        if self.session is None or self.session.done:
            raise RuntimeError("training_step without an open tuning session (is the trainer restarted?)")
        record = self.session.step()
        self.log_dict(
            {f"train/{k}": record[k] for k in ("loss", "activation", "preserve", "lr")},
            prog_bar=True,
            batch_size=self.hparams.tuning_batch_size,
        )
        if self.session.done:
            self.tuning_result = self.session.finish()
            self.timings["tuning_s"] = time.perf_counter() - self._tuning_start
            if self.device.type == "cuda":
                self.timings["tuning_peak_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            log.info(
                "activation tuning done: best loss %.4f at iteration %d",
                self.tuning_result.best_loss,
                self.tuning_result.best_iteration,
            )
            self.trainer.should_stop = True  # a final validation then ends fit
        return torch.tensor(record["loss"])

    def on_train_end(self) -> None:
        if self.session is not None:
            self.session.close()

    # --- evaluation ---------------------------------------------------------------------------------
    def classify(self, model: nn.Module, images: Tensor) -> Tensor:
        return zero_shot_logits(model.encode_image(self.normalize(images)), self.class_text_embeds())

    def eval_step(self, batch: dict, split: str) -> None:
        n = len(batch["label"])
        labels = batch["label"]
        for when, model in (("before", self.suspect_model), ("after", self.model)):
            key = "before" if when == "before" else split
            ca = self.metrics[f"{split}_{when}_ca"]
            clean_logits = self.classify(model, batch["image"])
            ca.update(clean_logits, labels)
            self.log(f"{key}/ca", ca, prog_bar=True, batch_size=n)
            if self.report_target is not None:  # the ASR floor: clean images already sent to the target
                floor = self.metrics[f"{split}_{when}_clean_target"]
                floor.update(clean_logits, labels)
                self.log(f"{key}/clean_target_rate", floor, batch_size=n)
            if self.report_target is not None and "image_triggered" in batch:
                asr = self.metrics[f"{split}_{when}_asr"]
                asr.update(self.classify(model, batch["image_triggered"]), labels)
                self.log(f"{key}/asr", asr, prog_bar=True, batch_size=n)
            if self.inversion is not None:
                inverted = self.metrics[f"{split}_{when}_inverted_asr"]
                trigger = self.inversion.trigger.to(self.device)
                inverted.update(self.classify(model, trigger(batch["image"])), labels)
                self.log(f"{key}/inverted_asr", inverted, batch_size=n)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        if self.inversion is not None:  # the target itself is text: summary_rows and the reports
            self.log("invert/asr", self.inversion.inverted_asr)
            if self.inversion.identification is not None:
                self.log("identify/margin", self.inversion.identification.margin)

    # --- results ------------------------------------------------------------------------------------
    def report(self) -> dict:
        """JSON-ready summary: identification (and whether it found the true target, when the data know
        it), inversion, layer/neuron selection, tuning, timings."""
        out: dict = {"victim": self.hparams.victim, "timings": dict(self.timings)}
        if self.inversion is not None:
            out["inversion"] = self.inversion.summary(self.class_names)
            out["identified_target"] = self.inversion.target_name
            out.update(
                true_target_check(
                    self.inversion.target, self.report_target, self.class_names, self.true_target_unknown
                )
            )
        elif self.report_target is not None:
            out["true_target"] = self.class_names[self.report_target]
        result = self.tuning_result
        if result is not None:
            out["tuning"] = {
                "selected_layers": result.selected_layers,
                "divergences": result.divergences,
                "selected_neurons": {n: int(s.channel_mask.sum()) for n, s in result.neurons.items()},
                "neurons_per_layer": {n: int(s.channel_mask.numel()) for n, s in result.neurons.items()},
                "best_loss": result.best_loss,
                "best_iteration": result.best_iteration,
                "first": result.history[0] if result.history else None,
                "last": result.history[-1] if result.history else None,
                "update_scope": self.hparams.update_scope,
            }
        return out

    def summary_rows(self) -> dict[str, str]:
        """Text rows of the printed run summary (:class:`callbacks.RunSummary`): the target by name, how
        sure step 1 was, and whether it is the true target."""
        outcome = self.inversion
        if outcome is None:
            return {}
        rows = {"identify/target": f"{outcome.target_name} (index {outcome.target}, {outcome.target_source})"}
        confidence = outcome.confidence
        if confidence is not None:
            verdict = "LOW CONFIDENCE" if confidence.low_confidence else "ok"
            rows["identify/confidence"] = (
                f"{verdict}: margin {confidence.margin:.3f} over {confidence.runner_up!r}, "
                f"min_margin {confidence.threshold:g}"
            )
        check = true_target_check(
            outcome.target, self.report_target, self.class_names, self.true_target_unknown
        )
        if check["true_target"] is None:
            rows["identify/true_target"] = "unknown (the data have no attack target)"
        else:
            found = "found" if check["target_matches_true_target"] else "MISSED"
            rows["identify/true_target"] = f"{check['true_target']} ({found})"
        return rows

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            path = Path(self.trainer.default_root_dir) / "invertune_report.json"
            atomic_write_json(path, self.report())
            log.info("InverTune report written to %s", path)

    def export(self, path: str | Path, run_config: dict | None = None) -> Path:
        """The tuned model in the standard export format (loadable by ``init_from`` / evaluate.py)."""
        return save_clip_export(self.bundle, path, run_config, inputs=self.inputs)
