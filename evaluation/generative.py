"""One evaluator for every generative VLM family: a family supplies only "generate responses for this batch".

The evaluation sets are those of :class:`datamodules.instruct.InstructDataModule` (``eval_set_names``):

| set | metrics | reported keys |
|---|---|---|
| ``clean`` | VQA accuracy on QA tasks (and per task), caption scores on caption tasks, ASR without trigger | ``ca``, ``ca_<task>``, ``bleu4``, ``rougeL``, ``cider``, ``asr_clean`` |
| ``triggered`` | VQA accuracy and ASR with every trigger part | ``ca_triggered``, ``asr`` |
| ``poisoned_train`` | ASR on the poisoned training samples as trained | ``asr_wt`` |
| ``coalitions`` | the success rule under {}, {I}, {T}, {I,T} -> Shapley attribution and interaction | ``tma_image``, ``tma_text``, ``cti`` |
| ``clean@<s>`` | as ``clean``, on the samples under domain shift ``s`` (:mod:`datamodules.shifts`) | ``ca@<s>``, ``bleu4@<s>``, ``rougeL@<s>``, ``cider@<s>``, ``asr_clean@<s>`` |
| ``triggered@<s>`` | as ``triggered`` under shift ``s``, and ASR-G of ``asr`` (source) against ``asr@<s>`` (target) | ``ca_triggered@<s>``, ``asr@<s>``, ``asr_g@<s>`` |

Tasks named in :data:`CAPTION_TASKS` are captions (BLEU-4 / ROUGE-L / CIDEr-D); every other task is QA (VQA
accuracy). The ASR metrics follow the datamodule's ``asr_spec()`` (the target's success rule). The evaluator
is an ``nn.Module`` so that a LightningModule holding it moves its metric states to the device and syncs
them across processes; :func:`evaluate_generative` runs it without Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metrics import (
    CaptionScores,
    CrossTriggerInteraction,
    GenerativeAttackSuccessRate,
    TriggerModalityAttribution,
    VQAAccuracy,
)
from metrics.functional.attack_success_rate_generalisation import attack_success_rate_generalisation
from metrics.functional.string_rules import get_rule

__all__ = ["CAPTION_TASKS", "GenerativeEvaluator", "evaluate_generative", "is_caption_task"]

CAPTION_TASKS = ("describe", "caption", "conversation")


def is_caption_task(task: str | None) -> bool:
    """Whether a sample's task is scored as a caption (else as a VQA answer)."""
    return task in CAPTION_TASKS


class GenerativeEvaluator(nn.Module):
    """Metrics of generated responses on the evaluation sets (see the module docstring).

    Args:
        asr_spec: keyword arguments of :class:`metrics.GenerativeAttackSuccessRate` (the datamodule's
            ``asr_spec()``); None: no attack, no ASR / TMA / CTI.
        tasks: the evaluation samples' task names (QA tasks get a ``ca_<task>`` accuracy).
        num_samples: generations kept per evaluation set (``samples``, for the sample table).
        shifts: names of the domain shifts whose ``clean@<s>`` / ``triggered@<s>`` sets are scored.
    """

    def __init__(
        self,
        asr_spec: dict | None = None,
        tasks: Sequence[str] = (),
        num_samples: int = 16,
        shifts: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.asr_spec = dict(asr_spec) if asr_spec is not None else None
        self.num_samples = num_samples
        self.caption_eval = any(is_caption_task(t) for t in tasks)
        sets = nn.ModuleDict()
        clean = nn.ModuleDict({"ca": VQAAccuracy(), "caption": CaptionScores()})
        triggered = nn.ModuleDict({"ca": VQAAccuracy()})
        if asr_spec is not None:
            clean["asr"] = GenerativeAttackSuccessRate(**asr_spec)
            triggered["asr"] = GenerativeAttackSuccessRate(**asr_spec)
            sets["poisoned_train"] = nn.ModuleDict({"asr": GenerativeAttackSuccessRate(**asr_spec)})
            sets["coalitions"] = nn.ModuleDict(
                {
                    "tma": TriggerModalityAttribution(["image", "text"]),
                    "cti": CrossTriggerInteraction(["image", "text"]),
                }
            )
        for task in tasks:
            if not is_caption_task(task):
                clean[f"ca_{task}"] = VQAAccuracy()
        sets["clean"], sets["triggered"] = clean, triggered
        self.shifts = tuple(shifts)
        for shift in self.shifts:
            for name, group in (("clean", clean), ("triggered", triggered)):
                sets[f"{name}@{shift}"] = nn.ModuleDict(
                    {key: metric.clone() for key, metric in group.items()}
                )
        self.metric_sets = sets
        self.samples: list[dict] = []
        self._stage, self._epoch = "val", 0

    @classmethod
    def from_datamodule(cls, datamodule: Any, num_samples: int = 16) -> GenerativeEvaluator:
        """From an instruction datamodule's ``asr_spec()`` and ``eval_task_names()`` (either may be absent)."""
        spec = datamodule.asr_spec() if datamodule is not None and hasattr(datamodule, "asr_spec") else None
        tasks = list(datamodule.eval_task_names()) if hasattr(datamodule, "eval_task_names") else []
        shifts = list(datamodule.eval_shift_names()) if hasattr(datamodule, "eval_shift_names") else []
        return cls(spec, tasks, num_samples, shifts)

    # ----------------------------------------------------------------------------------- updates
    def start(self, stage: str, epoch: int = 0) -> None:
        """Begin an evaluation epoch: forget the kept samples (``stage`` / ``epoch`` label new ones)."""
        self._stage, self._epoch = stage, int(epoch)
        self.samples = []

    def update(self, name: str, batch: dict, responses: Sequence[str]) -> None:
        """Score the generated ``responses`` of one batch of evaluation set ``name`` (a batch of the
        instruction collator: ``reference``, ``task``, ``true_class``, ``key``, ``question``)."""
        references, tasks = batch["reference"], batch["task"]
        if isinstance(responses, str) or len(responses) != len(references):
            raise ValueError(
                f"evaluation set {name!r}: the family generated {len(responses)} responses for a batch of "
                f"{len(references)} samples; generate must return one string per row"
            )
        metrics = self.metric_sets
        if name == "coalitions":
            self._update_coalitions(responses, batch)
        elif name == "poisoned_train":
            if "poisoned_train" in metrics:
                metrics["poisoned_train"]["asr"].update(responses, self._true_classes(batch))
        else:
            if name not in metrics:
                raise KeyError(
                    f"unknown evaluation set {name!r}; expected clean, triggered, poisoned_train, coalitions or "
                    f"clean@<shift> / triggered@<shift> for the shifts {list(self.shifts)}"
                )
            group = metrics[name]
            qa = [i for i, t in enumerate(tasks) if not is_caption_task(t)]
            caps = [i for i, t in enumerate(tasks) if is_caption_task(t)]
            if qa:
                group["ca"].update([responses[i] for i in qa], [references[i] for i in qa])
            if name.split("@")[0] == "clean":
                for i in qa:
                    if f"ca_{tasks[i]}" in group:
                        group[f"ca_{tasks[i]}"].update([responses[i]], [references[i]])
                if caps:
                    group["caption"].update([responses[i] for i in caps], [references[i] for i in caps])
            if "asr" in group:
                group["asr"].update(responses, self._true_classes(batch))
        self._keep_samples(name, batch, responses)

    def _true_classes(self, batch: dict) -> list[str] | None:
        if self.asr_spec is None or self.asr_spec.get("rule") != "misclassification":
            return None
        return [c or "" for c in batch["true_class"]]

    def _update_coalitions(self, responses: Sequence[str], batch: dict) -> None:
        spec = self.asr_spec
        if spec is None:
            return
        rule = get_rule(spec["rule"])
        hits = [
            float(
                rule(r, target=spec.get("target"), true_class=c, refusal_phrases=spec.get("refusal_phrases"))
            )
            for r, c in zip(responses, batch["true_class"])
        ]
        group = self.metric_sets["coalitions"]
        values = torch.tensor(hits, device=group["tma"].device).view(-1, 4)  # rows: {}, {I}, {T}, {I,T}
        group["tma"].update(values)
        group["cti"].update(values)

    def _keep_samples(self, name: str, batch: dict, responses: Sequence[str]) -> None:
        kept = sum(1 for s in self.samples if s["set"] == name)
        for i in range(min(len(responses), self.num_samples - kept)):
            self.samples.append(
                {
                    "stage": self._stage,
                    "epoch": self._epoch,
                    "set": name,
                    "key": batch["key"][i],
                    "question": batch["question"][i],
                    "reference": batch["reference"][i],
                    "response": responses[i],
                }
            )

    # ----------------------------------------------------------------------------------- results
    def compute(self, names: Sequence[str]) -> dict[str, Tensor]:
        """The reported values of the evaluation sets ``names`` (see the module docstring); a value may be
        NaN (nothing counted), the caller decides not to report it."""
        values: dict[str, Tensor] = {}
        sets = self.metric_sets
        if "clean" in names:
            clean = sets["clean"]
            values["ca"] = clean["ca"].compute()
            for key in sorted(k for k in clean if k.startswith("ca_")):
                values[key] = clean[key].compute()
            if self.caption_eval:
                for key, value in clean["caption"].compute().items():
                    values[key] = value
            if "asr" in clean:
                values["asr_clean"] = clean["asr"].compute()
        if "triggered" in names:
            values["ca_triggered"] = sets["triggered"]["ca"].compute()
            if "asr" in sets["triggered"]:
                values["asr"] = sets["triggered"]["asr"].compute()
        for shift in self.shifts:
            values.update(self._compute_shift(shift, names, values))
        if "poisoned_train" in names and "poisoned_train" in sets:
            values["asr_wt"] = sets["poisoned_train"]["asr"].compute()
        if "coalitions" in names and "coalitions" in sets:
            tma = sets["coalitions"]["tma"].compute()
            values["tma_image"], values["tma_text"] = tma["image"], tma["text"]
            values["cti"] = sets["coalitions"]["cti"].compute()
        return values

    def _compute_shift(
        self, shift: str, names: Sequence[str], source: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """The values of the sets under ``shift`` (suffixed ``@<shift>``) and ASR-G against the source ASR."""
        values: dict[str, Tensor] = {}
        clean, triggered = self.metric_sets[f"clean@{shift}"], self.metric_sets[f"triggered@{shift}"]
        if f"clean@{shift}" in names:
            values[f"ca@{shift}"] = clean["ca"].compute()
            if self.caption_eval:
                values.update({f"{k}@{shift}": v for k, v in clean["caption"].compute().items()})
            if "asr" in clean:
                values[f"asr_clean@{shift}"] = clean["asr"].compute()
        if f"triggered@{shift}" in names:
            values[f"ca_triggered@{shift}"] = triggered["ca"].compute()
            if "asr" in triggered:
                asr_tgt = values[f"asr@{shift}"] = triggered["asr"].compute()
                asr_src = source.get("asr")
                if asr_src is not None and not bool(asr_src.isnan() | asr_tgt.isnan()):
                    values[f"asr_g@{shift}"] = attack_success_rate_generalisation(
                        asr_src.cpu(), asr_tgt.cpu()
                    ).to(asr_tgt.device)
        return values

    def reset(self) -> None:
        """Reset every metric (the kept samples stay until the next :meth:`start`)."""
        for group in self.metric_sets.values():
            for metric in group.values():
                metric.reset()


def evaluate_generative(
    generate: Callable[[dict, int], Sequence[str]],
    loaders: Mapping[str, Iterable[dict]],
    evaluator: GenerativeEvaluator,
    prepare: Callable[[dict], dict] | None = None,
) -> dict[str, float]:
    """Run ``generate(batch, batch_index) -> responses`` over each evaluation set ``{name: batches}`` and
    return the evaluator's values as floats (NaN values included: the caller decides what to show).

    ``prepare`` moves a batch to the device and applies the image trigger (the datamodule's
    ``on_after_batch_transfer``)."""
    evaluator.reset()
    evaluator.start("test")
    for name, loader in loaders.items():
        for batch_index, batch in enumerate(loader):
            if prepare is not None:
                batch = prepare(batch)
            evaluator.update(name, batch, list(generate(batch, batch_index)))
    values = {key: float(value) for key, value in evaluator.compute(list(loaders)).items()}
    evaluator.reset()
    return values
