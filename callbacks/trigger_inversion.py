"""InverTune steps 1 and 2 as a Lightning callback: identify the target class, invert its trigger.

At ``on_fit_start`` (before any tuning step) the callback reads the defender's clean images from the
datamodule's ``train_dataloader()``, and on the suspect model

1. fits universal adversarial perturbations (``uap``) and ranks the classes by ``uap_score``
   (:func:`defenses.invertune.identify`); the top class is the suspected target (or ``target``: the
   oracle-target ablation); a margin below ``min_margin`` is a warning;
2. inverts a mask/pattern trigger for that class on the clean non-target images with the four losses of
   the spec (:func:`defenses.invertune.invert_trigger`), and measures its ASR on the clean images.

It writes ``trigger_inversion/`` into the run folder (mask, pattern and example PNGs, the trigger as
safetensors, ``report.json``), logs the images and scalars to the loggers, and hands an
:class:`InversionOutcome` to ``pl_module.receive_inversion``. The real trigger is never read: only
clean images, the class vocabulary and the suspect model are used, unless ``oracle_trigger`` (a
diagnostic, not a defense) asks to tune against the datamodule's real trigger.

The module must provide ``suspect_model`` (``nn.Module`` with ``encode_image``), ``normalize``,
``class_names``, ``class_text_embeds()`` (``C x D``) and ``receive_inversion(outcome)``
(:class:`lightning_modules.invertune.InverTuneModule` does).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from defenses.invertune.artifacts import (
    InversionOutcome,
    read_inversion_folder,
    upscale,
    write_inversion_folder,
)
from defenses.invertune.clean_images import CleanImages, ReferenceSource
from defenses.invertune.pipeline import (
    IdentifyConfig,
    InvertConfig,
    UAPKind,
    class_view,
    identify,
    invert,
    invert_warp_estimate,
    peak_memory,
    reset_peak_memory,
)
from defenses.invertune.target_confidence import DEFAULT_MIN_MARGIN, TargetConfidence
from defenses.invertune.trigger_inversion import inverted_trigger_asr

log = logging.getLogger(__name__)

__all__ = ["OVERRIDE_KEYS", "InversionOutcome", "TriggerInversion", "warn_if_unsure"]

OVERRIDE_KEYS = (
    "set the target yourself with TriggerInversion.target (--trainer.callbacks.init_args.target=<class name>), "
    "or change the threshold with TriggerInversion.min_margin"
)


def warn_if_unsure(confidence: TargetConfidence | None, where: str = "target identification") -> None:
    """A loud ``UserWarning`` (rank zero) when ``confidence`` is low: the margin, the threshold, the top
    two classes and the keys that override the target or the threshold."""
    if confidence is None or not confidence.low_confidence:
        return
    rank_zero_warn(
        f"InverTune is unsure of the backdoor target ({where}): the {confidence.describe()} is below "
        f"TriggerInversion.min_margin={confidence.threshold:g}, so the target may be wrong (steps 2-3 "
        f"would then invert and tune against the wrong class); compare 'increase' in "
        f"trigger_inversion/report.json, {OVERRIDE_KEYS}",
        category=UserWarning,
    )


class TriggerInversion(L.Callback):
    """InverTune target identification and trigger inversion before tuning (see the module docstring):
    a thin wrapper of :func:`defenses.invertune.pipeline.identify` and :func:`~defenses.invertune.pipeline.invert`,
    whose argument dataclasses (``identify_config``, ``invert_config``) it fills from its keys.

    Args:
        target: a class name to use instead of identifying one (oracle-target ablation); it must be in
            the vocabulary.
        uap: ``"patch"`` (AdvCLIP corner patch, ``uap_area_fraction`` of the image; the paper),
            ``"anywhere"`` (the same patch at a random position of every image), ``"linf"`` (additive,
            ``||delta||_inf <= uap_eps``) or ``"union"`` (``anywhere`` and ``linf`` fitted separately,
            each class ranked by its larger rise: :mod:`defenses.invertune.location_free`).
        uap_epochs, uap_lr, uap_temperature, uap_text_weight: the UAP optimisation
            (:meth:`defenses.invertune.UniversalPerturbation.fit`; ``uap_lr`` None: the UAP's default).
        uap_area_fraction, uap_margin: patch area (``patch``, ``anywhere``) and the corner patch's margin
            (None: 14 px scaled from 224).
        uap_eps: L-inf budget.
        uap_score: ``"rise"`` (the paper) or ``"breadth"`` (:func:`defenses.invertune.breadth_of`): how
            the classes are ranked.
        epochs, lr, temperature, align_weight, embedding_weight, similarity_weight, mask_weight,
            reference_mode, parameterization, steps_per_batch, mask_channels, noise_std: trigger inversion
            (:func:`defenses.invertune.invert_trigger`; batches come from the datamodule).
        reference_source: how the defender picks target-class reference images and the non-target
            images to invert on: ``"predicted"`` (the suspect's zero-shot predictions: no labels
            needed) or ``"label"`` (the clean set's labels).
        max_reference_images: reference images kept for ``L_emb``.
        min_margin: an identification whose margin (the target's rise in top-1 frequency under the UAP
            minus the runner-up's) is below this is low confidence: a warning, and
            ``target_confidence.low_confidence`` in ``report.json`` (0: never warn).
        warp_epochs: > 0 also fits a warp trigger estimate for ``warp_epochs`` epochs over the clean
            non-target images (:func:`defenses.invertune.warp_inversion.invert_warp`; not in the paper:
            a WaNet-style warp is no mask and pattern); 0 (default) does not.
        warp_grid, warp_lr, warp_displacement_weight: the warp's control grid size (WaNet's k = 4), Adam
            learning rate and weight of its mean displacement in pixels.
        seed: seeds the UAP and trigger initialisations.
        image_scale: nearest-neighbour upscaling of the saved PNGs (small images stay visible).
        load_from: a previous run's ``trigger_inversion`` folder (``trigger.safetensors`` +
            ``report.json``): its target and trigger are reused and steps 1 and 2 are skipped (tuning
            ablations on a fixed inversion). A missing file, a target outside the vocabulary or a
            trigger of another image size is an error.
        oracle_trigger: a diagnostic, not a defense (the defender never has the real trigger): steps 1
            and 2 run (or load) as usual, then activation tuning gets the datamodule's *real* image
            trigger (``data.attack``) instead of the inverted one, so a run measures how far tuning
            itself can remove the backdoor. The inverted trigger's ASR is still the one logged. A
            datamodule without an image trigger is an error.
    """

    def __init__(
        self,
        target: str | None = None,
        uap: UAPKind = "patch",
        uap_epochs: int = 5,
        uap_lr: float | None = None,
        uap_temperature: float = 0.1,
        uap_text_weight: float = 5.0,
        uap_area_fraction: float = 0.03,
        uap_margin: int | None = None,
        uap_eps: float = 8 / 255,
        uap_score: Literal["rise", "breadth"] = "rise",
        epochs: int = 10,
        lr: float = 0.01,
        temperature: float = 0.07,
        align_weight: float = 5.0,
        embedding_weight: float = 0.5,
        similarity_weight: float = 1.0,
        mask_weight: float = 0.01,
        reference_mode: Literal["pairwise", "mean", "first"] = "pairwise",
        parameterization: Literal["clamp", "sigmoid", "tanh"] = "clamp",
        steps_per_batch: int = 1,
        mask_channels: int | None = None,
        noise_std: float = 0.0,
        reference_source: ReferenceSource = "predicted",
        max_reference_images: int = 64,
        min_margin: float = DEFAULT_MIN_MARGIN,
        warp_epochs: int = 0,
        warp_grid: int = 4,
        warp_lr: float = 0.01,
        warp_displacement_weight: float = 0.1,
        seed: int = 0,
        image_scale: int = 4,
        dirname: str = "trigger_inversion",
        load_from: str | None = None,
        oracle_trigger: bool = False,
    ) -> None:
        args = dict(locals())
        self.identify_config = IdentifyConfig.from_callback_args(args)
        self.invert_config = InvertConfig.from_callback_args(args)
        self.target = target
        self.image_scale = image_scale
        self.dirname = dirname
        self.load_from = load_from
        self.oracle_trigger = oracle_trigger
        self.outcome: InversionOutcome | None = None
        self.loaded_geometry: dict | None = None

    @property
    def min_margin(self) -> float:
        return self.identify_config.min_margin

    @property
    def seed(self) -> int:
        return self.identify_config.seed

    # --- steps -------------------------------------------------------------------------------------
    def run(self, pl_module: L.LightningModule, loader: Iterable) -> InversionOutcome:
        """Steps 1 and 2 on the clean batches of ``loader`` (re-iterable) with ``pl_module``'s model."""
        model, normalize = pl_module.suspect_model, pl_module.normalize
        class_names = list(pl_module.class_names)
        text = pl_module.class_text_embeds()
        device = text.device
        clean = CleanImages(loader, device)
        num_images, image_shape = clean.size()
        timings: dict[str, float] = {}

        start = time.perf_counter()
        reset_peak_memory(device)
        identification, uap, confidence = None, None, None
        if self.target is not None:
            if self.target not in class_names:
                raise ValueError(f"target {self.target!r} is not in the class vocabulary {class_names}")
            target = class_names.index(self.target)
        else:
            found = identify(
                model, clean, text, normalize, class_names, image_shape[1:], self.identify_config
            )
            target, identification, uap, confidence = (
                found.target,
                found.identification,
                found.uap,
                found.confidence,
            )
            warn_if_unsure(confidence)
        if not 0 <= target < len(class_names):
            raise ValueError(f"identified target {target} is outside the vocabulary of {len(class_names)}")
        timings["identification_s"] = time.perf_counter() - start
        timings.update(peak_memory(device, "identification"))

        inverted = invert(model, loader, target, text, normalize, class_names, self.invert_config)
        timings.update(inverted.timings)
        return InversionOutcome(
            target=target,
            target_name=class_names[target],
            trigger=inverted.trigger,
            identification=identification,
            inverted_asr=inverted.asr,
            num_clean_images=num_images,
            num_reference_images=inverted.num_reference_images,
            uap=uap,
            warp=inverted.warp,
            warp_asr=inverted.warp_asr,
            timings=timings,
            confidence=confidence,
            target_source="given" if self.target is not None else "identified",
        )

    def load(self, pl_module: L.LightningModule, loader: Iterable) -> InversionOutcome:
        """The target and trigger saved by an earlier run in ``load_from`` (steps 1 and 2 skipped);
        the trigger's ASR is measured again on this run's clean images. A saved warp
        (``warp.safetensors``) is loaded too; without one, ``warp_epochs > 0`` fits it now."""
        class_names = list(pl_module.class_names)
        model, normalize, text = pl_module.suspect_model, pl_module.normalize, pl_module.class_text_embeds()
        device = text.device
        clean = CleanImages(loader, device)
        num_images, image_shape = clean.size()
        saved = read_inversion_folder(self.load_from, class_names, image_shape)
        trigger, target, report = saved.trigger.to(device).eval(), saved.target, saved.report
        confidence = self._loaded_confidence(report, saved.report_path)
        warn_if_unsure(confidence, f"loaded from {saved.report_path}")
        uap = None
        if saved.uap_state is not None:
            uap, built = self.identify_config.load_uap(
                saved.uap_state, report.get("config", {}), tuple(image_shape[-2:]), str(saved.folder)
            )
            uap.to(device).eval().requires_grad_(False)
            self.loaded_geometry = built.geometry()
        asr = inverted_trigger_asr(model, clean, trigger, target, text, normalize)
        log.info(
            "trigger loaded from %s: target %s, ASR %.3f on the suspect model",
            saved.folder,
            class_names[target],
            asr,
        )
        warp, warp_asr, timings = saved.warp, None, {}
        if warp is not None:
            warp.to(device)
            warp_asr = inverted_trigger_asr(model, clean, warp, target, text, normalize)
        elif self.invert_config.warp_epochs > 0:
            by_class = class_view(model, text, normalize, self.invert_config)
            non_target = CleanImages(loader, device, exclude=target, **by_class)
            warp, warp_asr = invert_warp_estimate(
                model,
                clean,
                non_target,
                target,
                text,
                normalize,
                tuple(image_shape[-2:]),
                self.invert_config,
                timings,
            )
        return InversionOutcome(
            target=target,
            target_name=class_names[target],
            trigger=trigger,
            identification=None,
            inverted_asr=asr,
            num_clean_images=num_images,
            num_reference_images=int(report.get("num_reference_images", 0)),
            uap=uap,
            warp=warp,
            warp_asr=warp_asr,
            timings=timings,
            confidence=confidence,
            target_source="loaded",
        )

    def _loaded_confidence(self, report: dict, report_path: Path) -> TargetConfidence | None:
        """The saved report's ``target_confidence`` judged against this run's ``min_margin`` (``None``
        when the report has none: a given target, or a report written before it was recorded)."""
        saved = report.get("target_confidence")
        if saved is None:
            return None
        try:
            return TargetConfidence.from_dict(saved, self.min_margin)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{report_path}: target_confidence {saved!r} is not the form TriggerInversion writes "
                f"({error!r})"
            ) from error

    # --- Lightning hooks ----------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if dm is None:
            raise ValueError(
                "TriggerInversion needs a datamodule whose train_dataloader() holds clean images"
            )
        if getattr(dm, "plan", None) is not None:
            raise ValueError(
                f"{type(dm).__name__} poisons its training data: the defender's images must be clean "
                "(set data.poison_rate=0)"
            )
        for name in ("suspect_model", "normalize", "class_names", "class_text_embeds", "receive_inversion"):
            if not hasattr(pl_module, name):
                raise TypeError(
                    f"{type(pl_module).__name__} has no {name!r}: TriggerInversion needs an InverTune module"
                )
        real_trigger = getattr(dm, "image_trigger", None)
        if self.oracle_trigger and real_trigger is None:
            raise ValueError(
                f"oracle_trigger: {type(dm).__name__} has no image trigger to tune against "
                "(set data.attack to the attack under study)"
            )
        if self.load_from is not None:
            self.outcome = self.load(pl_module, dm.train_dataloader())
        else:
            self.outcome = self.run(pl_module, dm.train_dataloader())
        if self.oracle_trigger:
            log.warning(
                "oracle_trigger: activation tuning uses the real %s trigger, not the inverted one "
                "(a diagnostic, not a defense)",
                type(real_trigger).__name__,
            )
            self.outcome.tuning_trigger = real_trigger.to(pl_module.device)
        if trainer.is_global_zero:
            self.save(trainer, pl_module, self.outcome)
        pl_module.receive_inversion(self.outcome)

    # --- artefacts ----------------------------------------------------------------------------------
    def report_config(self) -> dict:
        """The settings written under ``config`` in ``report.json`` (a loaded UAP's own kind and geometry)."""
        geometry = self.loaded_geometry or self.identify_config.geometry()
        return {
            "uap": geometry["uap"],
            "uap_score": self.identify_config.score,
            "uap_geometry": geometry,
            "uap_fit": self.identify_config.fit_kwargs(),
            "inversion": self.invert_config.trigger_kwargs(),
            "reference_source": self.invert_config.reference_source,
            "min_margin": self.min_margin,
            "warp": self.invert_config.warp_kwargs(),
            "oracle_target": self.target,
            "loaded_from": self.load_from,
            "oracle_trigger": self.oracle_trigger,
        }

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule, outcome: InversionOutcome) -> Path:
        """Write PNGs, the trigger tensors and ``report.json``; log images and scalars to the loggers."""
        folder = Path(trainer.default_root_dir) / self.dirname
        if self.load_from is not None and Path(self.load_from).resolve() in (
            folder.resolve(),
            folder.resolve() / "trigger.safetensors",
        ):
            log.info("trigger loaded from this run's own %s: nothing rewritten", folder)
            return folder
        examples = next(iter(CleanImages(trainer.datamodule.train_dataloader(), torch.device("cpu"))))[:8]
        summary = outcome.summary(list(pl_module.class_names))
        summary["config"] = self.report_config()
        images = write_inversion_folder(folder, outcome, examples, summary, self.image_scale)
        scalars = {
            "invert/asr": outcome.inverted_asr,
            "invert/mask_l1": summary["mask_l1"],
            "identify/target_index": int(outcome.target),
        }
        if outcome.identification is not None:
            scalars["identify/margin"] = outcome.identification.margin
        if outcome.confidence is not None:
            scalars["identify/low_confidence"] = int(outcome.confidence.low_confidence)
        if outcome.warp_asr is not None:
            scalars["invert/warp_asr"] = outcome.warp_asr
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=0)
            if hasattr(logger, "log_image"):
                logger.log_image(
                    "invert/trigger",
                    [upscale(images[k], self.image_scale) for k in ("mask", "pattern", "examples")],
                    caption=["mask", "pattern", "clean | triggered"],
                )
        log.info("trigger inversion artefacts written to %s", folder)
        return folder
