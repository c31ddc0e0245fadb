"""What InverTune's steps 1 and 2 found (:class:`InversionOutcome`) and its ``trigger_inversion/`` folder.

The folder holds the mask, pattern and example PNGs, ``trigger.safetensors`` (``mask``, ``pattern``),
``uap.safetensors`` and ``warp.safetensors`` when there are a UAP and a warp, and ``report.json``
(:meth:`InversionOutcome.summary` plus the settings). :func:`write_inversion_folder` writes it
atomically; :func:`read_inversion_folder` reads it back without unpickling anything (safetensors, JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn
from torchvision.utils import make_grid

from attacks.io import atomic_save_image, atomic_write_bytes, atomic_write_json
from defenses.invertune.target_confidence import TargetConfidence
from defenses.invertune.target_identification import TargetIdentification
from defenses.invertune.trigger_inversion import InvertedTrigger
from defenses.invertune.warp_inversion import InvertedWarp

TargetSource = Literal["identified", "given", "loaded"]


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
            out["score"] = ident.score
            if ident.breadth is not None:
                out["breadth"] = {class_names[i]: float(ident.breadth[i]) for i in ident.ranking}
            if ident.members is not None:
                out["uap_members"] = {
                    member: {class_names[i]: float(rise[i]) for i in ident.ranking}
                    for member, rise in ident.members.items()
                }
                out["uap_source"] = ident.source
        if self.trigger.history:
            out["inversion_final"] = self.trigger.history[-1]
        if self.warp is not None:
            out["warp"] = {
                "asr": self.warp_asr,
                "grid": int(self.warp.control.shape[-1]),
                "displacement_px": float(self.warp.displacement_px()),
            }
        return out


def upscale(image: Tensor, scale: int) -> Tensor:
    """Nearest-neighbour upscaling by ``scale`` (small images stay visible in a PNG)."""
    if scale <= 1:
        return image
    return F.interpolate(image[None], scale_factor=scale, mode="nearest")[0]


def write_inversion_folder(
    folder: Path, outcome: InversionOutcome, examples: Tensor, summary: dict, image_scale: int
) -> dict[str, Tensor]:
    """Write the PNGs (``examples``: clean images, shown beside their triggered copies), the trigger,
    UAP and warp tensors and ``report.json`` (``summary``) into ``folder``; returns the images by name."""
    folder.mkdir(parents=True, exist_ok=True)
    trigger = outcome.trigger
    device = trigger.mask.device
    mask, pattern = trigger.mask.detach().cpu(), trigger.pattern.detach().cpu()
    images = {"mask": mask, "pattern": pattern, "masked_pattern": mask * pattern}
    images["examples"] = make_grid(
        torch.cat([examples, trigger.cpu()(examples)]), nrow=examples.shape[0], padding=1
    )
    for name, image in images.items():
        atomic_save_image(upscale(image, image_scale), folder / f"{name}.png")
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
            upscale(make_grid(torch.cat([examples, warped]), nrow=examples.shape[0], padding=1), image_scale),
            folder / "warp_examples.png",
        )
        outcome.warp.to(device)
    trigger.to(device)
    atomic_write_json(folder / "report.json", summary)
    return images


@dataclass
class SavedInversion:
    """A ``trigger_inversion`` folder read back: its report, the target and the tensors."""

    folder: Path
    report: dict
    target: int
    trigger: InvertedTrigger
    uap_state: dict[str, Tensor] | None
    warp: InvertedWarp | None

    @property
    def report_path(self) -> Path:
        return self.folder / "report.json"


def read_inversion_folder(
    load_from: str | Path, class_names: list[str], image_shape: tuple[int, ...]
) -> SavedInversion:
    """The target and trigger (and UAP state and warp, when saved) of a ``trigger_inversion`` folder
    (or of the folder of its ``trigger.safetensors``) for images of ``image_shape``; a missing file, a
    target outside ``class_names`` or a trigger of another size is an error naming the file."""
    folder = Path(load_from)
    if folder.is_file():
        folder = folder.parent
    tensors_path, report_path = folder / "trigger.safetensors", folder / "report.json"
    for path in (tensors_path, report_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"load_from={str(load_from)!r}: {path} does not exist (expected a trigger_inversion "
                "folder written by TriggerInversion)"
            )
    report = json.loads(report_path.read_text())
    target_name = report.get("target")
    if target_name not in class_names:
        raise ValueError(
            f"{report_path}: target {target_name!r} is not in the class vocabulary {class_names}"
        )
    tensors = load_file(str(tensors_path))
    mask, pattern = tensors["mask"], tensors["pattern"]
    if tuple(pattern.shape) != tuple(image_shape) or mask.shape[1:] != pattern.shape[1:]:
        raise ValueError(
            f"{tensors_path}: trigger of shape mask {tuple(mask.shape)} / pattern {tuple(pattern.shape)} "
            f"does not fit this run's images {tuple(image_shape)}"
        )
    trigger = InvertedTrigger(tuple(pattern.shape), mask_channels=mask.shape[0])
    with torch.no_grad():
        trigger.mask_param.copy_(mask)
        trigger.pattern_param.copy_(pattern)
    uap_path, warp_path = folder / "uap.safetensors", folder / "warp.safetensors"
    uap_state = load_file(str(uap_path)) if uap_path.is_file() else None
    warp = None
    if warp_path.is_file():
        control = load_file(str(warp_path))["control"]
        warp = InvertedWarp(tuple(image_shape[-2:]), grid=control.shape[-1])
        with torch.no_grad():
            warp.control.copy_(control)
        warp.eval().requires_grad_(False)
    return SavedInversion(folder, report, class_names.index(target_name), trigger, uap_state, warp)
