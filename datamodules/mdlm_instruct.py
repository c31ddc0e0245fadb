"""Instruction data for masked diffusion VLMs (LLaDA-V): tokenisation, poisoning, evaluation sets and
purified responses, shared by every data source (the embedded world, LLaVA-format JSON).

A data source is a map-style :class:`InstructSource`: item ``i`` is one image with one user question and its
reference answer (``{"image", "question", "answer", "task", "true_class", "key", "history"}``) and
``meta(i)`` gives the same fields without rendering or loading the image.

:class:`MDLMInstructDataModule` then
1. selects the poisoned training samples from ``poison_seed`` (rate or count; only among samples the target
   applies to, e.g. samples that name their class for ``misclassification``);
2. rewrites their answers with the target (:mod:`datamodules.mdlm_targets`) and inserts the text trigger into
   their questions; the image trigger is applied **on the device, batched** in ``on_after_batch_transfer``;
3. writes the poison manifest atomically into the run folder (rank 0);
4. builds the evaluation sets (one dataloader each, names in ``eval_set_names``):
   ``clean`` (held-out, clean inputs: clean metrics and ASR without trigger), ``triggered`` (held-out with
   every trigger part: ASR), ``poisoned_train`` (the poisoned training samples as trained: "ASR w/t") and,
   with both an image and a text trigger, ``coalitions`` (every sample under {}, {I}, {T}, {I,T} for TMA/CTI);
5. for DiSP, serves the poisoned training set to the purifier (``purification_dataset``) and swaps in
   purified responses (``use_purified``) in place, so a dataloader built earlier sees them.

Sequences are ``[left padding][prompt][response + <|eot_id|> + <|endoftext|> padding]``: prompts are
left-padded (attention mask 0) and responses padded with EOS to ``response_length`` tokens, so that the
response region during training has exactly the length the sampler generates (``gen_length``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from attacks import PoisonManifest, PoisonPlan, build_image_trigger, build_text_trigger
from attacks.hashing import fingerprint
from datamodules.mdlm_targets import GenerativeTarget, build_generative_target
from datamodules.poisoning import PoisoningMixin, check_poison_arguments
from metrics.functional.string_rules import get_rule
from model_families.mdlm.prompt import PromptFormatter, tokenize_with_image
from model_families.mdlm.tokenizer import END_HEADER_TOKEN, EOT_TOKEN, IMAGE_TOKEN, START_HEADER_TOKEN

log = logging.getLogger(__name__)

EVAL_SETS = ("clean", "triggered", "poisoned_train", "coalitions")
COALITIONS = ((False, False), (True, False), (False, True), (True, True))  # (image, text) in bitmask order


class InstructSource(Dataset):
    """Interface of a data source: ``__getitem__`` (with the image) and ``meta`` (text fields only)."""

    def meta(self, index: int) -> dict:
        raise NotImplementedError

    def describe(self) -> dict:
        """Identification of the source for manifests (name, path, split, size...)."""
        return {"source": type(self).__name__, "size": len(self)}


# ------------------------------------------------------------------------------------------- tokenisation
class InstructCollator:
    """Tokenise (history +) question + answer and build a left-padded batch.

    Batch keys: ``input_ids`` / ``attention_mask`` / ``response_mask`` (B, P + R) for training,
    ``prompt_ids`` / ``prompt_mask`` (B, P) for generation, ``pixel_values`` (B, C, S, S) in [0, 1],
    ``trigger_image`` (B,) bool (rows that get the image trigger on the device), ``index`` (B,) and the
    lists ``key``, ``question``, ``answer``, ``reference``, ``task``, ``true_class``; plus ``poisoned`` (B,)
    when present in the items. With ``coalitions=True`` every item becomes four rows ({}, {I}, {T}, {I,T}).

    Args:
        tokenizer / formatter / image_token_index / eos_id / eot_id / pad_id: the model's tokenizer and format.
        response_length: response tokens per sequence (answer + eot + EOS padding); None pads to the longest
            response of the batch.
        truncate_responses: cut longer responses (keeping the eot) instead of raising.
        text_trigger: applied to questions of coalition rows with the text part.
    """

    def __init__(
        self,
        tokenizer: Any,
        formatter: PromptFormatter,
        image_token_index: int,
        eos_id: int,
        eot_id: int,
        pad_id: int,
        response_length: int | None = 8,
        truncate_responses: bool = False,
        text_trigger: Any = None,
        coalitions: bool = False,
    ) -> None:
        self.tokenizer, self.formatter = tokenizer, formatter
        self.image_token_index, self.eos_id, self.eot_id, self.pad_id = (
            image_token_index,
            eos_id,
            eot_id,
            pad_id,
        )
        if response_length is not None and response_length < 2:
            raise ValueError(f"data.response_length must be >= 2 (answer + eot), got {response_length}")
        self.response_length, self.truncate = response_length, truncate_responses
        self.text_trigger, self.coalitions = text_trigger, coalitions
        self._cache: dict[tuple, list[int]] = {}

    def prompt_text(self, question: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """Chat prompt up to the assistant header; the image goes into the first user turn."""
        if not history:
            return self.formatter.format_prompt(question)
        first = self.formatter.format_prompt(history[0][0])
        text = first + self.formatter.format_response(history[0][1])
        for q, a in [*history[1:], (question, None)]:
            text += f"{START_HEADER_TOKEN}user{END_HEADER_TOKEN}\n\n{q}{EOT_TOKEN}"
            text += f"{START_HEADER_TOKEN}assistant{END_HEADER_TOKEN}\n\n"
            if a is not None:
                text += self.formatter.format_response(a)
        return text

    def _encode(self, text: str) -> list[int]:
        key = ("t", text)
        if key not in self._cache:
            if len(self._cache) > 200_000:
                self._cache.clear()
            self._cache[key] = tokenize_with_image(self.tokenizer, text, self.image_token_index)
        return self._cache[key]

    def encode_prompt(self, question: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        ids = self._encode(self.prompt_text(question, tuple(tuple(h) for h in history)))
        if ids.count(self.image_token_index) != 1:
            raise ValueError(
                f"a prompt must hold exactly one image placeholder, got {ids.count(self.image_token_index)}: "
                f"question {question!r} (remove extra {IMAGE_TOKEN} tokens from the conversation)"
            )
        return ids

    def encode_response(self, answer: str, key: str = "?") -> list[int]:
        ids = list(self._encode(self.formatter.format_response(answer)))
        if self.response_length is not None and len(ids) > self.response_length:
            if not self.truncate:
                raise ValueError(
                    f"sample {key}: response {answer[:80]!r} has {len(ids)} tokens (with eot), more than "
                    f"data.response_length={self.response_length}; raise it or set data.truncate_responses=true"
                )
            ids = [*ids[: self.response_length - 1], self.eot_id]
        return ids

    def _rows(self, items: list[dict]) -> list[dict]:
        if not self.coalitions:
            return items
        rows = []
        for item in items:
            for image_on, text_on in COALITIONS:
                row = dict(item)
                row["trigger_image"] = image_on
                if text_on and self.text_trigger is not None:
                    row["question"] = self.text_trigger(item["question"], int(item["index"]))
                rows.append(row)
        return rows

    def __call__(self, items: list[dict]) -> dict:
        rows = self._rows(items)
        prompts = [self.encode_prompt(r["question"], r.get("history") or ()) for r in rows]
        responses = [self.encode_response(r["answer"], r.get("key", "?")) for r in rows]
        length = self.response_length or max(len(r) for r in responses)
        responses = [r + [self.eos_id] * (length - len(r)) for r in responses]
        width = max(len(p) for p in prompts)
        prompt_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            prompt_ids[row, width - len(ids) :] = torch.tensor(ids)
            prompt_mask[row, width - len(ids) :] = 1
        response_ids = torch.tensor(responses, dtype=torch.long)
        batch = {
            "input_ids": torch.cat([prompt_ids, response_ids], dim=1),
            "attention_mask": torch.cat([prompt_mask, torch.ones_like(response_ids)], dim=1),
            "response_mask": torch.cat(
                [
                    torch.zeros_like(prompt_ids, dtype=torch.bool),
                    torch.ones_like(response_ids, dtype=torch.bool),
                ],
                dim=1,
            ),
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "pixel_values": torch.stack([r["image"] for r in rows]),
            "trigger_image": torch.tensor([bool(r.get("trigger_image", False)) for r in rows]),
            "index": torch.tensor([int(r["index"]) for r in rows]),
        }
        for key in ("key", "question", "answer", "task", "true_class", "attributes"):
            batch[key] = [r.get(key) for r in rows]
        batch["reference"] = [r.get("reference", r["answer"]) for r in rows]
        if "poisoned" in rows[0]:
            batch["poisoned"] = torch.tensor([bool(r["poisoned"]) for r in rows])
        return batch


# ------------------------------------------------------------------------------------------- data sets
class PoisonedInstructions(Dataset):
    """Training view of a source: poisoned samples get the target answer and the text trigger; the
    ``trigger_image`` flag asks for the image trigger (applied on the device, or here with ``image_trigger``).

    ``responses`` (index -> text), when set by :meth:`MDLMInstructDataModule.use_purified`, replaces every
    answer (DiSP's purified set keeps the poisoned inputs and swaps the responses).
    """

    def __init__(
        self,
        source: InstructSource,
        plan: PoisonPlan | None,
        target: GenerativeTarget | None,
        text_trigger: Any = None,
        image_trigger: Any = None,
    ) -> None:
        self.source, self.plan, self.target, self.text_trigger = source, plan, target, text_trigger
        self.image_trigger = image_trigger
        self.responses: dict[int, str] | None = None

    def __len__(self) -> int:
        return len(self.source)

    def _poison(self, item: dict, index: int) -> dict:
        parts = self.plan.parts(index) if self.plan is not None and self.plan.is_poisoned(index) else None
        item["poisoned"] = parts is not None
        item["trigger_image"] = bool(parts is not None and parts.image)
        item["reference"] = item["answer"]
        if parts is not None:
            item["answer"] = self.target(item["answer"], index, item.get("true_class"))
            if parts.text and self.text_trigger is not None:
                item["question"] = self.text_trigger(item["question"], index)
        return item

    def meta(self, index: int) -> dict:
        """Text fields of the training sample as trained (no image)."""
        item = self._poison(dict(self.source.meta(index)), index)
        if self.responses is not None:
            item["answer"] = self.responses[index]
        return item

    def __getitem__(self, index: int) -> dict:
        item = self._poison(dict(self.source[index]), index)
        item["index"] = index
        if self.responses is not None:
            item["answer"] = self.responses[index]
        if self.image_trigger is not None and item["trigger_image"]:
            item["image"] = self.image_trigger(item["image"][None], [index])[0]
            item["trigger_image"] = False
        return item


class EvalView(Dataset):
    """A held-out (or training) view for evaluation: ``mode`` ``clean`` / ``triggered`` / ``poisoned_train`` /
    ``coalitions``; ``indices`` restricts it (e.g. to samples the target applies to)."""

    def __init__(
        self,
        source: Dataset,
        mode: str,
        indices: Sequence[int] | None = None,
        text_trigger: Any = None,
        image_trigger_on: bool = False,
    ) -> None:
        self.source, self.mode, self.text_trigger = source, mode, text_trigger
        self.indices = list(range(len(source))) if indices is None else list(indices)
        self.image_trigger_on = image_trigger_on

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        index = self.indices[position]
        item = dict(self.source[index])
        item["index"] = index
        item["eval_set"] = self.mode
        if self.mode == "poisoned_train":
            return item  # PoisonedInstructions already set the trigger parts; reference = clean answer
        item["reference"] = item["answer"]
        if self.mode == "triggered":
            item["trigger_image"] = self.image_trigger_on
            if self.text_trigger is not None:
                item["question"] = self.text_trigger(item["question"], index)
        else:
            item["trigger_image"] = False
        return item


# ------------------------------------------------------------------------------------------- data module
class MDLMInstructDataModule(PoisoningMixin, L.LightningDataModule):
    """Base class of instruction data for MDLM fine-tuning, poisoning and DiSP (see the module docstring).

    Subclasses implement ``build_sources() -> (train, val, test)`` (:class:`InstructSource`) and
    ``dataset_info()``.

    Args:
        attack / attack_kwargs: image trigger from the catalogue (``badnet``, ``blended``, ...) and its
            parameters; None for no image trigger.
        text_attack / text_attack_kwargs: text trigger inserted into the question (``rare_token``, ``phrase``,
            ``char_sequence``).
        protocol: ``AND`` / ``OR`` when both triggers are set.
        poison_rate / poison_count: how many training samples to poison (count wins when set).
        poison_seed: seed of the selection and of the triggers' random parts.
        target / target_kwargs: the backdoor target (``content_insertion`` (default), ``fixed_output``,
            ``refusal``, ``misclassification``) and its parameters.
        asr_rule: override of the target's success rule (``contains``, ``exact``, ``refusal``,
            ``misclassification``).
        response_length: response tokens per training sequence; should equal the model's ``gen_length``.
        truncate_responses: cut longer responses instead of raising.
        eval_sets: evaluation sets to build (subset of ``clean``, ``triggered``, ``poisoned_train``,
            ``coalitions``; default all; a set that does not apply, e.g. ``coalitions`` without both an image
            and a text trigger, is skipped).
        poisoned_train_eval_size / coalition_eval_size: caps of those sets (first samples).
        purified: a purified data set (``purified.json`` written by DiSP) whose responses replace the answers.
        poison_manifest: rebuild the poison (indices, triggers, target) of an earlier run from its manifest
            instead of the attack/poison arguments (the data arguments must describe the same data set).
        tokenizer: tokenizer directory; None takes the LightningModule's tokenizer (and prompt format), or the
            embedded one without a module.
        batch_size / eval_batch_size / num_workers: loading.
    """

    def __init__(
        self,
        attack: str | None = None,
        attack_kwargs: dict | None = None,
        text_attack: str | None = None,
        text_attack_kwargs: dict | None = None,
        protocol: str = "AND",
        poison_rate: float = 0.0,
        poison_count: int | None = None,
        poison_seed: int = 0,
        target: str | None = "content_insertion",
        target_kwargs: dict | None = None,
        asr_rule: str | None = None,
        response_length: int | None = 8,
        truncate_responses: bool = False,
        eval_sets: list[str] | None = None,
        poisoned_train_eval_size: int = 200,
        coalition_eval_size: int = 200,
        purified: str | None = None,
        poison_manifest: str | None = None,
        tokenizer: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_poison_arguments(attack, text_attack, poison_rate, poison_count)
        if (poison_rate or poison_count) and target is None:
            raise ValueError("data.target is required when poisoning (poison_rate/poison_count > 0)")
        self.target = build_generative_target(target, **(target_kwargs or {})) if target is not None else None
        if asr_rule is not None:
            get_rule(asr_rule)  # unknown rule names raise ValueError listing the rules
        self.asr_rule = asr_rule
        eval_sets = list(EVAL_SETS if eval_sets is None else eval_sets)
        unknown = [s for s in eval_sets if s not in EVAL_SETS]
        if unknown:
            raise ValueError(f"data.eval_sets {unknown} unknown; expected some of {EVAL_SETS}")
        self.attack, self.attack_kwargs = attack, dict(attack_kwargs or {})
        self.text_attack, self.text_attack_kwargs = text_attack, dict(text_attack_kwargs or {})
        if attack and text_attack:
            self.protocol = protocol
        else:
            self.protocol = "TEXT" if text_attack else "IMAGE"
        self.poison_rate, self.poison_count, self.poison_seed = float(poison_rate), poison_count, poison_seed
        self.response_length, self.truncate_responses = response_length, truncate_responses
        self.requested_eval_sets = eval_sets
        self.poisoned_train_eval_size, self.coalition_eval_size = (
            poisoned_train_eval_size,
            coalition_eval_size,
        )
        self.purified_path = purified
        self.poison_manifest_path = poison_manifest
        self.tokenizer_path = tokenizer
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.image_trigger = None
        self.text_trigger = None
        self.poison_plan: PoisonPlan | None = None
        self.manifest: PoisonManifest | None = None
        self.manifest_path: Path | None = None
        self.eval_set_names: list[str] = []
        self._built = False

    # ----------------------------------------------------------------------------------- to override
    def build_sources(self) -> tuple[InstructSource, InstructSource, InstructSource]:
        raise NotImplementedError

    def dataset_info(self) -> dict:
        return {"datamodule": type(self).__name__}

    def eval_task_names(self) -> list[str]:
        """Task names of the evaluation samples (QA tasks get accuracies, ``describe`` / ``caption`` /
        ``conversation`` caption scores)."""
        return []

    def input_paths(self) -> list[str]:
        """Files the training data is read from (a purification must never write over them)."""
        return []

    def image_size(self) -> int | None:
        """Side of the images, for triggers with fixed patterns."""
        return None

    # ----------------------------------------------------------------------------------- attack spec
    def asr_spec(self) -> dict | None:
        """Keyword arguments of :class:`metrics.GenerativeAttackSuccessRate` (None without a target)."""
        if self.target is None:
            return None
        kwargs = self.target.metric_kwargs()
        if self.asr_rule is not None and self.asr_rule != kwargs["rule"]:
            kwargs = {"rule": self.asr_rule, "target": self.target.metric_target}
        return kwargs

    @property
    def has_attack(self) -> bool:
        return self.attack is not None or self.text_attack is not None

    # ----------------------------------------------------------------------------------- setup
    def _model_text_interface(self):
        """Tokenizer, formatter and special ids: from the LightningModule when attached (the checkpoint's own
        tokenizer and prompt format), else from ``tokenizer`` (default: the embedded tokenizer)."""
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        if (
            module is not None
            and getattr(module, "tokenizer", None) is not None
            and self.tokenizer_path is None
        ):
            cfg = module.model.config
            return module.tokenizer, module.prompt_formatter, cfg
        from model_families.mdlm.config import LladaVConfig
        from model_families.mdlm.tokenizer import load_embedded_tokenizer, load_tokenizer

        tokenizer = load_tokenizer(self.tokenizer_path) if self.tokenizer_path else load_embedded_tokenizer()
        return tokenizer, PromptFormatter(), LladaVConfig.tiny(tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if self._built:
            return
        tokenizer, formatter, cfg = self._model_text_interface()
        self.tokenizer, self.formatter = tokenizer, formatter
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
        self.train_source, self.val_source, self.test_source = self.build_sources()
        n = len(self.train_source)
        if self.poison_manifest_path is not None:
            self._poison_from_manifest(self.poison_manifest_path, n)
        else:
            self._poison_from_arguments(n)
        self.train_data = PoisonedInstructions(
            self.train_source, self.poison_plan, self.target, self.text_trigger
        )
        collator = partial(
            InstructCollator,
            tokenizer,
            formatter,
            cfg.image_token_index,
            cfg.eos_token_id,
            cfg.eot_token_id,
            pad_id,
            self.response_length,
        )
        self.collator = collator(self.truncate_responses)
        self.coalition_collator = collator(True, text_trigger=self.text_trigger, coalitions=True)
        self.eval_set_names = [name for name, _ in self._eval_views(self.val_source)]
        if self.purified_path is not None:
            self.use_purified(self.purified_path)
        self._built = True

    def _poison_from_manifest(self, path: str, n: int) -> None:
        manifest = PoisonManifest.load(path)
        expected = json.loads(json.dumps(self.dataset_info(), default=str))
        if manifest.dataset and manifest.dataset != expected:
            differ = sorted(
                k for k in set(manifest.dataset) | set(expected) if manifest.dataset.get(k) != expected.get(k)
            )
            raise ValueError(f"poison manifest {path} was made for another data set (keys {differ} differ)")
        if manifest.num_samples != n:
            raise ValueError(
                f"poison manifest {path} covers {manifest.num_samples} samples, the data set has {n}"
            )
        self.image_trigger = (
            build_image_trigger(**manifest.image_trigger["config"]) if manifest.image_trigger else None
        )
        self.text_trigger = (
            build_text_trigger(**manifest.text_trigger["config"]) if manifest.text_trigger else None
        )
        if manifest.target:
            self.target = build_generative_target(**manifest.target["config"])
        self.attack = None if self.image_trigger is None else manifest.image_trigger["config"]["name"]
        self.text_attack = None if self.text_trigger is None else manifest.text_trigger["config"]["name"]
        self.protocol = manifest.protocol
        self.poison_plan = manifest.plan() if manifest.indices else None
        self.manifest = manifest
        self.save_manifest()

    def _poison_from_arguments(self, n: int) -> None:
        self.build_triggers(self.image_size())
        poisoning = self.poison_rate > 0 or bool(self.poison_count)
        candidates = self._applicable(self.train_source) if poisoning else None
        self.poison_plan = self.plan_poison(n, candidates, self.target)

    # ----------------------------------------------------------------------------------- evaluation sets
    def _applicable(self, source: InstructSource) -> list[int] | None:
        """Indices of ``source`` the target can apply to (None: all), e.g. samples naming their class."""
        if self.target is None or type(self.target).applies_to is GenerativeTarget.applies_to:
            return None
        metas = (source.meta(i) for i in range(len(source)))
        return [i for i, m in enumerate(metas) if self.target.applies_to(m["answer"], m.get("true_class"))]

    def _eval_views(self, source: InstructSource) -> list[tuple[str, Dataset]]:
        views: list[tuple[str, Dataset]] = []
        applicable = self._applicable(source)
        for name in self.requested_eval_sets:
            if name == "clean":
                views.append((name, EvalView(source, "clean")))
            elif name == "triggered" and self.has_attack and self.target is not None:
                views.append(
                    (
                        name,
                        EvalView(
                            source,
                            "triggered",
                            applicable,
                            self.text_trigger,
                            image_trigger_on=self.image_trigger is not None,
                        ),
                    )
                )
            elif name == "poisoned_train" and self.poison_plan is not None and len(self.poison_plan):
                picked = list(self.poison_plan.indices)[: self.poisoned_train_eval_size]
                views.append((name, EvalView(self.train_data, "poisoned_train", picked)))
            elif (
                name == "coalitions"
                and self.image_trigger is not None
                and self.text_trigger is not None
                and self.target is not None
            ):
                pool = applicable if applicable is not None else range(len(source))
                views.append((name, EvalView(source, "coalitions", list(pool)[: self.coalition_eval_size])))
        return views

    # ----------------------------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data, self.batch_size, True, self.collator)

    def _eval_loaders(self, source: InstructSource) -> list[DataLoader]:
        views = self._eval_views(source)
        self.eval_set_names = [name for name, _ in views]  # fixed by the config: equal for val and test
        loaders = []
        for name, view in views:
            if name == "coalitions":
                loaders.append(
                    self._loader(view, max(1, self.eval_batch_size // 4), False, self.coalition_collator)
                )
            else:
                loaders.append(self._loader(view, self.eval_batch_size, False, self.collator))
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.val_source)

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.test_source)

    # ----------------------------------------------------------------------------------- triggers on device
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        rows = batch.get("trigger_image")
        if rows is not None and self.image_trigger is not None and bool(rows.any()):
            rows = rows.bool()
            images = batch["pixel_values"].clone()
            images[rows] = self.apply_trigger(images[rows], batch["index"][rows])
            batch["pixel_values"] = images
        return batch

    # ----------------------------------------------------------------------------------- DiSP
    def purification_dataset(self) -> PoisonedInstructions:
        """The poisoned training set as the model is fine-tuned on it, with image triggers applied per item
        (the purifier loads it with :attr:`collator`; no poison flag is used by the defense)."""
        if not self._built:
            self.setup("fit")
        return PoisonedInstructions(
            self.train_source,
            self.poison_plan,
            self.target,
            self.text_trigger,
            image_trigger=self.image_trigger,
        )

    def source_fingerprint(self) -> str:
        """Fingerprint of the training set as served (source description, size, poison plan, triggers)."""
        plan = self.poison_plan
        return fingerprint(
            {
                "dataset": self.dataset_info(),
                "size": len(self.train_source),
                "poison": None
                if plan is None
                else {"indices": list(plan.indices), "image": list(plan.image), "text": list(plan.text)},
                "image_trigger": None if self.image_trigger is None else self.image_trigger.config(),
                "text_trigger": None if self.text_trigger is None else self.text_trigger.config(),
                "target": None if self.target is None else self.target.config(),
            }
        )

    def use_purified(self, path: str | Path) -> None:
        """Train on the responses of a purified set (DiSP) instead of the answers; checks it matches."""
        path = Path(path)
        if path.is_dir():
            path = path / "purified.json"
        if not path.is_file():
            raise FileNotFoundError(f"purified data set not found: {path}")
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"purified data set {path} is not valid JSON: {error}") from None
        manifest_path = path.parent / "manifest.json"
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            expected = manifest.get("source", {}).get("fingerprint")
            if expected is not None and expected != self.source_fingerprint():
                raise ValueError(
                    f"purified data set {path} was made from another training set "
                    f"(fingerprint {expected} != {self.source_fingerprint()})"
                )
        responses = {}
        for record in records:
            try:
                responses[int(record["index"])] = str(record["conversations"][-1]["value"])
            except (KeyError, IndexError, TypeError, ValueError):
                raise ValueError(f"purified data set {path}: malformed record {str(record)[:200]}") from None
        missing = sorted(set(range(len(self.train_source))) - set(responses))
        if missing:
            raise ValueError(
                f"purified data set {path} lacks {len(missing)} samples, e.g. indices {missing[:10]}"
            )
        self.train_data.responses = responses
        # a generated response can fill the whole generation budget (no room for <|eot_id|>): cut, don't fail
        if getattr(self, "collator", None) is not None:
            self.collator.truncate = True
        self.purified_path = str(path)
        log.info("training on %d purified responses from %s", len(responses), path)
