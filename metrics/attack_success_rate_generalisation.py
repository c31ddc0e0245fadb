"""ASR-G (attack success rate generalisation under domain shift), as a torchmetrics metric."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from metrics.functional.attack_success_rate_generalisation import (
    _attack_success_rate_generalisation_compute,
    _attack_success_rate_generalisation_update,
)


class AttackSuccessRateGeneralisation(Metric):
    r"""ASR-G from per-sample hits in the source (attacker's) and target (user's, shifted) domains.

    .. math::
        \text{ASR-G} = \min\left(1 + \frac{\text{ASR}_{tgt} - \text{ASR}_{src}}
            {\max(\text{ASR}_{src}, \text{ASR}_{tgt})},\ 1\right) \in [0, 1]

    with each ASR the share of hits over all samples of its domain (see
    :func:`metrics.functional.attack_success_rate_generalisation` for the sign convention). The hits come
    from any success rule (classification or string rule), so this metric only counts them.

    As input to ``update``:

    - ``source_hits``: ``(B_src,)`` bool or 0/1 tensor, one per triggered source-domain input.
    - ``target_hits``: ``(B_tgt,)`` bool or 0/1 tensor, one per triggered target-domain input (the sizes
      may differ, and either may be empty).

    ``compute`` returns a 0-dim float tensor; NaN with a warning when both ASRs are 0 or a domain has no
    samples.

    Example:
        >>> import torch
        >>> from metrics import AttackSuccessRateGeneralisation
        >>> asr_g = AttackSuccessRateGeneralisation()
        >>> asr_g.update(torch.tensor([1, 1, 1, 0]), torch.tensor([1, 0, 0, 0, 1, 0]))
        >>> asr_g.compute()
        tensor(0.4444)
    """

    is_differentiable = False
    higher_is_better = True  # from the attacker's side: the backdoor survives the shift
    full_state_update = False

    src_successes: Tensor
    src_counted: Tensor
    tgt_successes: Tensor
    tgt_counted: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("src_successes", "src_counted", "tgt_successes", "tgt_counted"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, source_hits: Tensor, target_hits: Tensor) -> None:
        """Add per-sample hits of one batch from each domain."""
        src_successes, src_counted, tgt_successes, tgt_counted = _attack_success_rate_generalisation_update(
            source_hits, target_hits
        )
        self.src_successes += src_successes.to(self.src_successes.device)
        self.src_counted += src_counted.to(self.src_counted.device)
        self.tgt_successes += tgt_successes.to(self.tgt_successes.device)
        self.tgt_counted += tgt_counted.to(self.tgt_counted.device)

    def compute(self) -> Tensor:
        """ASR-G over all batches and processes."""
        return _attack_success_rate_generalisation_compute(
            self.src_successes, self.src_counted, self.tgt_successes, self.tgt_counted
        )
