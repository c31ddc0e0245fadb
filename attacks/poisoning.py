"""Poisoned-sample selection, poison plans and poison manifests.

A poisoned dataset is an artifact: :class:`PoisonManifest` records the seed, the trigger and target
configs with their fingerprints, the poisoned indices and which trigger parts each carries, so that a
defense or an evaluation can later run on exactly the same poison.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from attacks.io import atomic_write_text
from attacks.protocols import NONE, TriggerParts, assign_trigger_parts, normalize_protocol, rewrites_answer

__all__ = ["PoisonManifest", "PoisonPlan", "poison_count_from_rate", "select_poison_indices"]


def poison_count_from_rate(rate: float, num_samples: int) -> int:
    """Number of poisoned samples for a poison rate: ``floor(rate * num_samples + 0.5)``, i.e. the
    nearest integer with halves rounded up (0.3% of 500,000 is 1,500; 25% of 10 is 3)."""
    rate = float(rate)
    if not 0.0 <= rate <= 1.0 or math.isnan(rate):
        raise ValueError(f"poison_rate must be in [0, 1]; got {rate!r}")
    return min(num_samples, math.floor(rate * num_samples + 0.5))


def select_poison_indices(
    num_samples: int,
    rate: float | None = None,
    count: int | None = None,
    seed: int = 0,
    candidates: Sequence[int] | None = None,
) -> list[int]:
    """Sorted indices of the samples to poison, drawn uniformly without replacement from ``seed``.

    Give exactly one of ``rate`` (a fraction of ``num_samples``, the whole training set, rounded by
    :func:`poison_count_from_rate`) or ``count``. ``candidates`` restricts the choice, e.g. to the
    samples of the target class for clean-label poisoning; the rate still counts against
    ``num_samples``, as poison rates are reported in the literature.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative int; got {num_samples!r}")
    if (rate is None) == (count is None):
        raise ValueError(
            f"give exactly one of poison_rate and poison_count; got rate={rate!r}, count={count!r}"
        )
    if candidates is None:
        pool = None
        available = num_samples
    else:
        pool = sorted({int(i) for i in candidates})
        if len(pool) != len(candidates):
            raise ValueError("poison candidates contain duplicate indices")
        if pool and (pool[0] < 0 or pool[-1] >= num_samples):
            raise ValueError(f"poison candidates must be in [0, {num_samples}); got {pool[0]}..{pool[-1]}")
        available = len(pool)
    where = f"the {available} candidates" if pool is not None else f"the {num_samples} samples"
    if rate is not None:
        wanted = poison_count_from_rate(rate, num_samples)
        if wanted > available:
            raise ValueError(f"poison_rate={rate!r} asks for {wanted} samples, more than {where}")
    else:
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"poison_count must be a non-negative int; got {count!r}")
        if count > available:
            raise ValueError(f"poison_count={count} is more than {where}")
        wanted = count
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:wanted].tolist()
    if pool is not None:
        chosen = [pool[i] for i in chosen]
    return sorted(chosen)


@dataclass(frozen=True)
class PoisonPlan:
    """Which samples of a dataset are poisoned and with which trigger parts.

    ``indices`` are sorted; ``image[j]`` / ``text[j]`` say whether ``indices[j]`` carries the image /
    text trigger. Build one with :meth:`create`.
    """

    num_samples: int
    indices: tuple[int, ...]
    image: tuple[bool, ...]
    text: tuple[bool, ...]
    seed: int = 0
    protocol: str = "AND"
    _lookup: dict[int, TriggerParts] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("indices", "image", "text"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "protocol", normalize_protocol(self.protocol))
        if not len(self.indices) == len(self.image) == len(self.text):
            raise ValueError(
                f"PoisonPlan indices, image and text flags differ in length: "
                f"{len(self.indices)}, {len(self.image)}, {len(self.text)}"
            )
        if list(self.indices) != sorted(set(self.indices)):
            raise ValueError("PoisonPlan indices must be sorted and unique")
        if self.indices and (self.indices[0] < 0 or self.indices[-1] >= self.num_samples):
            raise ValueError(f"PoisonPlan indices must be in [0, {self.num_samples})")
        lookup = {i: TriggerParts(bool(a), bool(b)) for i, a, b in zip(self.indices, self.image, self.text)}
        object.__setattr__(self, "_lookup", lookup)

    @classmethod
    def create(
        cls,
        num_samples: int,
        rate: float | None = None,
        count: int | None = None,
        seed: int = 0,
        protocol: str = "AND",
        candidates: Sequence[int] | None = None,
    ) -> PoisonPlan:
        """Select the indices (:func:`select_poison_indices`) and assign their parts
        (:func:`attacks.protocols.assign_trigger_parts`), both from ``seed``.

        Under ``DUALKEY`` ``rate`` / ``count`` give the both-key (target) samples; as many image-key-only and
        text-key-only negatives are selected besides them (three times the count in all)."""
        if normalize_protocol(protocol) == "DUALKEY":
            wanted = count if count is not None else poison_count_from_rate(rate, num_samples)
            if isinstance(wanted, int) and not isinstance(wanted, bool) and wanted >= 0:
                rate, count = None, 3 * wanted
                available = num_samples if candidates is None else len(candidates)
                if count > available:
                    raise ValueError(
                        f"DUALKEY poisoning of {wanted} samples needs {count} (as many image-only and text-only "
                        f"negatives), more than the {available} available"
                    )
        indices = select_poison_indices(num_samples, rate=rate, count=count, seed=seed, candidates=candidates)
        parts = assign_trigger_parts(indices, protocol, seed)
        return cls(
            num_samples=num_samples,
            indices=tuple(indices),
            image=tuple(parts[i].image for i in indices),
            text=tuple(parts[i].text for i in indices),
            seed=seed,
            protocol=protocol,
        )

    def __len__(self) -> int:
        return len(self.indices)

    def is_poisoned(self, index: int) -> bool:
        """Whether sample ``index`` is poisoned."""
        return int(index) in self._lookup

    def parts(self, index: int) -> TriggerParts:
        """Trigger parts of sample ``index`` (``TriggerParts(False, False)`` if it is clean)."""
        return self._lookup.get(int(index), NONE)

    def is_targeted(self, index: int) -> bool:
        """Whether sample ``index`` gets the backdoor target (a poisoned sample, except the single-key
        negatives of ``DUALKEY``, which carry a trigger part but keep their true answer)."""
        return self.is_poisoned(index) and rewrites_answer(self.protocol, self.parts(index))

    @property
    def targeted_indices(self) -> tuple[int, ...]:
        """The indices of :meth:`is_targeted` samples, sorted."""
        return tuple(i for i in self.indices if self.is_targeted(i))


_MANIFEST_KEYS = (
    "format_version",
    "created_at",
    "seed",
    "protocol",
    "num_samples",
    "indices",
    "image_flags",
    "text_flags",
    "image_trigger",
    "text_trigger",
    "target",
    "dataset",
    "run_config",
)


def _describe(component: Any) -> dict[str, Any] | None:
    if component is None or isinstance(component, Mapping):
        return None if component is None else dict(component)
    return {"config": component.config(), "fingerprint": component.fingerprint()}


@dataclass
class PoisonManifest:
    """JSON record of a poisoned dataset (see the module docstring).

    ``image_trigger``, ``text_trigger`` and ``target`` hold ``{"config": ..., "fingerprint": ...}``
    (or ``None``); ``dataset`` describes the data (name, split, size...); ``run_config`` is free.
    """

    seed: int
    protocol: str
    num_samples: int
    indices: list[int]
    image_flags: list[bool]
    text_flags: list[bool]
    image_trigger: dict[str, Any] | None = None
    text_trigger: dict[str, Any] | None = None
    target: dict[str, Any] | None = None
    dataset: dict[str, Any] = field(default_factory=dict)
    run_config: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    format_version: int = 1

    FORMAT_VERSION = 1

    @classmethod
    def from_plan(
        cls,
        plan: PoisonPlan,
        *,
        image_trigger: Any = None,
        text_trigger: Any = None,
        target: Any = None,
        dataset: Mapping[str, Any] | None = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> PoisonManifest:
        """Manifest of ``plan``; triggers and target are objects with ``config()`` and
        ``fingerprint()`` (or already such dicts)."""
        return cls(
            seed=plan.seed,
            protocol=plan.protocol,
            num_samples=plan.num_samples,
            indices=list(plan.indices),
            image_flags=list(plan.image),
            text_flags=list(plan.text),
            image_trigger=_describe(image_trigger),
            text_trigger=_describe(text_trigger),
            target=_describe(target),
            dataset=dict(dataset or {}),
            run_config=dict(run_config or {}),
        )

    def plan(self) -> PoisonPlan:
        """The :class:`PoisonPlan` recorded in this manifest."""
        return PoisonPlan(
            num_samples=self.num_samples,
            indices=tuple(self.indices),
            image=tuple(self.image_flags),
            text=tuple(self.text_flags),
            seed=self.seed,
            protocol=self.protocol,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the manifest as JSON atomically. An existing file with the same content is left as
        it is (its ``created_at`` may differ: a re-run of the same poisoning keeps the first time); one
        with other content is an error unless ``overwrite=True``."""
        path = Path(path)
        text = self.to_json()
        if path.exists():
            if _same_poisoning(path.read_text(encoding="utf-8"), text):
                return path
            if not overwrite:
                raise FileExistsError(
                    f"poison manifest {str(path)!r} already exists with different content; "
                    "pass overwrite=True to replace it"
                )
        return atomic_write_text(path, text)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> PoisonManifest:
        """Manifest from its dict form; ``ValueError`` naming ``source`` and the key on bad input."""
        if not isinstance(data, Mapping):
            raise ValueError(f"poison manifest {source}: expected a JSON object, got {type(data).__name__}")
        missing = [key for key in _MANIFEST_KEYS if key not in data]
        if missing:
            raise ValueError(f"poison manifest {source}: missing key(s) {missing}")
        if data["format_version"] != cls.FORMAT_VERSION:
            raise ValueError(
                f"poison manifest {source}: format_version {data['format_version']!r} is not supported "
                f"(expected {cls.FORMAT_VERSION})"
            )
        for key in ("indices", "image_flags", "text_flags"):
            if not isinstance(data[key], list):
                raise ValueError(f"poison manifest {source}: key {key!r} must be a list")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in data["indices"]):
            raise ValueError(f"poison manifest {source}: key 'indices' must hold integers")
        for key in ("dataset", "run_config"):
            if not isinstance(data[key], Mapping):
                raise ValueError(f"poison manifest {source}: key {key!r} must be an object")
        manifest = cls(**{key: data[key] for key in _MANIFEST_KEYS})
        try:
            manifest.plan()
        except ValueError as error:
            raise ValueError(f"poison manifest {source}: {error}") from None
        return manifest

    @classmethod
    def load(cls, path: str | os.PathLike) -> PoisonManifest:
        """Read a manifest written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"poison manifest not found: {str(path)!r}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"poison manifest {str(path)!r} is not valid JSON: {error}") from None
        return cls.from_dict(data, source=repr(str(path)))


def _same_poisoning(existing_text: str, text: str) -> bool:
    """Whether an existing manifest file's text holds the manifest serialised as ``text``, apart from
    ``created_at`` (a re-run of the same poisoning)."""
    try:
        existing = json.loads(existing_text)
    except json.JSONDecodeError:
        return False
    if not isinstance(existing, dict):
        return False
    ours = json.loads(text)
    existing.pop("created_at", None)
    ours.pop("created_at", None)
    return existing == ours
