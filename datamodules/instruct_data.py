"""Instruction data sets of generative VLMs (any family): the source interface, the collator and the
training / evaluation views that :class:`datamodules.instruct.InstructDataModule` serves.

A data source is a map-style :class:`InstructSource`: item ``i`` is one image with one user question and its
reference answer (``{"image", "question", "answer", "task", "true_class", "key", "history"}``) and
``meta(i)`` gives the same fields without rendering or loading the image. The collator formats and tokenises
through the family's :class:`~model_families.instruct_text.InstructText`; nothing here knows a tokenizer's
special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from attacks import PoisonPlan
from attacks.generative_targets import GenerativeTarget
from attacks.hashing import fingerprint
from model_families.instruct_text import InstructText

EVAL_SETS = ("clean", "triggered", "poisoned_train", "coalitions")
COALITIONS = ((False, False), (True, False), (False, True), (True, True))  # (image, text) in bitmask order


class InstructSource(Dataset):
    """Interface of a data source: ``__getitem__`` (with the image) and ``meta`` (text fields only)."""

    def meta(self, index: int) -> dict:
        raise NotImplementedError

    def describe(self) -> dict:
        """Identification of the source for manifests (name, path, split, size...)."""
        return {"source": type(self).__name__, "size": len(self)}


class InstructCollator:
    """Tokenise (history +) question + answer with a family's :class:`InstructText` and build a left-padded
    batch.

    Batch keys: ``input_ids`` / ``attention_mask`` / ``response_mask`` (B, P + R) for training,
    ``prompt_ids`` / ``prompt_mask`` (B, P) for generation, ``response_tokens`` (B,) (answer + eot tokens
    before the EOS padding, for families whose loss skips the padding), ``pixel_values`` (B, C, S, S) in
    [0, 1], ``trigger_image`` (B,) bool (rows that get the image trigger on the device), ``index`` (B,) and
    the lists ``key``, ``question``, ``answer``, ``reference``, ``task``, ``true_class``; plus ``poisoned``
    (B,) when present in the items. With ``coalitions=True`` every item becomes four rows ({}, {I}, {T},
    {I,T}).

    Args:
        text: the family's tokenizer and chat template (:class:`InstructText`).
        response_length: response tokens per sequence (answer + eot + EOS padding); None pads to the longest
            response of the batch.
        truncate_responses: cut longer responses (keeping the eot) instead of raising.
        text_trigger: applied to questions of coalition rows with the text part.
    """

    def __init__(
        self,
        text: InstructText,
        response_length: int | None = 8,
        truncate_responses: bool = False,
        text_trigger: Any = None,
        coalitions: bool = False,
    ) -> None:
        self.text = text
        self.image_token_index, self.eos_id, self.eot_id, self.pad_id = (
            text.image_token_index,
            text.eos_id,
            text.eot_id,
            text.pad_id,
        )
        if response_length is not None and response_length < 2:
            raise ValueError(f"data.response_length must be >= 2 (answer + eot), got {response_length}")
        self.response_length, self.truncate = response_length, truncate_responses
        self.text_trigger, self.coalitions = text_trigger, coalitions
        self._cache: dict[tuple, list[int]] = {}

    def prompt_text(self, question: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """Chat prompt up to the assistant header (the family's template)."""
        return self.text.prompt_text(question, history)

    def _encode(self, text: str) -> list[int]:
        key = ("t", text)
        if key not in self._cache:
            if len(self._cache) > 200_000:
                self._cache.clear()
            self._cache[key] = self.text.encode(text)
        return self._cache[key]

    def encode_prompt(self, question: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        ids = self._encode(self.prompt_text(question, tuple(tuple(h) for h in history)))
        if ids.count(self.image_token_index) != 1:
            raise ValueError(
                f"a prompt must hold exactly one image placeholder, got {ids.count(self.image_token_index)}: "
                f"question {question!r} (remove extra {self.text.image_placeholder} tokens from the conversation)"
            )
        return ids

    def encode_response(self, answer: str, key: str = "?") -> list[int]:
        ids = list(self._encode(self.text.response_text(answer)))
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
        response_tokens = torch.tensor([len(r) for r in responses], dtype=torch.long)
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
            "response_tokens": response_tokens,
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


class PoisonedInstructions(Dataset):
    """Training view of a source: poisoned samples get the target answer and the text trigger; the
    ``trigger_image`` flag asks for the image trigger (applied on the device, or here with ``image_trigger``).

    ``responses`` (index -> text), when set by :meth:`InstructDataModule.replace_responses`, replaces every
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
        item["poisoned"] = parts is not None and self.plan.is_targeted(index)
        item["trigger_image"] = bool(parts is not None and parts.image)
        item["reference"] = item["answer"]
        if parts is not None:
            if item["poisoned"]:  # DUALKEY's single-key negatives keep their true answers
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


def served_fingerprint(datamodule: Any) -> str:
    """Fingerprint of an instruction datamodule's training set as served (source description, size, poison
    plan, triggers, target)."""
    plan, dm = datamodule.poison_plan, datamodule
    return fingerprint(
        {
            "dataset": dm.dataset_info(),
            "size": len(dm.train_source),
            "poison": None
            if plan is None
            else {
                "indices": list(plan.indices),
                "image": list(plan.image),
                "text": list(plan.text),
                # DUALKEY targets only the both-key samples; the key is absent elsewhere (fingerprints unchanged)
                **({"protocol": plan.protocol} if plan.protocol == "DUALKEY" else {}),
            },
            "image_trigger": None if dm.image_trigger is None else dm.image_trigger.config(),
            "text_trigger": None if dm.text_trigger is None else dm.text_trigger.config(),
            "target": None if dm.target is None else dm.target.config(),
        }
    )
