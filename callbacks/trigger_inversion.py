"""InverTune steps 1 and 2 as a Lightning callback: identify the target class, invert its trigger.

At ``on_fit_start`` (before any tuning step) the callback reads the defender's clean images from the
datamodule's ``train_dataloader()``, and on the suspect model

1. fits a universal adversarial perturbation (the 3%-area corner patch, or an L-inf UAP) and ranks the
   classes by ``P_adv(y) - P_clean(y)`` (:func:`defenses.invertune.identify_target`); the top class is
   the suspected target (or ``target`` when given: the oracle-target ablation); a margin to the
   runner-up below ``min_margin`` is a warning (:mod:`defenses.invertune.target_confidence`);
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

import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn
from torchvision.utils import make_grid

from attacks.io import atomic_save_image, atomic_write_bytes, atomic_write_json
from defenses.invertune import (
    DEFAULT_MIN_MARGIN,
    CornerPatchUAP,
    InvertedTrigger,
    LinfUAP,
    TargetConfidence,
    TargetIdentification,
    identify_target,
    invert_trigger,
    inverted_trigger_asr,
    target_confidence,
)
from defenses.invertune.target_confidence import check_min_margin
from defenses.invertune.warp_inversion import InvertedWarp, invert_warp
from defenses.invertune.zero_shot import _batch_images, zero_shot_predict

log = logging.getLogger(__name__)

UAPKind = Literal["patch", "linf"]
ReferenceSource = Literal["predicted", "label"]
TargetSource = Literal["identified", "given", "loaded"]

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


@dataclass
class InversionOutcome:
    """What steps 1 and 2 found (handed to the module, written to ``report.json``)."""

    target: int
    target_name: str
    trigger: InvertedTrigger
    identification: TargetIdentification | None
    """``None`` when the target was given (oracle ablation)."""
    inverted_asr: float
    """ASR of the inverted trigger on the suspect model, over the defender's clean images whose clean
    prediction is not the target."""
    num_clean_images: int
    num_reference_images: int
    uap: nn.Module | None = None
    """The fitted universal perturbation of step 1 (``None`` with a given target); activation tuning
    may use it as a second trigger estimate (``model.tune_with_uap``)."""
    warp: InvertedWarp | None = None
    """A fitted warp trigger estimate (``warp_epochs > 0``; ``model.tune_with_warp``), else ``None``."""
    warp_asr: float | None = None
    """ASR of the warp on the suspect model (as ``inverted_asr``)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage (``identification``, ``inversion``) and peak CUDA memory when on a GPU."""
    tuning_trigger: nn.Module | None = None
    """The trigger that activation tuning uses instead of ``trigger``: the attack's *real* trigger with
    ``TriggerInversion.oracle_trigger`` (a diagnostic); ``None`` (a defense): the inverted ``trigger``."""
    confidence: TargetConfidence | None = None
    """The margin between the target and the runner-up against ``min_margin``; ``None`` with a given
    target or one loaded from a report without it."""
    target_source: TargetSource = "identified"
    """``identified`` (step 1), ``given`` (``TriggerInversion.target``) or ``loaded`` (``load_from``)."""

    def summary(self, class_names: list[str]) -> dict:
        """JSON-ready summary (target by name and index, ranking by class name, margin and its
        ``target_confidence``, histograms, trigger statistics)."""
        out: dict = {
            "target": self.target_name,
            "target_index": int(self.target),
            "target_source": self.target_source,
            "target_confidence": None if self.confidence is None else self.confidence.as_dict(),
            "inverted_asr": self.inverted_asr,
            "num_clean_images": self.num_clean_images,
            "num_reference_images": self.num_reference_images,
            "mask_l1": float(self.trigger.mask.detach().abs().sum()),
            "mask_mean": float(self.trigger.mask.detach().mean()),
            "timings": self.timings,
            "oracle_trigger": self.tuning_trigger is not None,
        }
        ident = self.identification
        if ident is not None:
            out.update(
                ranking=[class_names[i] for i in ident.ranking],
                margin=ident.margin,
                increase={class_names[i]: float(ident.increase[i]) for i in ident.ranking},
                p_clean={name: float(ident.p_clean[i]) for i, name in enumerate(class_names)},
                p_adv={name: float(ident.p_adv[i]) for i, name in enumerate(class_names)},
            )
        if self.trigger.history:
            out["inversion_final"] = self.trigger.history[-1]
        if self.warp is not None:
            out["warp"] = {
                "asr": self.warp_asr,
                "grid": int(self.warp.control.shape[-1]),
                "displacement_px": float(self.warp.displacement_px()),
            }
        return out


class _CleanImages:
    """Re-iterable view of a loader's image batches, optionally without the (suspected) target class."""

    def __init__(
        self,
        loader: Iterable,
        device: torch.device,
        *,
        exclude: int | None = None,
        source: ReferenceSource = "predicted",
        model: nn.Module | None = None,
        text: Tensor | None = None,
        normalize=None,
    ) -> None:
        self.loader, self.device, self.exclude, self.source = loader, device, exclude, source
        self.model, self.text, self.normalize = model, text, normalize

    def classes(self, batch, images: Tensor) -> Tensor:
        if self.source == "label":
            if not isinstance(batch, dict) or "label" not in batch:
                raise ValueError("reference_source='label' needs batches with a 'label' key")
            return batch["label"].to(self.device)
        return zero_shot_predict(self.model, images, self.text, self.normalize)

    def __iter__(self) -> Iterator[Tensor]:
        for batch in self.loader:
            images = _batch_images(batch, "clean images").to(self.device)
            if self.exclude is not None:
                images = images[self.classes(batch, images) != self.exclude]
            if images.shape[0]:
                yield images

    def size(self) -> tuple[int, tuple[int, ...]]:
        """(number of images, shape ``C x H x W`` of one image); an empty set is a ``ValueError``."""
        num_images, image_shape = 0, None
        for images in self:
            num_images += images.shape[0]
            image_shape = tuple(images.shape[1:])
        if num_images == 0 or image_shape is None:
            raise ValueError("the defender's clean image set is empty: InverTune needs clean images")
        return num_images, image_shape


class TriggerInversion(L.Callback):
    """InverTune target identification and trigger inversion before tuning (see the module docstring).

    Args:
        target: a class name to use instead of identifying one (oracle-target ablation); it must be in
            the vocabulary.
        uap: ``"patch"`` (AdvCLIP corner patch, ``uap_area_fraction`` of the image) or ``"linf"``
            (additive, ``||delta||_inf <= uap_eps``).
        uap_epochs, uap_lr, uap_temperature, uap_text_weight: the UAP optimisation
            (:meth:`defenses.invertune.UniversalPerturbation.fit`; ``uap_lr`` None: the UAP's default).
        uap_area_fraction, uap_margin: corner-patch geometry (margin None: 14 px scaled from 224).
        uap_eps: L-inf budget.
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
        if uap not in ("patch", "linf"):
            raise ValueError(f"uap must be 'patch' or 'linf', got {uap!r}")
        if reference_source not in ("predicted", "label"):
            raise ValueError(f"reference_source must be 'predicted' or 'label', got {reference_source!r}")
        if max_reference_images < 1:
            raise ValueError(f"max_reference_images must be >= 1, got {max_reference_images}")
        if warp_epochs < 0:
            raise ValueError(f"warp_epochs must be >= 0 (0: no warp estimate), got {warp_epochs}")
        if warp_grid < 2:
            raise ValueError(f"warp_grid must be >= 2 (control points per side), got {warp_grid}")
        if warp_lr <= 0:
            raise ValueError(f"warp_lr must be > 0, got {warp_lr}")
        if warp_displacement_weight < 0:
            raise ValueError(f"warp_displacement_weight must be >= 0, got {warp_displacement_weight}")
        self.warp = {
            "epochs": warp_epochs,
            "grid": warp_grid,
            "lr": warp_lr,
            "displacement_weight": warp_displacement_weight,
        }
        self.target = target
        self.uap_kind = uap
        self.uap_fit = {
            "epochs": uap_epochs,
            "lr": uap_lr,
            "temperature": uap_temperature,
            "text_weight": uap_text_weight,
        }
        self.uap_area_fraction, self.uap_margin, self.uap_eps = uap_area_fraction, uap_margin, uap_eps
        self.inversion = {
            "epochs": epochs,
            "lr": lr,
            "temperature": temperature,
            "align_weight": align_weight,
            "embedding_weight": embedding_weight,
            "similarity_weight": similarity_weight,
            "mask_weight": mask_weight,
            "reference_mode": reference_mode,
            "parameterization": parameterization,
            "steps_per_batch": steps_per_batch,
            "mask_channels": mask_channels,
            "noise_std": noise_std,
        }
        self.reference_source = reference_source
        self.max_reference_images = max_reference_images
        self.min_margin = check_min_margin(min_margin)
        self.seed = seed
        self.image_scale = image_scale
        self.dirname = dirname
        self.load_from = load_from
        self.oracle_trigger = oracle_trigger
        self.outcome: InversionOutcome | None = None

    # --- steps -------------------------------------------------------------------------------------
    def build_uap(self, image_size: tuple[int, int], kind: UAPKind | None = None) -> CornerPatchUAP | LinfUAP:
        """A fresh UAP of ``kind`` (default: this callback's ``uap``) with this callback's geometry."""
        if (kind or self.uap_kind) == "patch":
            return CornerPatchUAP(
                image_size, area_fraction=self.uap_area_fraction, margin=self.uap_margin, seed=self.seed
            )
        return LinfUAP(image_size, eps=self.uap_eps, seed=self.seed)

    def run(self, pl_module: L.LightningModule, loader: Iterable) -> InversionOutcome:
        """Steps 1 and 2 on the clean batches of ``loader`` (re-iterable) with ``pl_module``'s model."""
        model, normalize = pl_module.suspect_model, pl_module.normalize
        class_names = list(pl_module.class_names)
        text = pl_module.class_text_embeds()
        device = text.device
        clean = _CleanImages(loader, device)
        num_images, image_shape = clean.size()
        timings: dict[str, float] = {}

        start = time.perf_counter()
        _reset_peak_memory(device)
        identification, uap, confidence = None, None, None
        if self.target is not None:
            if self.target not in class_names:
                raise ValueError(f"target {self.target!r} is not in the class vocabulary {class_names}")
            target = class_names.index(self.target)
        else:
            uap = self.build_uap(image_shape[1:])
            uap.fit(model, clean, text, normalize, seed=self.seed, **self.uap_fit)
            uap.eval().requires_grad_(False)
            identification = identify_target(model, clean, text, uap, normalize)
            target = identification.target
            log.info(
                "target identification: %s (margin %.3f), ranking %s",
                class_names[target],
                identification.margin,
                [class_names[i] for i in identification.ranking],
            )
            confidence = target_confidence(
                identification.increase, identification.ranking, class_names, self.min_margin
            )
            warn_if_unsure(confidence)
        if not 0 <= target < len(class_names):
            raise ValueError(f"identified target {target} is outside the vocabulary of {len(class_names)}")
        timings["identification_s"] = time.perf_counter() - start
        timings.update(_peak_memory(device, "identification"))

        start = time.perf_counter()
        _reset_peak_memory(device)
        by_class = self._class_view(pl_module)
        references = self.reference_images(clean.loader, device, target, by_class)
        if references.shape[0] == 0:
            raise ValueError(
                f"no clean image of the target class {class_names[target]!r} among the {num_images} "
                f"defender images ({self.reference_source} classes): L_emb needs reference images"
            )
        non_target = _CleanImages(loader, device, exclude=target, **by_class)
        trigger = invert_trigger(
            model, non_target, target, text, references, normalize, seed=self.seed, **self.inversion
        )
        trigger.eval()
        timings["inversion_s"] = time.perf_counter() - start
        timings.update(_peak_memory(device, "inversion"))
        asr = inverted_trigger_asr(model, clean, trigger, target, text, normalize)
        log.info("inverted trigger: ASR %.3f on the suspect model, mask L1 %.1f", asr, trigger.mask.sum())
        warp, warp_asr = None, None
        if self.warp["epochs"] > 0:
            warp, warp_asr = self.fit_warp(
                pl_module, clean, non_target, target, tuple(image_shape[-2:]), timings
            )
        return InversionOutcome(
            target=target,
            target_name=class_names[target],
            trigger=trigger,
            identification=identification,
            inverted_asr=asr,
            num_clean_images=num_images,
            num_reference_images=int(references.shape[0]),
            uap=uap,
            warp=warp,
            warp_asr=warp_asr,
            timings=timings,
            confidence=confidence,
            target_source="given" if self.target is not None else "identified",
        )

    def fit_warp(
        self,
        pl_module: L.LightningModule,
        clean,
        non_target,
        target: int,
        image_hw: tuple[int, int],
        timings: dict[str, float],
    ) -> tuple[InvertedWarp, float]:
        """The warp trigger estimate (``warp_epochs > 0``) for ``image_hw`` images on the non-target
        images, and its ASR on all clean images."""
        model, normalize, text = pl_module.suspect_model, pl_module.normalize, pl_module.class_text_embeds()
        start = time.perf_counter()
        warp = invert_warp(model, non_target, target, text, normalize, image_hw, seed=self.seed, **self.warp)
        timings["warp_s"] = time.perf_counter() - start
        asr = inverted_trigger_asr(model, clean, warp, target, text, normalize)
        log.info(
            "inverted warp: ASR %.3f on the suspect model, mean displacement %.2f px",
            asr,
            float(warp.displacement_px()),
        )
        return warp, asr

    def load(self, pl_module: L.LightningModule, loader: Iterable) -> InversionOutcome:
        """The target and trigger saved by an earlier run in ``load_from`` (steps 1 and 2 skipped);
        the trigger's ASR is measured again on this run's clean images. A saved warp
        (``warp.safetensors``) is loaded too; without one, ``warp_epochs > 0`` fits it now."""
        folder = Path(self.load_from)
        if folder.is_file():
            folder = folder.parent
        tensors_path, report_path = folder / "trigger.safetensors", folder / "report.json"
        for path in (tensors_path, report_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"load_from={self.load_from!r}: {path} does not exist (expected a trigger_inversion "
                    "folder written by TriggerInversion)"
                )
        report = json.loads(report_path.read_text())
        class_names = list(pl_module.class_names)
        target_name = report.get("target")
        if target_name not in class_names:
            raise ValueError(
                f"{report_path}: target {target_name!r} is not in the class vocabulary {class_names}"
            )
        tensors = load_file(str(tensors_path))
        mask, pattern = tensors["mask"], tensors["pattern"]
        text = pl_module.class_text_embeds()
        device = text.device
        clean = _CleanImages(loader, device)
        num_images, image_shape = clean.size()
        if tuple(pattern.shape) != image_shape or mask.shape[1:] != pattern.shape[1:]:
            raise ValueError(
                f"{tensors_path}: trigger of shape mask {tuple(mask.shape)} / pattern {tuple(pattern.shape)} "
                f"does not fit this run's images {image_shape}"
            )
        trigger = InvertedTrigger(tuple(pattern.shape), mask_channels=mask.shape[0])
        with torch.no_grad():
            trigger.mask_param.copy_(mask)
            trigger.pattern_param.copy_(pattern)
        trigger.to(device).eval()
        target = class_names.index(target_name)
        confidence = self._loaded_confidence(report, report_path)
        warn_if_unsure(confidence, f"loaded from {report_path}")
        uap = None
        if (folder / "uap.safetensors").is_file():
            kind = report.get("config", {}).get("uap", self.uap_kind)
            uap = self.build_uap(image_shape[-2:], kind)
            uap.load_state_dict(load_file(str(folder / "uap.safetensors")))
            uap.to(device).eval().requires_grad_(False)
        asr = inverted_trigger_asr(pl_module.suspect_model, clean, trigger, target, text, pl_module.normalize)
        log.info("trigger loaded from %s: target %s, ASR %.3f on the suspect model", folder, target_name, asr)
        warp, warp_asr, timings = None, None, {}
        if (folder / "warp.safetensors").is_file():
            control = load_file(str(folder / "warp.safetensors"))["control"]
            warp = InvertedWarp(image_shape[-2:], grid=control.shape[-1])
            with torch.no_grad():
                warp.control.copy_(control)
            warp.to(device).eval().requires_grad_(False)
            warp_asr = inverted_trigger_asr(
                pl_module.suspect_model, clean, warp, target, text, pl_module.normalize
            )
        elif self.warp["epochs"] > 0:
            non_target = _CleanImages(loader, device, exclude=target, **self._class_view(pl_module))
            warp, warp_asr = self.fit_warp(
                pl_module, clean, non_target, target, tuple(image_shape[-2:]), timings
            )
        return InversionOutcome(
            target=target,
            target_name=target_name,
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

    def _class_view(self, pl_module: L.LightningModule) -> dict:
        """How :class:`_CleanImages` tells the clean images' classes: the suspect's zero-shot predictions
        or the labels (``reference_source``)."""
        return {
            "model": pl_module.suspect_model,
            "text": pl_module.class_text_embeds(),
            "normalize": pl_module.normalize,
            "source": self.reference_source,
        }

    def reference_images(self, loader: Iterable, device: torch.device, target: int, by_class: dict) -> Tensor:
        """Up to ``max_reference_images`` clean images of class ``target`` (predicted or labelled).

        With ``reference_source="predicted"`` and no clean image predicted as ``target``, the images
        with the highest zero-shot score for ``target`` are used instead (logged as a warning)."""
        view = _CleanImages(loader, device, **by_class)
        found: list[Tensor] = []
        count = 0
        best_images, best_scores = None, None
        for batch in loader:
            images = _batch_images(batch, "clean images").to(device)
            found.append(images[view.classes(batch, images) == target])
            count += found[-1].shape[0]
            if count >= self.max_reference_images:
                break
            if self.reference_source == "predicted":
                with torch.no_grad():
                    features = F.normalize(view.model.encode_image(view.normalize(images)), dim=-1)
                    scores = (features @ F.normalize(view.text, dim=-1).T).softmax(dim=-1)[:, target]
                pool = images if best_images is None else torch.cat([best_images, images])
                pool_scores = scores if best_scores is None else torch.cat([best_scores, scores])
                top = pool_scores.topk(min(self.max_reference_images, pool_scores.numel())).indices
                best_images, best_scores = pool[top], pool_scores[top]
        if count == 0 and best_images is not None:
            log.warning(
                "no clean image is predicted as the target class %d; using the %d images with the highest "
                "zero-shot score for it as L_emb references",
                target,
                best_images.shape[0],
            )
            return best_images
        if not found:
            return torch.empty(0, device=device)
        return torch.cat(found)[: self.max_reference_images]

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
    def save(self, trainer: L.Trainer, pl_module: L.LightningModule, outcome: InversionOutcome) -> Path:
        """Write PNGs, the trigger tensors and ``report.json``; log images and scalars to the loggers."""
        folder = Path(trainer.default_root_dir) / self.dirname
        if self.load_from is not None and Path(self.load_from).resolve() in (
            folder.resolve(),
            folder.resolve() / "trigger.safetensors",
        ):
            log.info("trigger loaded from this run's own %s: nothing rewritten", folder)
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        trigger = outcome.trigger
        mask, pattern = trigger.mask.detach().cpu(), trigger.pattern.detach().cpu()
        images = {"mask": mask, "pattern": pattern, "masked_pattern": mask * pattern}
        examples = next(iter(_CleanImages(trainer.datamodule.train_dataloader(), torch.device("cpu"))))[:8]
        images["examples"] = make_grid(
            torch.cat([examples, trigger.cpu()(examples)]), nrow=examples.shape[0], padding=1
        )
        for name, image in images.items():
            atomic_save_image(self._upscale(image), folder / f"{name}.png")
        trigger_state = {"mask": mask.contiguous(), "pattern": pattern.contiguous()}
        atomic_write_bytes(folder / "trigger.safetensors", save_safetensors(trigger_state))
        if outcome.uap is not None:
            uap_state = {k: v.detach().cpu().contiguous() for k, v in outcome.uap.state_dict().items()}
            atomic_write_bytes(folder / "uap.safetensors", save_safetensors(uap_state))
        if outcome.warp is not None:
            warp_state = {"control": outcome.warp.control.detach().cpu().contiguous()}
            atomic_write_bytes(folder / "warp.safetensors", save_safetensors(warp_state))
            warped = outcome.warp.cpu()(examples)
            atomic_save_image(
                self._upscale(make_grid(torch.cat([examples, warped]), nrow=examples.shape[0], padding=1)),
                folder / "warp_examples.png",
            )
            outcome.warp.to(pl_module.device)
        trigger.to(pl_module.device)
        summary = outcome.summary(list(pl_module.class_names))
        summary["config"] = {
            "uap": self.uap_kind,
            "uap_fit": self.uap_fit,
            "inversion": self.inversion,
            "reference_source": self.reference_source,
            "min_margin": self.min_margin,
            "warp": self.warp,
            "oracle_target": self.target,
            "loaded_from": self.load_from,
            "oracle_trigger": self.oracle_trigger,
        }
        atomic_write_json(folder / "report.json", summary)
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
                    [self._upscale(images[k]) for k in ("mask", "pattern", "examples")],
                    caption=["mask", "pattern", "clean | triggered"],
                )
        log.info("trigger inversion artefacts written to %s", folder)
        return folder

    def _upscale(self, image: Tensor) -> Tensor:
        if self.image_scale <= 1:
            return image
        return F.interpolate(image[None], scale_factor=self.image_scale, mode="nearest")[0]


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device, stage: str) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {f"{stage}_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20}
