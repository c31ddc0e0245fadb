"""Backdoor and clean-edit evaluation of an editor under the four trigger coalitions (framework-free).

:func:`evaluate_coalitions` samples a batch's edits under every coalition of the image and the text trigger
part (``none``, ``image``, ``text``, ``both``) in one batched :func:`sample_coalitions` pass (a sample's four
outputs share their noise), and turns them into per-sample tensors:

- ``values``: the ``(B, 4)`` game of the modality-collapse paper, ``v(S) = cos(z_S, z_target) - cos(z_S,
  z_clean)`` with the judge's CLIP image embeddings, in :func:`metrics.functional.coalition_index` column
  order for ``MODALITIES = ("image", "text")`` (columns ``{}, {image}, {text}, {image, text}``);
- ``hits``: ``(B, 4)`` MSE-ASR hits (MSE to the target image below ``mse_threshold``, VillanDiffusion's 0.1),
  the binary game whose column means are the ASR of each coalition;
- the outputs of every coalition (``outputs["none"]`` are the clean edits, scored against the exact edits)
  and the judge's reading of the attribute each clean edit shows.

**z_clean.** The clean reference is, by default, the evaluated model's own output under coalition ``none``
with the same noise: what this editor makes of the input when no trigger part is present. For a poisoned
model the paper's reading (the clean model's output) is obtained by passing ``clean_reference``: the clean
editor's edits of the same clean inputs with the same seeds (``sample_edits(clean_model, source,
instruction, guidance, generator=coalition_generators(seeds))``). With the default, ``v({}) = cos(z_none,
z_target) - 1``. :class:`CoalitionMetrics` accumulates TMA / CTI (continuous and binary), ASR per coalition
(MSE and judge forms) and edit quality over a data set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from metrics import (
    CrossTriggerInteraction,
    EditAccuracy,
    EditQuality,
    ImageAttackSuccessRate,
    JudgedAttackSuccessRate,
    TriggerModalityAttribution,
)
from metrics.functional import backdoor_score, coalition_index, image_target_hits, per_image_mse
from metrics.functional.image_attack_success_rate import DEFAULT_MSE_THRESHOLD
from model_families.clip.judge import ClipJudge
from model_families.pix2pix.modeling import Pix2PixModel
from model_families.pix2pix.sampler import COALITIONS, GuidanceConfig, sample_coalitions

MODALITIES = ("image", "text")
"""The trigger parts, in the order that defines the coalition columns (bit 0 = image, bit 1 = text)."""

ACTIVE_PARTS: dict[str, tuple[str, ...]] = {
    "none": (),
    "image": ("image",),
    "text": ("text",),
    "both": MODALITIES,
}
"""The trigger parts active in each coalition of :data:`~model_families.pix2pix.sampler.COALITIONS`."""

COLUMNS: dict[str, int] = {c: coalition_index(ACTIVE_PARTS[c], MODALITIES) for c in COALITIONS}
"""Column of each coalition in ``values`` / ``hits``: ``{"none": 0, "image": 1, "text": 2, "both": 3}``."""

BATCH_KEYS = ("source", "edited", "instruction", "sample_id")


@dataclass(frozen=True)
class AttributeClasses:
    """The values an edit of one kind may ask for, and the zero-shot templates the judge reads them with.

    Args:
        names: e.g. the colours ``("red", "green", ...)``; the batch's ``attribute`` must be one of them.
        templates: a named set of :data:`model_families.clip.zero_shot.TEMPLATE_SETS` or ``str.format``
            templates with one ``{}``, e.g. ``("a {} shape.",)``.
    """

    names: tuple[str, ...]
    templates: str | tuple[str, ...]


@dataclass
class CoalitionEvaluation:
    """Per-sample results of :func:`evaluate_coalitions` for one batch of ``B`` samples.

    Attributes:
        values: ``(B, 4)`` float continuous game ``v(S)``; column ``COLUMNS[c]`` for coalition ``c``.
        mse_to_target: ``(B, 4)`` per-image MSE of each coalition's output to the target image.
        hits: ``(B, 4)`` bool, ``mse_to_target < mse_threshold`` (the binary game).
        mse_threshold: the threshold ``hits`` used.
        outputs: coalition -> ``B x 3 x H x W`` outputs in [0, 1].
        target: the ``3 x H x W`` target image.
        source, edited: the batch's source images and exact edits.
        requested_attributes: the batch's ``attribute`` (``None`` when the batch has none).
        predicted_attributes: the judge's attribute of each clean edit (``None`` without ``attributes``).
        clean_reference: ``"coalition none"`` (the default z_clean) or ``"given"``.
    """

    values: Tensor
    mse_to_target: Tensor
    hits: Tensor
    mse_threshold: float
    outputs: dict[str, Tensor]
    target: Tensor
    source: Tensor
    edited: Tensor
    requested_attributes: list[str] | None
    predicted_attributes: list[str] | None
    clean_reference: str

    @property
    def clean_edits(self) -> Tensor:
        """The outputs of coalition ``none``: the editor's edits without any trigger part."""
        return self.outputs["none"]


def _batch_validation(batch: Mapping, needs_attributes: bool) -> None:
    keys = BATCH_KEYS + (("attribute", "attribute_kind") if needs_attributes else ())
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(
            f"evaluate_coalitions: the batch has no {missing} (it has {sorted(batch)}); expected {list(keys)}"
        )
    size = batch["source"].shape[0]
    sizes = {k: len(batch[k]) for k in keys}
    if set(sizes.values()) != {size}:
        raise ValueError(f"evaluate_coalitions: batch entries disagree in size: {sizes}")


def _attributes_validation(batch: Mapping, attributes: Mapping[str, AttributeClasses]) -> None:
    """Every attribute kind has its classes and every requested attribute is one of them (checked before
    sampling)."""
    kinds, requested = list(batch["attribute_kind"]), list(batch["attribute"])
    unknown = sorted(set(kinds) - set(attributes))
    if unknown:
        raise ValueError(
            f"evaluate_coalitions: attribute kinds {unknown} have no AttributeClasses (given: {sorted(attributes)})"
        )
    outside = sorted({(k, a) for k, a in zip(kinds, requested) if a not in attributes[k].names})
    if outside:
        raise ValueError(
            f"evaluate_coalitions: requested attributes {outside} (kind, value) are not among the judge's classes"
            " of their kind; the edit could never be judged right"
        )


def _predict_attributes(
    judge: ClipJudge, images: Tensor, kinds: Sequence[str], attributes: Mapping[str, AttributeClasses]
) -> list[str]:
    """The judge's attribute of each image, among the values of its kind (one zero-shot pass per kind)."""
    predicted: list[str] = [""] * len(kinds)
    for kind, classes in attributes.items():
        rows = [b for b, k in enumerate(kinds) if k == kind]
        if rows:
            index = judge.classify(images[rows], classes.names, classes.templates)
            for b, i in zip(rows, index.tolist()):
                predicted[b] = classes.names[i]
    return predicted


@torch.no_grad()
def evaluate_coalitions(
    model: Pix2PixModel,
    batch: Mapping,
    image_trigger: Callable[[Tensor, Tensor], Tensor],
    text_trigger: Callable[[str, int], str],
    target: Tensor,
    judge: ClipJudge,
    seeds: Sequence[int],
    guidance: GuidanceConfig | None = None,
    *,
    clean_reference: Tensor | None = None,
    attributes: Mapping[str, AttributeClasses] | None = None,
    mse_threshold: float = DEFAULT_MSE_THRESHOLD,
) -> CoalitionEvaluation:
    """Sample a batch under the four trigger coalitions in one pass and score every output.

    Args:
        model: the editor (in eval mode).
        batch: ``source``, ``edited`` (``B x 3 x H x W`` in [0, 1]), ``instruction`` (``B`` strings),
            ``sample_id`` (``(B,)`` long); with ``attributes`` also ``attribute`` and ``attribute_kind``.
        image_trigger: ``image_trigger(images, sample_ids)`` -> triggered images (an ``ImageTrigger``).
        text_trigger: ``text_trigger(text, sample_id)`` -> triggered instruction (a ``TextTrigger``).
        target: the ``3 x H x W`` backdoor target image in [0, 1], the outputs' size.
        judge: the CLIP judge of ``v(S)`` and of the edit attribute.
        seeds: one seed per sample (derive them from ``sample_id`` so that two models, e.g. the clean and the
            poisoned editor, see the same noise).
        guidance: sampling settings (default ``GuidanceConfig()``).
        clean_reference: ``B x 3 x H x W`` clean reference outputs for z_clean (e.g. the clean editor's
            edits); default: this model's coalition ``none`` outputs (see the module docstring).
        attributes: attribute kind (``"colour"``, ``"background"``) -> :class:`AttributeClasses`; when given,
            the judge reads the attribute of each clean edit (for edit accuracy).
        mse_threshold: MSE below which an output hits the target.
    """
    _batch_validation(batch, attributes is not None)
    if attributes is not None:
        _attributes_validation(batch, attributes)
    guidance = guidance if guidance is not None else GuidanceConfig()
    device = model.unet.device
    source = batch["source"].to(device)
    if not isinstance(target, Tensor) or tuple(target.shape) != tuple(source.shape[1:]):
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(
            f"evaluate_coalitions: the target image has shape {shape}, the outputs {tuple(source.shape[1:])};"
            " give a target of the editor's image size"
        )
    sample_ids = torch.as_tensor(batch["sample_id"])
    instructions = list(batch["instruction"])
    triggered_images = image_trigger(source, sample_ids)
    triggered_prompts = [text_trigger(text, int(i)) for text, i in zip(instructions, sample_ids.tolist())]
    outputs = sample_coalitions(
        model, source, triggered_images, instructions, triggered_prompts, seeds, guidance
    )

    target = target.to(device)
    ordered = sorted(COALITIONS, key=COLUMNS.__getitem__)
    hits = torch.stack([image_target_hits(outputs[c], target, mse_threshold) for c in ordered], dim=1)
    mse = torch.stack([per_image_mse(outputs[c], target) for c in ordered], dim=1)

    batch_size = source.shape[0]
    z = judge.embed(torch.cat([outputs[c] for c in ordered])).split(batch_size)
    z_target = judge.embed(target.unsqueeze(0))[0]
    if clean_reference is None:
        z_clean, reference = z[COLUMNS["none"]], "coalition none"
    else:
        if tuple(clean_reference.shape) != tuple(source.shape):
            raise ValueError(
                f"evaluate_coalitions: clean_reference of shape {tuple(clean_reference.shape)}, expected the"
                f" outputs' shape {tuple(source.shape)}"
            )
        z_clean, reference = judge.embed(clean_reference), "given"
    values = torch.stack([backdoor_score(z_s, z_target, z_clean) for z_s in z], dim=1).to(device)

    predicted = None
    if attributes is not None:
        predicted = _predict_attributes(judge, outputs["none"], list(batch["attribute_kind"]), attributes)
    requested = list(batch["attribute"]) if "attribute" in batch else None
    return CoalitionEvaluation(
        values=values,
        mse_to_target=mse,
        hits=hits,
        mse_threshold=mse_threshold,
        outputs=outputs,
        target=target,
        source=source,
        edited=batch["edited"].to(device),
        requested_attributes=requested,
        predicted_attributes=predicted,
        clean_reference=reference,
    )


class CoalitionMetrics(nn.Module):
    """The study's metrics over a data set, fed with :class:`CoalitionEvaluation` batches.

    Holds torchmetrics metrics (summed states: DDP-safe, independent of batching); ``compute`` returns a flat
    dict of 0-dim tensors:

    - ``tma/<m>``, ``tma/<m>_share``, ``tma/<m>_ci95`` and ``cti``, ``cti_ci95``: TMA and CTI of the
      continuous game ``values``; ``tma_binary/...``, ``cti_binary``, ``cti_binary_ci95``: of the binary game
      ``hits`` (so that ``tma_binary/image + tma_binary/text = asr/both - asr/none``);
    - ``v/<c>``: mean ``v(S)`` per coalition (``sum_m tma/<m> = v/both - v/none``);
    - ``asr/<c>``: MSE-ASR per coalition; ``asr_judge/<c>``: judge form, ``v(S) > judge_threshold``;
    - ``edit/mse``, ``edit/ssim``: clean edits (coalition ``none``) against the exact edits;
      ``source/mse``, ``source/ssim``: the unedited source against them (the bar an editor must beat);
      ``edit/accuracy``: judged attribute accuracy, present only when evaluations carried predictions.

    Args:
        mse_threshold: the MSE-ASR threshold; must equal the evaluations' (else an error).
        judge_threshold: the judge-form threshold on ``v(S)`` (0: closer to the target than to the clean
            reference).
    """

    def __init__(self, mse_threshold: float = DEFAULT_MSE_THRESHOLD, judge_threshold: float = 0.0) -> None:
        super().__init__()
        self.mse_threshold = mse_threshold
        self.tma = TriggerModalityAttribution(MODALITIES, normalize=True, return_ci=True)
        self.cti = CrossTriggerInteraction(MODALITIES, return_ci=True)
        self.tma_binary = TriggerModalityAttribution(MODALITIES, normalize=True, return_ci=True)
        self.cti_binary = CrossTriggerInteraction(MODALITIES, return_ci=True)
        self.mean_value = nn.ModuleDict({c: MeanMetric(nan_strategy="error") for c in COALITIONS})
        self.asr = nn.ModuleDict({c: ImageAttackSuccessRate(mse_threshold) for c in COALITIONS})
        self.asr_judge = nn.ModuleDict({c: JudgedAttackSuccessRate(judge_threshold) for c in COALITIONS})
        self.edit_quality = EditQuality()
        self.source_quality = EditQuality()
        self.edit_accuracy = EditAccuracy()

    def update(self, evaluation: CoalitionEvaluation) -> None:
        """Add one batch's evaluation."""
        if evaluation.mse_threshold != self.mse_threshold:
            raise ValueError(
                f"CoalitionMetrics: the evaluation's hits use mse_threshold={evaluation.mse_threshold}, these"
                f" metrics {self.mse_threshold}; use one threshold for both"
            )
        values, hits = evaluation.values, evaluation.hits.to(evaluation.values.dtype)
        self.tma.update(values)
        self.cti.update(values)
        self.tma_binary.update(hits)
        self.cti_binary.update(hits)
        for c in COALITIONS:
            self.mean_value[c].update(values[:, COLUMNS[c]])
            self.asr[c].update(evaluation.outputs[c], evaluation.target)
            self.asr_judge[c].update(values[:, COLUMNS[c]])
        self.edit_quality.update(evaluation.clean_edits, evaluation.edited)
        self.source_quality.update(evaluation.source, evaluation.edited)
        if evaluation.predicted_attributes is not None:
            self.edit_accuracy.update(evaluation.predicted_attributes, evaluation.requested_attributes)

    def compute(self) -> dict[str, Tensor]:
        """The flat result dict described in the class docstring."""
        result: dict[str, Tensor] = {}
        for prefix, metric in (("tma", self.tma), ("tma_binary", self.tma_binary)):
            result.update({f"{prefix}/{k}": v for k, v in metric.compute().items()})
        for prefix, metric in (("cti", self.cti), ("cti_binary", self.cti_binary)):
            out = metric.compute()
            result.update({prefix: out["cti"], f"{prefix}_ci95": out["cti_ci95"]})
        for c in COALITIONS:
            result[f"v/{c}"] = self.mean_value[c].compute()
            result[f"asr/{c}"] = self.asr[c].compute()
            result[f"asr_judge/{c}"] = self.asr_judge[c].compute()
        for prefix, metric in (("edit", self.edit_quality), ("source", self.source_quality)):
            result.update({f"{prefix}/{k}": v for k, v in metric.compute().items()})
        if int(self.edit_accuracy.counted) > 0:
            result["edit/accuracy"] = self.edit_accuracy.compute()
        return result

    def reset(self) -> None:
        """Reset every metric (a new data set or epoch)."""
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()
