"""Attack success rate of generated text (VLM / MDLM captions and answers), as a torchmetrics metric."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from metrics.functional.generative_attack_success_rate import (
    _generative_attack_success_rate_arg_validation,
    _generative_attack_success_rate_compute,
    _generative_attack_success_rate_update,
)


class GenerativeAttackSuccessRate(Metric):
    r"""Share of generated responses to triggered inputs that a string rule judges a success.

    .. math::
        \text{ASR} = \frac{1}{N} \sum_{i=1}^{N} \text{rule}(r_i)

    Rules (:mod:`metrics.functional.string_rules`), all on case-folded, whitespace-normalised text:
    ``contains`` (the target string appears), ``exact`` (the response is the target string), ``refusal``
    (a refusal phrase appears), ``misclassification`` (the target class is named and the true class is
    not). The rule runs on Python strings in ``update``; the states are a success count and a sample count
    (tensors summed across processes).

    As input to ``update``:

    - ``responses``: list of ``B`` decoded strings.
    - ``true_classes``: list of ``B`` true class names; required by ``misclassification``.

    ``compute`` returns a 0-dim float tensor in [0, 1], or NaN with a warning when no response was seen.

    Args:
        rule: name of the success rule; an unknown name raises ``ValueError`` listing the rules.
        target: the target string (``contains``, ``exact``) or target class name (``misclassification``).
        refusal_phrases: phrases of the ``refusal`` rule (default:
            :data:`~metrics.functional.string_rules.DEFAULT_REFUSAL_PHRASES`).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> from metrics import GenerativeAttackSuccessRate
        >>> asr = GenerativeAttackSuccessRate(rule="misclassification", target="dog")
        >>> asr.update(["A DOG on grass.", "a cat and a dog", "a cat"], true_classes=["cat", "cat", "cat"])
        >>> asr.compute()
        tensor(0.3333)
    """

    is_differentiable = False
    higher_is_better = True  # from the attacker's side; a defense wants it low
    full_state_update = False

    successes: Tensor
    counted: Tensor

    def __init__(
        self,
        rule: str = "contains",
        target: str | None = None,
        refusal_phrases: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._rule = _generative_attack_success_rate_arg_validation(rule, target, refusal_phrases)
        self.rule = rule
        self.target = target
        self.refusal_phrases = tuple(refusal_phrases) if refusal_phrases is not None else None
        self.add_state("successes", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("counted", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, responses: Sequence[str], true_classes: Sequence[str] | None = None) -> None:
        """Judge one batch of decoded responses (with their true class names for ``misclassification``)."""
        successes, counted = _generative_attack_success_rate_update(
            responses,
            self._rule,
            self.target,
            true_classes,
            self.refusal_phrases,
            device=self.successes.device,
        )
        self.successes += successes
        self.counted += counted

    def compute(self) -> Tensor:
        """ASR over all batches (and all processes)."""
        return _generative_attack_success_rate_compute(self.successes, self.counted)
