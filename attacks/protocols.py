"""Multimodal poisoning protocols: which trigger parts each poisoned sample carries.

* ``AND``: every poisoned sample carries both the image and the text trigger.
* ``OR``: the poisoned samples are split, by a seeded permutation, into three parts of equal size
  (the first ``n % 3`` parts get one more): image trigger only, text trigger only, both.
* ``DUALKEY`` (Walmer et al., 2022): the selected samples are split, by a seeded permutation, into three
  parts of equal size: both keys (their answers get the target), image key only and text key only (the
  negatives, which keep their true answers, so that neither key alone triggers the backdoor). A plan made
  by rate or count selects three times that many samples: the rate counts the both-key samples.
* ``IMAGE`` / ``TEXT``: single-modality attacks (e.g. a CLIP image trigger with the caption replaced
  by the target), every poisoned sample carries that one part.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from attacks.randomness import derive_seed

__all__ = ["PROTOCOLS", "TriggerParts", "assign_trigger_parts", "normalize_protocol", "rewrites_answer"]

PROTOCOLS = ("AND", "OR", "DUALKEY", "IMAGE", "TEXT")


class TriggerParts(NamedTuple):
    """Which triggers a sample carries."""

    image: bool
    text: bool


NONE = TriggerParts(False, False)


def normalize_protocol(protocol: str) -> str:
    """Upper-cased protocol name; ``ValueError`` naming the value if it is not one of ``PROTOCOLS``."""
    name = str(protocol).upper()
    if name not in PROTOCOLS:
        raise ValueError(f"poisoning protocol {protocol!r} is not one of {PROTOCOLS}")
    return name


def assign_trigger_parts(
    indices: Sequence[int], protocol: str = "AND", seed: int = 0
) -> dict[int, TriggerParts]:
    """Map each poisoned index to the trigger parts it carries under ``protocol``.

    For ``OR`` and ``DUALKEY`` the split depends only on ``seed`` and the set of indices (their order is
    ignored); ``DUALKEY`` puts the first share (one more when the count is not a multiple of 3) on both keys.
    """
    protocol = normalize_protocol(protocol)
    ordered = sorted(int(i) for i in indices)
    if protocol not in ("OR", "DUALKEY"):
        parts = TriggerParts(image=protocol in ("AND", "IMAGE"), text=protocol in ("AND", "TEXT"))
        return dict.fromkeys(ordered, parts)
    count = len(ordered)
    generator = torch.Generator().manual_seed(derive_seed(seed, f"protocol/{protocol}"))
    permutation = torch.randperm(count, generator=generator).tolist()
    base, extra = divmod(count, 3)
    groups = (TriggerParts(True, False), TriggerParts(False, True), TriggerParts(True, True))
    if protocol == "DUALKEY":
        groups = (TriggerParts(True, True), TriggerParts(True, False), TriggerParts(False, True))
    assignment: dict[int, TriggerParts] = {}
    start = 0
    for group, parts in enumerate(groups):
        size = base + (1 if group < extra else 0)
        for position in permutation[start : start + size]:
            assignment[ordered[position]] = parts
        start += size
    return dict(sorted(assignment.items()))


def rewrites_answer(protocol: str, parts: TriggerParts) -> bool:
    """Whether a sample carrying ``parts`` under ``protocol`` gets the backdoor target: always, except the
    single-key negatives of ``DUALKEY``, which keep their true answers."""
    if normalize_protocol(protocol) == "DUALKEY":
        return parts.image and parts.text
    return parts.image or parts.text
