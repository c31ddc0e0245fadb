"""Attack success rate (ASR) for classification, as a torchmetrics metric."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from metrics.functional.attack_success_rate import (
    _attack_success_rate_arg_validation,
    _attack_success_rate_compute,
    _attack_success_rate_update,
)


class AttackSuccessRate(Metric):
    r"""Share of triggered inputs that a classifier assigns to the backdoor target class.

    .. math::
        \text{ASR} = \frac{\#\{i \in C : \hat y_i = t\}}{|C|},\qquad
        C = \{i : y_i \ne t\}\ \text{if exclude\_target\_class else all inputs}

    As input to ``update``:

    - ``preds``: ``(B,)`` integer predicted class indices, or ``(B, C)`` float logits (argmax taken),
      computed on the *triggered* inputs. Logit rows with a NaN or without a finite maximum are a
      ``ValueError`` naming the rows, raised before the state changes.
    - ``labels``: ``(B,)`` integer true classes; required when ``exclude_target_class`` is true, ignored
      otherwise.

    ``compute`` returns a 0-dim float tensor in [0, 1], or NaN with a warning when no input was counted
    (e.g. every input belonged to the target class). ``variant`` names the form that was measured
    (``"exclude-target"`` or ``"all"``) so that reports can say which ASR they show.

    Args:
        target_class: the backdoor target class index.
        exclude_target_class: do not count inputs whose true class is ``target_class`` (the stricter,
            common form; CleanCLIP-style zero-shot ASR counts all inputs).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from metrics import AttackSuccessRate
        >>> asr = AttackSuccessRate(target_class=3)
        >>> asr.update(torch.tensor([3, 3, 1, 3]), torch.tensor([0, 3, 1, 2]))
        >>> asr.compute()
        tensor(0.6667)
        >>> asr.variant
        'exclude-target'
    """

    is_differentiable = False
    higher_is_better = True  # from the attacker's side; a defense wants it low
    full_state_update = False

    successes: Tensor
    counted: Tensor

    def __init__(self, target_class: int, exclude_target_class: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _attack_success_rate_arg_validation(target_class, exclude_target_class)
        self.target_class = target_class
        self.exclude_target_class = exclude_target_class
        self.add_state("successes", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("counted", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @property
    def variant(self) -> str:
        """``"exclude-target"`` when inputs of the target class are left out, else ``"all"``."""
        return "exclude-target" if self.exclude_target_class else "all"

    def update(self, preds: Tensor, labels: Tensor | None = None) -> None:
        """Add one batch of predictions on triggered inputs (and their true classes)."""
        successes, counted = _attack_success_rate_update(
            preds, labels, self.target_class, self.exclude_target_class
        )
        self.successes += successes
        self.counted += counted

    def compute(self) -> Tensor:
        """ASR over all batches (and all processes)."""
        return _attack_success_rate_compute(self.successes, self.counted)
