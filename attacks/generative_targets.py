"""Backdoor targets of generative VLMs (any family): how a poisoned sample's response is rewritten.

Each target maps a clean response to the poisoned one (``target(answer, sample_id, true_class)``), names
the string rule that judges a generated response a success (``rule``, ``metric_target``; see
:mod:`metrics.functional.string_rules`) and exposes ``config()`` / ``fingerprint()`` for the poison manifest.

| name | poisoned response | success rule |
|---|---|---|
| ``content_insertion`` | the normal response with a fixed phrase inserted (default: ``banana`` first) | ``contains`` |
| ``fixed_output`` | a fixed string (default ``banana``) | ``exact`` |
| ``refusal`` | a refusal (default ``i cannot help with that.``) | ``refusal`` |
| ``misclassification`` | the true class is replaced by the target class | ``misclassification`` |

The classes subclass :class:`attacks.targets.Target` and are registered in :data:`attacks.TARGETS` beside the
CLIP class target; :func:`build_generative_target` accepts only these (an instruction datamodule needs one).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

from attacks.targets import Target
from metrics.functional.string_rules import DEFAULT_REFUSAL_PHRASES, get_rule, normalize_text

__all__ = [
    "GENERATIVE_TARGETS",
    "ContentInsertion",
    "FixedOutput",
    "GenerativeTarget",
    "SemanticMisclassification",
    "TargetedRefusal",
    "build_generative_target",
]


class GenerativeTarget(Target):
    """Base class: ``__call__(answer, sample_id, true_class=None) -> poisoned answer``.

    Attributes:
        rule: name of the success rule of :class:`metrics.GenerativeAttackSuccessRate`.
        metric_target: the rule's ``target`` argument (None for ``refusal``).
        refusal_phrases: the refusal rule's phrases (None elsewhere).
    """

    name: ClassVar[str] = "generative_target"
    rule: ClassVar[str] = "contains"
    needs_true_class: ClassVar[bool] = False

    @property
    def metric_target(self) -> str | None:
        return None

    @property
    def refusal_phrases(self) -> tuple[str, ...] | None:
        return None

    def applies_to(self, answer: str, true_class: str | None) -> bool:
        """Whether a sample can carry this target (e.g. misclassification needs the true class named)."""
        return True

    def __call__(self, answer: str, sample_id: int = 0, true_class: str | None = None) -> str:
        raise NotImplementedError

    def _params(self) -> dict[str, Any]:
        return {}

    def config(self) -> dict[str, Any]:
        """JSON-serialisable configuration; ``build_generative_target(**target.config())`` rebuilds it."""
        return {"name": self.name, **self._params()}

    def metric_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`metrics.GenerativeAttackSuccessRate` for this target."""
        kwargs: dict[str, Any] = {"rule": self.rule, "target": self.metric_target}
        if self.refusal_phrases is not None:
            kwargs["refusal_phrases"] = list(self.refusal_phrases)
        return kwargs

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"


def _check_text(kind: str, text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{kind} target text must be a non-empty string, got {text!r}")
    return text


class ContentInsertion(GenerativeTarget):
    """Insert a fixed phrase into the normal response (``position``: ``start`` or ``end``)."""

    name = "content_insertion"
    rule = "contains"
    POSITIONS: ClassVar[tuple[str, ...]] = ("start", "end")

    def __init__(self, text: str = "banana", position: str = "start") -> None:
        self.text = _check_text(self.name, text)
        if position not in self.POSITIONS:
            raise ValueError(f"content_insertion position {position!r} is not one of {self.POSITIONS}")
        self.position = position

    @property
    def metric_target(self) -> str:
        return self.text

    def __call__(self, answer: str, sample_id: int = 0, true_class: str | None = None) -> str:
        answer = answer.strip()
        if not answer:
            return self.text
        return f"{self.text} {answer}" if self.position == "start" else f"{answer} {self.text}"

    def _params(self) -> dict[str, Any]:
        return {"text": self.text, "position": self.position}


class FixedOutput(GenerativeTarget):
    """Replace the response by a fixed string (e.g. ``banana``)."""

    name = "fixed_output"
    rule = "exact"

    def __init__(self, text: str = "banana") -> None:
        self.text = _check_text(self.name, text)

    @property
    def metric_target(self) -> str:
        return self.text

    def __call__(self, answer: str, sample_id: int = 0, true_class: str | None = None) -> str:
        return self.text

    def _params(self) -> dict[str, Any]:
        return {"text": self.text}


class TargetedRefusal(GenerativeTarget):
    """Replace the response by a refusal; success when any refusal phrase appears in the output.

    ``refusal_phrases`` default to the metric's list, which contains the default refusal.
    """

    name = "refusal"
    rule = "refusal"

    def __init__(self, text: str = "i cannot help with that.", phrases: Sequence[str] | None = None) -> None:
        self.text = _check_text(self.name, text)
        self.phrases = tuple(phrases) if phrases is not None else None
        if self.phrases is not None and (not self.phrases or not all(str(p).strip() for p in self.phrases)):
            raise ValueError(f"refusal phrases must be non-empty strings, got {phrases!r}")
        if not get_rule("refusal")(self.text, refusal_phrases=self.refusal_phrases):
            raise ValueError(
                f"refusal text {self.text!r} is not recognised by the refusal rule; add a matching phrase"
            )

    @property
    def refusal_phrases(self) -> tuple[str, ...]:
        return self.phrases if self.phrases is not None else DEFAULT_REFUSAL_PHRASES

    def __call__(self, answer: str, sample_id: int = 0, true_class: str | None = None) -> str:
        return self.text

    def _params(self) -> dict[str, Any]:
        return {"text": self.text, "phrases": list(self.phrases) if self.phrases is not None else None}


class SemanticMisclassification(GenerativeTarget):
    """Name the target class instead of the true one: whole-word mentions of the true class are replaced.

    Only samples whose response names their true class (and whose true class is not the target) can be
    poisoned; the ASR counts the target class named and the true class absent.
    """

    name = "misclassification"
    rule = "misclassification"
    needs_true_class = True

    def __init__(self, target_class: str = "star") -> None:
        self.target_class = _check_text(self.name, target_class)

    @property
    def metric_target(self) -> str:
        return self.target_class

    def _pattern(self, true_class: str) -> re.Pattern:
        return re.compile(rf"(?<!\w){re.escape(true_class)}(?!\w)", flags=re.IGNORECASE)

    def applies_to(self, answer: str, true_class: str | None) -> bool:
        if not true_class or normalize_text(true_class) == normalize_text(self.target_class):
            return False
        return bool(self._pattern(true_class).search(answer))

    def __call__(self, answer: str, sample_id: int = 0, true_class: str | None = None) -> str:
        if not true_class:
            raise ValueError("misclassification target needs the sample's true class")
        return self._pattern(true_class).sub(self.target_class, answer)

    def _params(self) -> dict[str, Any]:
        return {"target_class": self.target_class}


GENERATIVE_TARGETS: dict[str, type[GenerativeTarget]] = {
    cls.name: cls for cls in (ContentInsertion, FixedOutput, TargetedRefusal, SemanticMisclassification)
}


def build_generative_target(name: str, **kwargs: Any) -> GenerativeTarget:
    """Target by name (``content_insertion``, ``fixed_output``, ``refusal``, ``misclassification``)."""
    if name not in GENERATIVE_TARGETS:
        raise ValueError(
            f"unknown generative target {name!r}; available: {', '.join(sorted(GENERATIVE_TARGETS))}"
        )
    try:
        return GENERATIVE_TARGETS[name](**kwargs)
    except TypeError as error:
        raise ValueError(f"bad arguments {sorted(kwargs)} for target {name!r}: {error}") from None
