"""How sure InverTune's step 1 is of its target, and whether it found the true one.

Step 1 ranks the classes by their rise in top-1 frequency under the universal adversarial perturbation,
``increase(y) = P_adv(y) - P_clean(y)`` (:func:`defenses.invertune.identify_target`). The margin

    margin = increase(top) - increase(runner-up)

is the evidence that separates the chosen target from the next candidate. A margin below ``min_margin``
is *low confidence*: on the embedded world the corner-patch UAP picked a wrong class for SIG at margin
0.053 and the L-inf UAP the right one for WaNet at 0.008; a real data set gave a wrong class at 0.010.
Steps 2 and 3 then invert and tune against the wrong class, and nothing downstream notices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

DEFAULT_MIN_MARGIN = 0.1
"""Margins below this are low confidence: above the wrong-class margins seen (0.010, 0.053) and below the
margins of the clear identifications on the embedded world (0.40-0.84)."""


@dataclass(frozen=True)
class TargetConfidence:
    """The top two classes of the identification ranking and the margin between them."""

    target: str
    runner_up: str
    target_increase: float
    """``increase`` of the target (the rise in its top-1 frequency under the UAP)."""
    runner_up_increase: float
    margin: float
    """``target_increase - runner_up_increase`` (>= 0)."""
    threshold: float
    """``min_margin``: a smaller margin is low confidence."""
    statistic: str = "rise"
    """The ranking statistic that the values and the margin are in (``rise`` or ``breadth``)."""

    @property
    def low_confidence(self) -> bool:
        """``margin < threshold`` (a threshold of 0 never flags)."""
        return self.margin < self.threshold

    def as_dict(self) -> dict:
        """JSON-ready form (``report.json`` / ``invertune_report.json``: ``target_confidence``)."""
        return {
            "margin": self.margin,
            "threshold": self.threshold,
            "low_confidence": self.low_confidence,
            "target": self.target,
            "runner_up": self.runner_up,
            "target_increase": self.target_increase,
            "runner_up_increase": self.runner_up_increase,
            "statistic": self.statistic,
        }

    @classmethod
    def from_dict(cls, saved: dict, threshold: float) -> TargetConfidence:
        """The inverse of :meth:`as_dict`, judged against ``threshold`` (the reading run's ``min_margin``);
        a missing or malformed entry raises ``KeyError`` / ``TypeError`` / ``ValueError``."""
        return cls(
            target=str(saved["target"]),
            runner_up=str(saved["runner_up"]),
            target_increase=float(saved["target_increase"]),
            runner_up_increase=float(saved["runner_up_increase"]),
            statistic=str(saved.get("statistic", "rise")),
            margin=float(saved["margin"]),
            threshold=threshold,
        )

    def describe(self) -> str:
        """The margin and the top two classes with their values (rises or breadths), in words."""
        return (
            f"margin {self.margin:.3f} between the identified target {self.target!r} "
            f"({self.statistic} {self.target_increase:+.3f}) and the runner-up {self.runner_up!r} "
            f"({self.statistic} {self.runner_up_increase:+.3f})"
        )


def check_min_margin(min_margin: float) -> float:
    """``min_margin`` as a float; negative or non-finite is a ``ValueError`` naming it."""
    value = float(min_margin)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"min_margin must be a finite number >= 0 (0: never warn), got {min_margin!r}")
    return value


def target_confidence(
    increase: Tensor,
    ranking: Sequence[int],
    class_names: Sequence[str],
    min_margin: float = DEFAULT_MIN_MARGIN,
    statistic: str = "rise",
) -> TargetConfidence:
    """The :class:`TargetConfidence` of a ranking of per-class rises ``increase`` (``C``), largest first.

    ``ranking[0]`` is the target and ``ranking[1]`` the runner-up; a non-finite rise, fewer than two
    classes, or names that do not match ``increase`` are ``ValueError``s that say so.
    """
    values = [float(v) for v in increase.detach().cpu().flatten()]
    if len(values) != len(class_names):
        raise ValueError(f"{len(values)} class rises for {len(class_names)} class names {list(class_names)}")
    if len(ranking) < 2:
        raise ValueError(f"a margin needs at least 2 ranked classes, got ranking {list(ranking)}")
    bad = [class_names[i] for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"non-finite rise in top-1 frequency for classes {bad}: {values}")
    top, second = int(ranking[0]), int(ranking[1])
    return TargetConfidence(
        target=class_names[top],
        runner_up=class_names[second],
        target_increase=values[top],
        runner_up_increase=values[second],
        margin=values[top] - values[second],
        threshold=check_min_margin(min_margin),
        statistic=statistic,
    )


def true_target_check(
    identified: int, true_target: int | None, class_names: Sequence[str], unknown_reason: str
) -> dict:
    """Whether the target InverTune used is the true one, for ``invertune_report.json``.

    ``true_target``: the index of the attack's target when the data know it (the datamodule's
    ``target_index``), else ``None``; then ``target_matches_true_target`` is ``None`` and
    ``true_target_unknown`` says why (``unknown_reason``).
    """
    if true_target is None:
        return {
            "true_target": None,
            "target_matches_true_target": None,
            "true_target_unknown": unknown_reason,
        }
    return {
        "true_target": class_names[true_target],
        "target_matches_true_target": int(identified) == int(true_target),
        "true_target_unknown": None,
    }
