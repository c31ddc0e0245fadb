"""InverTune as three plain functions: :func:`identify` (step 1), :func:`invert` (step 2) and
:func:`tune` / :func:`begin_tuning` (step 3), each with a small argument dataclass.

No Lightning here: the callback (``callbacks.trigger_inversion``) and the module
(``lightning_modules.invertune``) wrap these functions, and the benchmark (``bench/bench_defenses.py``)
calls them directly. The dataclasses are filled from the shipped config keys
(:meth:`IdentifyConfig.from_callback_args`, :meth:`InvertConfig.from_callback_args`,
:meth:`TuneConfig.from_config`), so one config drives all three callers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from defenses.invertune.clean_images import CleanImages, ReferenceSource, reference_images
from defenses.invertune.location_free import AnywherePatchUAP, UnionUAP, identify_union
from defenses.invertune.target_confidence import (
    DEFAULT_MIN_MARGIN,
    TargetConfidence,
    check_min_margin,
    target_confidence,
)
from defenses.invertune.target_identification import (
    SCORES,
    CornerPatchUAP,
    LinfUAP,
    TargetIdentification,
    UniversalPerturbation,
    identify_target,
)
from defenses.invertune.trigger_inversion import InvertedTrigger, invert_trigger, inverted_trigger_asr
from defenses.invertune.tuning_setup import TuneConfig, begin_tuning, draw_tuning_batch, tune
from defenses.invertune.warp_inversion import InvertedWarp, invert_warp
from defenses.invertune.zero_shot import Normalize

log = logging.getLogger(__name__)

__all__ = [
    "Identified",
    "IdentifyConfig",
    "InvertConfig",
    "Inverted",
    "TuneConfig",
    "begin_tuning",
    "class_view",
    "draw_tuning_batch",
    "identify",
    "invert",
    "invert_warp_estimate",
    "peak_memory",
    "reset_peak_memory",
    "tune",
]

UAPKind = Literal["patch", "anywhere", "linf", "union"]
UAP_KINDS = get_args(UAPKind)
UNION_MEMBERS = ("anywhere", "linf")
"""The members of ``uap: union``: the patch at random positions and the L-inf perturbation."""


def reset_peak_memory(device: torch.device) -> None:
    """Start a stage's peak-memory count (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device, stage: str) -> dict[str, float]:
    """``{<stage>_peak_mib: ...}`` on CUDA, ``{}`` elsewhere."""
    if device.type != "cuda":
        return {}
    return {f"{stage}_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20}


# --------------------------------------------------------------------------------------------------
# Step 1: identification
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdentifyConfig:
    """Step 1's universal perturbation and the margin below which a target is low confidence."""

    uap: UAPKind = "patch"
    epochs: int = 5
    lr: float | None = None
    temperature: float = 0.1
    text_weight: float = 5.0
    area_fraction: float = 0.03
    margin: int | None = None
    eps: float = 8 / 255
    score: Literal["rise", "breadth"] = "rise"
    min_margin: float = DEFAULT_MIN_MARGIN
    seed: int = 0

    def __post_init__(self) -> None:
        if self.uap not in UAP_KINDS:
            raise ValueError(f"uap must be one of {UAP_KINDS}, got {self.uap!r}")
        if self.score not in SCORES:
            raise ValueError(f"uap_score must be one of {SCORES}, got {self.score!r}")
        object.__setattr__(self, "min_margin", check_min_margin(self.min_margin))

    @classmethod
    def from_callback_args(cls, args: Mapping) -> IdentifyConfig:
        """From ``TriggerInversion`` keys (``uap``, ``uap_epochs``, ..., ``min_margin``, ``seed``)."""
        names = {f.name: f"uap_{f.name}" for f in dataclasses.fields(cls)}
        names.update(uap="uap", min_margin="min_margin", seed="seed")
        return cls(**{name: args[key] for name, key in names.items() if key in args})

    def geometry(self) -> dict:
        """What :meth:`build_uap` needs besides the image size (``uap_geometry`` in the report), so that a
        saved UAP is rebuilt as it was fitted."""
        return {
            "uap": self.uap,
            "area_fraction": self.area_fraction,
            "margin": self.margin,
            "eps": self.eps,
            "seed": self.seed,
        }

    def load_uap(
        self, state: Mapping[str, Tensor], saved_config: Mapping, image_size: tuple[int, int], where: str
    ) -> tuple[nn.Module, IdentifyConfig]:
        """A saved run's UAP (``uap.safetensors`` in ``where``), rebuilt with the kind, geometry and seed it
        was fitted with (its report's ``config.uap_geometry``; an older report without it: its
        ``config.uap`` and this config's geometry). A state that does not fit is a ``ValueError``."""
        geometry = saved_config.get("uap_geometry") or {"uap": saved_config.get("uap", self.uap)}
        known = {k: geometry[k] for k in self.geometry() if k in geometry}
        built = dataclasses.replace(self, **known)
        uap = built.build_uap(image_size)
        try:
            uap.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(
                f"{where}/uap.safetensors does not fit a {built.uap!r} UAP with {built.geometry()} (from the "
                f"report's config.uap_geometry, or this run's uap_* keys for an older report): {error}"
            ) from None
        return uap, built

    def fit_kwargs(self) -> dict:
        """The UAP optimisation settings (``UniversalPerturbation.fit``; ``uap_fit`` in the report)."""
        return {
            "epochs": self.epochs,
            "lr": self.lr,
            "temperature": self.temperature,
            "text_weight": self.text_weight,
        }

    def build_uap(self, image_size: tuple[int, int], kind: UAPKind | None = None) -> UniversalPerturbation:
        """A fresh UAP of ``kind`` (default: ``uap``) with this geometry."""
        kind = kind or self.uap
        if kind == "patch":
            return CornerPatchUAP(
                image_size, area_fraction=self.area_fraction, margin=self.margin, seed=self.seed
            )
        if kind == "anywhere":
            return AnywherePatchUAP(image_size, area_fraction=self.area_fraction, seed=self.seed)
        if kind == "linf":
            return LinfUAP(image_size, eps=self.eps, seed=self.seed)
        if kind == "union":
            return UnionUAP({name: self.build_uap(image_size, name) for name in UNION_MEMBERS})
        raise ValueError(f"uap must be one of {UAP_KINDS}, got {kind!r}")


@dataclass
class Identified:
    """What step 1 found: the target, every class's rise, the fitted UAP and how sure it is."""

    target: int
    identification: TargetIdentification
    uap: nn.Module
    confidence: TargetConfidence


def identify(
    model: nn.Module,
    clean: Iterable[Tensor],
    class_text_embeds: Tensor,
    normalize: Normalize,
    class_names: list[str],
    image_size: tuple[int, int],
    config: IdentifyConfig,
) -> Identified:
    """Fit the UAP on the clean images and rank the classes by ``config.score`` under it (their rise in
    top-1 frequency, or its breadth over source classes: :func:`defenses.invertune.identify_target`); the
    margin is judged against ``config.min_margin``."""
    uap = config.build_uap(image_size)
    uap.fit(model, clean, class_text_embeds, normalize, seed=config.seed, **config.fit_kwargs())
    uap.eval().requires_grad_(False)
    if isinstance(uap, UnionUAP):
        identification = identify_union(model, clean, class_text_embeds, uap, normalize, score=config.score)
    else:
        identification = identify_target(model, clean, class_text_embeds, uap, normalize, score=config.score)
    target = identification.target
    log.info(
        "target identification: %s (margin %.3f), ranking %s",
        class_names[target],
        identification.margin,
        [class_names[i] for i in identification.ranking],
    )
    confidence = target_confidence(
        identification.ranked_by,
        identification.ranking,
        class_names,
        config.min_margin,
        statistic=identification.score,
    )
    return Identified(target, identification, uap, confidence)


# --------------------------------------------------------------------------------------------------
# Step 2: inversion
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InvertConfig:
    """Step 2: the mask/pattern inversion, its reference images and the optional warp estimate."""

    epochs: int = 10
    lr: float = 0.01
    temperature: float = 0.07
    align_weight: float = 5.0
    embedding_weight: float = 0.5
    similarity_weight: float = 1.0
    mask_weight: float = 0.01
    reference_mode: Literal["pairwise", "mean", "first"] = "pairwise"
    parameterization: Literal["clamp", "sigmoid", "tanh"] = "clamp"
    steps_per_batch: int = 1
    mask_channels: int | None = None
    noise_std: float = 0.0
    reference_source: ReferenceSource = "predicted"
    max_reference_images: int = 64
    warp_epochs: int = 0
    warp_grid: int = 4
    warp_lr: float = 0.01
    warp_displacement_weight: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.reference_source not in ("predicted", "label"):
            raise ValueError(
                f"reference_source must be 'predicted' or 'label', got {self.reference_source!r}"
            )
        if self.max_reference_images < 1:
            raise ValueError(f"max_reference_images must be >= 1, got {self.max_reference_images}")
        if self.warp_epochs < 0:
            raise ValueError(f"warp_epochs must be >= 0 (0: no warp estimate), got {self.warp_epochs}")
        if self.warp_grid < 2:
            raise ValueError(f"warp_grid must be >= 2 (control points per side), got {self.warp_grid}")
        if self.warp_lr <= 0:
            raise ValueError(f"warp_lr must be > 0, got {self.warp_lr}")
        if self.warp_displacement_weight < 0:
            raise ValueError(f"warp_displacement_weight must be >= 0, got {self.warp_displacement_weight}")

    @classmethod
    def from_callback_args(cls, args: Mapping) -> InvertConfig:
        """From ``TriggerInversion`` keys of the same names."""
        return cls(**{f.name: args[f.name] for f in dataclasses.fields(cls) if f.name in args})

    def trigger_kwargs(self) -> dict:
        """The :func:`defenses.invertune.invert_trigger` settings (``inversion`` in the report)."""
        keys = ("epochs", "lr", "temperature", "align_weight", "embedding_weight", "similarity_weight")
        keys += ("mask_weight", "reference_mode", "parameterization", "steps_per_batch", "mask_channels")
        return {key: getattr(self, key) for key in (*keys, "noise_std")}

    def warp_kwargs(self) -> dict:
        """The :func:`~defenses.invertune.warp_inversion.invert_warp` settings (``warp`` in the report)."""
        return {
            "epochs": self.warp_epochs,
            "grid": self.warp_grid,
            "lr": self.warp_lr,
            "displacement_weight": self.warp_displacement_weight,
        }


@dataclass
class Inverted:
    """What step 2 found: the trigger, its ASR on the suspect, and the optional warp estimate."""

    trigger: InvertedTrigger
    asr: float
    """ASR of the trigger on the suspect over the clean images (those not predicted as the target)."""
    num_reference_images: int
    warp: InvertedWarp | None = None
    warp_asr: float | None = None
    timings: dict[str, float] = field(default_factory=dict)


def class_view(
    model: nn.Module, class_text_embeds: Tensor, normalize: Normalize, config: InvertConfig
) -> dict:
    """How a :class:`CleanImages` tells the clean images' classes (``config.reference_source``)."""
    return {
        "model": model,
        "text": class_text_embeds,
        "normalize": normalize,
        "source": config.reference_source,
    }


def invert_warp_estimate(
    model: nn.Module,
    clean: Iterable[Tensor],
    non_target: Iterable[Tensor],
    target: int,
    class_text_embeds: Tensor,
    normalize: Normalize,
    image_hw: tuple[int, int],
    config: InvertConfig,
    timings: dict[str, float],
) -> tuple[InvertedWarp, float]:
    """The warp trigger estimate on the non-target images, and its ASR on all clean images."""
    start = time.perf_counter()
    warp = invert_warp(
        model,
        non_target,
        target,
        class_text_embeds,
        normalize,
        image_hw,
        seed=config.seed,
        **config.warp_kwargs(),
    )
    timings["warp_s"] = time.perf_counter() - start
    asr = inverted_trigger_asr(model, clean, warp, target, class_text_embeds, normalize)
    log.info(
        "inverted warp: ASR %.3f on the suspect model, mean displacement %.2f px",
        asr,
        float(warp.displacement_px()),
    )
    return warp, asr


def invert(
    model: nn.Module,
    loader: Iterable,
    target: int,
    class_text_embeds: Tensor,
    normalize: Normalize,
    class_names: list[str],
    config: InvertConfig,
) -> Inverted:
    """Invert a mask/pattern trigger for ``target`` on the clean non-target images of ``loader``
    (re-iterable), with up to ``max_reference_images`` target-class references, and measure its ASR
    (and fit the warp estimate when ``warp_epochs > 0``)."""
    device = class_text_embeds.device
    clean = CleanImages(loader, device)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    reset_peak_memory(device)
    by_class = class_view(model, class_text_embeds, normalize, config)
    references = reference_images(
        CleanImages(loader, device, **by_class), target, config.max_reference_images
    )
    if references.shape[0] == 0:
        num_images, _ = clean.size()
        raise ValueError(
            f"no clean image of the target class {class_names[target]!r} among the {num_images} "
            f"defender images ({config.reference_source} classes): L_emb needs reference images"
        )
    non_target = CleanImages(loader, device, exclude=target, **by_class)
    trigger = invert_trigger(
        model,
        non_target,
        target,
        class_text_embeds,
        references,
        normalize,
        seed=config.seed,
        **config.trigger_kwargs(),
    )
    trigger.eval()
    timings["inversion_s"] = time.perf_counter() - start
    timings.update(peak_memory(device, "inversion"))
    asr = inverted_trigger_asr(model, clean, trigger, target, class_text_embeds, normalize)
    log.info("inverted trigger: ASR %.3f on the suspect model, mask L1 %.1f", asr, trigger.mask.sum())
    inverted = Inverted(trigger, asr, int(references.shape[0]), timings=timings)
    if config.warp_epochs > 0:
        image_hw = tuple(references.shape[-2:])
        inverted.warp, inverted.warp_asr = invert_warp_estimate(
            model, clean, non_target, target, class_text_embeds, normalize, image_hw, config, timings
        )
    return inverted
