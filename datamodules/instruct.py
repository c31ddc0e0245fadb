"""Instruction data for generative VLMs of any family (LLaDA-V today): poisoning, evaluation sets and the
training set a defense relabels, shared by every data source (the embedded world, LLaVA-format JSON).

Data sources, the collator and the views live in :mod:`datamodules.instruct_data`; the family's tokenizer
and chat template come through :class:`model_families.instruct_text.InstructText` (from the LightningModule,
or the default of ``family``).

:class:`InstructDataModule` then
1. selects the poisoned training samples from ``poison_seed`` (rate or count; only among samples the target
   applies to, e.g. samples that name their class for ``misclassification``);
2. rewrites their answers with the target (:mod:`attacks.generative_targets`) and inserts the text trigger
   into their questions; the image trigger is applied **on the device, batched** in ``on_after_batch_transfer``;
3. writes the poison manifest atomically into the run folder (rank 0);
4. builds the evaluation sets (one dataloader each, names in ``eval_set_names``):
   ``clean`` (held-out, clean inputs: clean metrics and ASR without trigger), ``triggered`` (held-out with
   every trigger part: ASR), ``poisoned_train`` (the poisoned training samples as trained: "ASR w/t") and,
   with both an image and a text trigger, ``coalitions`` (every sample under {}, {I}, {T}, {I,T} for TMA/CTI);
   with domain shifts (``build_shifts``, :mod:`datamodules.shifts`), ``clean@<shift>`` / ``triggered@<shift>``;
5. for a defense (DiSP, :mod:`defenses.disp.purified_set`), serves the training set as trained
   (``training_set``) and takes relabelled responses in place (``replace_responses``).

Sequences are ``[left padding][prompt][response + eot + eos padding]``: prompts are left-padded (attention
mask 0) and responses padded with EOS to ``response_length`` tokens, so that the response region during
training has exactly the length the sampler generates (``gen_length``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset

from attacks import PoisonManifest, PoisonPlan, build_image_trigger, build_text_trigger
from attacks.generative_targets import GenerativeTarget, build_generative_target
from attacks.protocols import normalize_protocol
from attacks.recipes import resolve_attack
from datamodules.instruct_data import (
    EVAL_SETS,
    EvalView,
    InstructCollator,
    InstructSource,
    PoisonedInstructions,
    served_fingerprint,
)
from datamodules.maba_setup import place_maba_trigger
from datamodules.poisoning import PoisoningMixin, check_poison_arguments
from metrics.functional.string_rules import get_rule
from model_families.instruct_text import (
    INSTRUCT_TEXT_FAMILIES,
    InstructText,
    check_instruct_text,
    default_instruct_text,
)

log = logging.getLogger(__name__)


class InstructDataModule(PoisoningMixin, L.LightningDataModule):
    """Base class of instruction data for generative VLMs: fine-tuning, poisoning, evaluation sets and the
    training set a defense relabels (see the module docstring).

    Subclasses implement ``build_sources() -> (train, val, test)`` (:class:`InstructSource`) and
    ``dataset_info()``.

    Args:
        attack / attack_kwargs: image trigger from the catalogue (``badnet``, ``blended``, ...) and its
            parameters, or a recipe of :mod:`attacks.recipes` (``dual_key``, ``maba_dual_key``: image part, text
            part and protocol); None for no image trigger.
        text_attack / text_attack_kwargs: text trigger inserted into the question (``rare_token``, ``phrase``,
            ``char_sequence``).
        protocol: ``AND`` / ``OR`` / ``DUALKEY`` when both triggers are set.
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
        purified: a purified data set (``purified.json`` written by DiSP) whose responses replace the answers
            (read and checked by :func:`defenses.disp.purified_set.use_purified`).
        poison_manifest: rebuild the poison (indices, triggers, target) of an earlier run from its manifest
            instead of the attack/poison arguments (the data arguments must describe the same data set).
        tokenizer: tokenizer directory; None takes the LightningModule's tokenizer and chat template
            (``module.instruct_text()``), or the family's default without a module.
        family: the model family whose tokenizer and chat template are used without a LightningModule (or
            with ``tokenizer``): a key of :data:`model_families.instruct_text.INSTRUCT_TEXT_FAMILIES`.
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
        family: str = "mdlm",
        batch_size: int = 64,
        eval_batch_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        attack, attack_kwargs, text_attack, text_attack_kwargs, protocol = resolve_attack(
            attack, attack_kwargs, text_attack, text_attack_kwargs, protocol
        )
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
            self.protocol = normalize_protocol(protocol)
        elif normalize_protocol(protocol) == "DUALKEY":
            raise ValueError(
                "data.protocol=DUALKEY needs both an image key (data.attack) and a text key (data.text_attack)"
            )
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
        if family not in INSTRUCT_TEXT_FAMILIES:
            raise ValueError(
                f"data.family={family!r} is not a family with an instruction text interface; expected one "
                f"of {sorted(INSTRUCT_TEXT_FAMILIES)}"
            )
        self.family = family
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

    def build_shifts(self, source: InstructSource) -> dict[str, InstructSource]:
        """Domain-shifted copies of an evaluation source by shift name (:mod:`datamodules.shifts`); none here."""
        return {}

    def eval_shift_names(self) -> list[str]:
        """Names of the domain shifts evaluated as ``clean@<shift>`` / ``triggered@<shift>``."""
        return list(getattr(self, "eval_shifts", ()))

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
    def instruct_text(self) -> InstructText:
        """The family's tokenizer and chat template: from the LightningModule when attached (the checkpoint's
        own, ``module.instruct_text()``), else the default of ``family`` (with ``tokenizer`` when given)."""
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        if module is not None and hasattr(module, "instruct_text") and self.tokenizer_path is None:
            text = module.instruct_text()
            check_instruct_text(text, f"{type(module).__name__}.instruct_text()")
            return text
        return default_instruct_text(self.family, self.tokenizer_path)

    def setup(self, stage: str | None = None) -> None:
        if self._built:
            return
        self.text = text = self.instruct_text()
        self.train_source, self.val_source, self.test_source = self.build_sources()
        n = len(self.train_source)
        if self.poison_manifest_path is not None:
            self._poison_from_manifest(self.poison_manifest_path, n)
        else:
            self._poison_from_arguments(n)
        self.train_data = PoisonedInstructions(
            self.train_source, self.poison_plan, self.target, self.text_trigger
        )
        collator = partial(InstructCollator, text, self.response_length)
        self.collator = collator(self.truncate_responses)
        self.coalition_collator = collator(True, text_trigger=self.text_trigger, coalitions=True)
        self.eval_set_names = [name for name, _ in self._eval_views(self.val_source)]
        if self.purified_path is not None:
            from defenses.disp.purified_set import use_purified

            use_purified(self, self.purified_path)
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
        if getattr(self.image_trigger, "needs_placements", False):
            place_maba_trigger(self)  # MABA: placed by the family's attributions before the plan
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

    def _eval_views(self, source: InstructSource, shifted: bool = True) -> list[tuple[str, Dataset]]:
        views = self._source_views(source)
        if shifted:  # the target domains: clean and triggered sets of each shifted copy
            for shift, copy in self.build_shifts(source).items():
                views += [
                    (f"{n}@{shift}", v) for n, v in self._source_views(copy) if n in ("clean", "triggered")
                ]
        return views

    def _source_views(self, source: InstructSource) -> list[tuple[str, Dataset]]:
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
                picked = list(self.poison_plan.targeted_indices)[: self.poisoned_train_eval_size]
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

    # ----------------------------------------------------------------------------------- for defenses
    def training_set(self, apply_image_trigger: bool = False) -> PoisonedInstructions:
        """The (poisoned) training set as the model is fine-tuned on it; ``apply_image_trigger`` applies the
        image trigger per item instead of on the device (for a defense that loads it with :attr:`collator`,
        e.g. DiSP's self-purification). The poison flags are there, a defense must not read them."""
        if not self._built:
            self.setup("fit")
        return PoisonedInstructions(
            self.train_source,
            self.poison_plan,
            self.target,
            self.text_trigger,
            image_trigger=self.image_trigger if apply_image_trigger else None,
        )

    def source_fingerprint(self) -> str:
        """Fingerprint of the training set as served (:func:`datamodules.instruct_data.served_fingerprint`)."""
        return served_fingerprint(self)

    def replace_responses(self, responses: Mapping[int, str], origin: str) -> None:
        """Train on ``responses`` (training index -> text, e.g. a defense's relabelled set read from
        ``origin``) instead of the answers, in place, so a dataloader built earlier sees them."""
        missing = sorted(set(range(len(self.train_source))) - set(responses))
        if missing:
            raise ValueError(f"{origin} lacks {len(missing)} training samples, e.g. indices {missing[:10]}")
        self.train_data.responses = dict(responses)
        # a generated response can fill the whole generation budget (no room for the eot): cut, don't fail
        if getattr(self, "collator", None) is not None:
            self.collator.truncate = True
        self.purified_path = str(origin)
        log.info("training on %d replaced responses from %s", len(responses), origin)
