"""Cross-Trigger Interaction (CTI), as a torchmetrics metric."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from metrics.functional.cross_trigger_interaction import (
    _cross_trigger_interaction_arg_validation,
    _cross_trigger_interaction_compute,
    _cross_trigger_interaction_update,
)


class CrossTriggerInteraction(Metric):
    r"""Dataset mean of the interaction between two trigger parts in the backdoor game ``v``.

    .. math::
        \text{CTI} = \overline{v(\{I,T\}) - v(\{I\}) - v(\{T\}) + v(\emptyset)}

    CTI > 0: the parts reinforce each other; CTI < 0: they interfere or are redundant (the modality-collapse
    paper finds CTI <= 0). With three parts the ``pair`` must be named and the metric is the Shapley
    interaction index of the pair (Grabisch, 1997): the two-part formula averaged over the coalitions ``S``
    of the other parts with weights ``|S|! (n-|S|-2)! / (n-1)!``; for ``n = 3`` the mean of the CTI with the
    third part off and with it on. See :func:`metrics.functional.cross_trigger_interaction`.

    As input to ``update``:

    - ``values``: ``(B, 2^n)`` float tensor of coalition values in bitmask order (column ``k`` = coalition
      with bit ``m`` set for ``modalities[m]``); for ``["image", "text"]``:
      ``v({}), v({image}), v({text}), v({image, text})``.

    ``compute`` returns a 0-dim float tensor, or with ``return_ci`` the dict
    ``{"cti": mean, "cti_ci95": half-width}`` (95% normal-approximation interval, ``1.96 * s / sqrt(N)``).

    Args:
        modalities: names of the ``n`` trigger parts.
        pair: the two parts whose interaction to measure; defaults to both parts when ``n = 2`` and is
            required when ``n > 2``.
        return_ci: also return the confidence half-width (NaN with a warning for fewer than 2 samples).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from metrics import CrossTriggerInteraction
        >>> cti = CrossTriggerInteraction(["image", "text"])
        >>> cti.update(torch.tensor([[0.0, 0.1, 0.8, 1.0], [0.0, 0.0, 1.0, 1.0]]))
        >>> cti.compute()
        tensor(0.0500)
    """

    is_differentiable = True
    higher_is_better = None
    full_state_update = False

    cti_sum: Tensor
    cti_sq_sum: Tensor
    count: Tensor

    def __init__(
        self,
        modalities: Sequence[str],
        pair: Sequence[str] | None = None,
        return_ci: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.modalities, self._pair_index = _cross_trigger_interaction_arg_validation(
            modalities, pair, return_ci
        )
        self.pair = tuple(self.modalities[i] for i in self._pair_index)
        self.return_ci = return_ci
        # float64 sums: the variance for the CI subtracts two large, nearly equal numbers.
        self.add_state("cti_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("cti_sq_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        """Add a batch of per-sample coalition values ``(B, 2^n)``.

        A NaN or inf value is a ``ValueError`` naming its coalitions, raised before the state changes.
        """
        cti_sum, cti_sq_sum, count = _cross_trigger_interaction_update(
            values, len(self.modalities), self._pair_index, self.modalities
        )
        self.cti_sum += cti_sum
        self.cti_sq_sum += cti_sq_sum
        self.count += count

    def compute(self) -> Tensor | dict[str, Tensor]:
        """Mean interaction (and CI half-width) over all batches and processes."""
        return _cross_trigger_interaction_compute(self.cti_sum, self.cti_sq_sum, self.count, self.return_ci)
