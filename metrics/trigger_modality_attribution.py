"""Trigger Modality Attribution (TMA), as a torchmetrics metric."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from metrics.functional.trigger_modality_attribution import (
    _trigger_modality_attribution_arg_validation,
    _trigger_modality_attribution_compute,
    _trigger_modality_attribution_update,
)


class TriggerModalityAttribution(Metric):
    r"""Dataset mean of the exact Shapley value of each trigger part (modality) in the backdoor game ``v``.

    .. math::
        \phi_i = \sum_{S \subseteq N \setminus \{i\}} \frac{|S|!\,(n-|S|-1)!}{n!}\,[v(S \cup \{i\}) - v(S)]

    for each sample, averaged over the data set. For two parts this is
    ``phi_I = 1/2 [v(I) - v()] + 1/2 [v(IT) - v(T)]``. Shapley values are linear in ``v``, so the states are
    the per-part sums of ``phi`` and of ``phi^2`` plus a count, summed across batches and processes; the mean
    of per-sample values equals the Shapley value of the mean game, and
    ``sum_i mean(phi_i) = mean v(N) - mean v({})`` (efficiency).

    ``v(S)`` is a per-sample backdoor score with the trigger parts in ``S`` applied: continuous (e.g.
    ``cos(z_S, z_target) - cos(z_S, z_clean)``) or binary (hit / miss, so that ``mean v(S)`` is the ASR of
    coalition ``S``).

    As input to ``update``:

    - ``values``: ``(B, 2^n)`` float tensor; column ``k`` holds ``v(S)`` for the coalition with bitmask ``k``
      (bit ``m`` set = ``modalities[m]`` active). For ``["image", "text"]``: columns
      ``v({}), v({image}), v({text}), v({image, text})``. Build columns with
      :func:`metrics.functional.shapley.coalition_index`.

    ``compute`` returns ``{name: mean phi}`` (0-dim float tensors), plus ``"<name>_share"`` (``phi_m / sum
    phi``) with ``normalize`` and ``"<name>_ci95"`` (95% confidence half-width of the mean, normal
    approximation ``1.96 * s / sqrt(N)``) with ``return_ci``.

    Args:
        modalities: names of the ``n`` trigger parts, e.g. ``["image", "text"]`` (2 or 3 in practice).
        normalize: add the normalised shares; a share can leave [0, 1] when the Shapley values have mixed
            signs, and the shares are NaN (with a warning) when the values sum to 0.
        return_ci: add the confidence half-widths (NaN with a warning for fewer than 2 samples).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from metrics import TriggerModalityAttribution
        >>> tma = TriggerModalityAttribution(["image", "text"], normalize=True)
        >>> tma.update(torch.tensor([[0.0, 0.1, 0.8, 1.0], [0.0, 0.0, 1.0, 1.0]]))
        >>> {k: round(v.item(), 3) for k, v in tma.compute().items()}
        {'image': 0.075, 'text': 0.925, 'image_share': 0.075, 'text_share': 0.925}
    """

    is_differentiable = True
    higher_is_better = None
    full_state_update = False

    phi_sum: Tensor
    phi_sq_sum: Tensor
    count: Tensor

    def __init__(
        self,
        modalities: Sequence[str],
        normalize: bool = False,
        return_ci: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.modalities = _trigger_modality_attribution_arg_validation(modalities, normalize, return_ci)
        self.normalize = normalize
        self.return_ci = return_ci
        n = len(self.modalities)
        # float64 sums: the variance for the CI subtracts two large, nearly equal numbers.
        self.add_state("phi_sum", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("phi_sq_sum", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        """Add a batch of per-sample coalition values ``(B, 2^n)``.

        A NaN or inf value is a ``ValueError`` naming its coalitions, raised before the state changes.
        """
        phi_sum, phi_sq_sum, count = _trigger_modality_attribution_update(
            values, len(self.modalities), self.modalities
        )
        self.phi_sum += phi_sum
        self.phi_sq_sum += phi_sq_sum
        self.count += count

    def compute(self) -> dict[str, Tensor]:
        """Mean Shapley value per modality (and shares, CI half-widths) over all batches and processes."""
        return _trigger_modality_attribution_compute(
            self.phi_sum, self.phi_sq_sum, self.count, self.modalities, self.normalize, self.return_ci
        )
