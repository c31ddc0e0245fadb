"""Attack success rate for generated text, judged per sample by a string rule (see ``string_rules``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from metrics.functional._stats import _ratio_or_nan
from metrics.functional.string_rules import StringRule, get_rule


def _generative_attack_success_rate_arg_validation(
    rule: str, target: str | None, refusal_phrases: Sequence[str] | None
) -> StringRule:
    """Resolve the rule and check that the arguments it needs were given."""
    string_rule = get_rule(rule)
    if string_rule.needs_target and (not isinstance(target, str) or not target.strip()):
        raise ValueError(f"Rule {rule!r} needs argument `target` (a non-empty string), but got {target!r}.")
    if refusal_phrases is not None:
        if not string_rule.uses_refusal_phrases:
            raise ValueError(
                f"Argument `refusal_phrases` only applies to the 'refusal' rule, not to {rule!r}."
            )
        # A bare string is a sequence of characters: every response containing "i" would be a refusal.
        if (
            isinstance(refusal_phrases, str)
            or len(refusal_phrases) == 0
            or not all(isinstance(p, str) and p.strip() for p in refusal_phrases)
        ):
            raise ValueError(
                "Expected argument `refusal_phrases` to be a non-empty list of non-empty strings, but got"
                f" {refusal_phrases!r}."
            )
    return string_rule


def _generative_attack_success_rate_update(
    responses: Sequence[str],
    rule: StringRule,
    target: str | None,
    true_classes: Sequence[str] | None,
    refusal_phrases: Sequence[str] | None,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Judge each response with ``rule``; return ``(successes, counted)`` as 0-dim long tensors."""
    if isinstance(responses, str) or not isinstance(responses, Sequence):
        raise ValueError(f"Expected `responses` to be a list of strings, but got {type(responses).__name__}.")
    if true_classes is not None:
        if isinstance(true_classes, str) or len(true_classes) != len(responses):
            raise ValueError(
                f"Expected `true_classes` to be a list of {len(responses)} strings (one per response), but got"
                f" {true_classes!r}."
            )
    elif rule.needs_true_class:
        raise ValueError(f"Rule {rule.name!r} needs `true_classes` (the true class name of each response).")
    classes = true_classes if true_classes is not None else [None] * len(responses)
    successes = sum(
        rule(response, target=target, true_class=true_class, refusal_phrases=refusal_phrases)
        for response, true_class in zip(responses, classes)
    )
    return (
        torch.tensor(successes, dtype=torch.long, device=device),
        torch.tensor(len(responses), dtype=torch.long, device=device),
    )


def _generative_attack_success_rate_compute(successes: Tensor, counted: Tensor) -> Tensor:
    """``ASR = successes / counted``; NaN (with a warning) when no response was seen."""
    return _ratio_or_nan(successes, counted, "GenerativeAttackSuccessRate")


def generative_attack_success_rate(
    responses: Sequence[str],
    rule: str,
    target: str | None = None,
    true_classes: Sequence[str] | None = None,
    refusal_phrases: Sequence[str] | None = None,
) -> Tensor:
    r"""Attack success rate of generated responses to triggered inputs.

    .. math::
        \text{ASR} = \frac{1}{N} \sum_{i=1}^{N} \text{rule}(r_i)

    where :math:`r_i` is the decoded response to the i-th triggered input and ``rule`` one of
    ``contains``, ``exact``, ``refusal`` and ``misclassification`` (see
    :mod:`metrics.functional.string_rules`).

    Args:
        responses: ``N`` decoded strings.
        rule: name of the success rule.
        target: the target string (``contains``, ``exact``) or target class name (``misclassification``).
        true_classes: ``N`` true class names; required by ``misclassification``.
        refusal_phrases: phrases of the ``refusal`` rule (default:
            :data:`~metrics.functional.string_rules.DEFAULT_REFUSAL_PHRASES`).

    Returns:
        A 0-dim float tensor in [0, 1]; NaN (with a warning) for an empty list.

    Example:
        >>> from metrics.functional import generative_attack_success_rate
        >>> responses = ["Sure, a BANANA!", "a red apple", "banana"]
        >>> generative_attack_success_rate(responses, rule="contains", target="banana")
        tensor(0.6667)
        >>> generative_attack_success_rate(["I'm  sorry, no.", "Here it is."], rule="refusal")
        tensor(0.5000)
    """
    string_rule = _generative_attack_success_rate_arg_validation(rule, target, refusal_phrases)
    successes, counted = _generative_attack_success_rate_update(
        responses, string_rule, target, true_classes, refusal_phrases
    )
    return _generative_attack_success_rate_compute(successes, counted)
