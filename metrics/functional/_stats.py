"""Small numeric helpers shared by the metrics: guarded ratios and normal-approximation intervals."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.utilities import rank_zero_warn

#: Two-sided 95% quantile of the standard normal distribution.
Z_95 = 1.959963984540054


def _ratio_or_nan(numerator: Tensor, denominator: Tensor, metric_name: str) -> Tensor:
    """Return ``numerator / denominator`` as a float tensor; NaN with a warning where the denominator is 0.

    A rate over zero counted samples is undefined, and reporting 0 would read as "the attack failed".
    """
    if bool((denominator == 0).any()):
        rank_zero_warn(
            f"{metric_name}: no samples were counted, so the rate is undefined and NaN is returned.",
            UserWarning,
        )
    return (numerator.double() / denominator.double()).to(torch.get_default_dtype())


def _mean_and_ci95(
    total: Tensor, total_sq: Tensor, count: Tensor, metric_name: str, warn_ci: bool = True
) -> tuple[Tensor, Tensor]:
    """Mean and 95% confidence half-width (normal approximation) from a sum, a sum of squares and a count.

    ``half_width = 1.96 * sqrt(s^2 / N)`` with the unbiased sample variance
    ``s^2 = (sum x^2 - (sum x)^2 / N) / (N - 1)``. The mean is NaN when N = 0 and the half-width is NaN
    when N < 2 (one sample has no spread to estimate); both cases warn (the second only with ``warn_ci``).
    """
    count = count.double()
    if bool(count == 0):
        rank_zero_warn(f"{metric_name}: no samples were seen, so the mean is NaN.", UserWarning)
    mean = total / count
    variance = (total_sq - total * total / count) / (count - 1)
    # Float64 sums can leave a tiny negative variance when all samples are equal.
    half_width = Z_95 * (variance.clamp(min=0.0) / count).sqrt()
    if bool(count < 2):
        if warn_ci and bool(count == 1):
            rank_zero_warn(
                f"{metric_name}: a confidence interval needs at least 2 samples, got 1; its half-width is NaN.",
                UserWarning,
            )
        half_width = torch.full_like(half_width, float("nan"))
    dtype = torch.get_default_dtype()
    return mean.to(dtype), half_width.to(dtype)
