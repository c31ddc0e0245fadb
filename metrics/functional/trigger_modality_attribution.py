"""Trigger Modality Attribution (TMA): the exact Shapley value of each trigger part (modality-collapse paper)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.utilities import rank_zero_warn

from metrics.functional._stats import _mean_and_ci95
from metrics.functional.shapley import _modalities_validation, _shapley_weights, _values_validation


def _trigger_modality_attribution_arg_validation(
    modalities: Sequence[str], normalize: bool, return_ci: bool
) -> tuple[str, ...]:
    names = _modalities_validation(modalities)
    for name, flag in (("normalize", normalize), ("return_ci", return_ci)):
        if not isinstance(flag, bool):
            raise ValueError(f"Expected argument `{name}` to be a bool, but got {flag!r}.")
    return names


def _trigger_modality_attribution_update(
    values: Tensor, num_parts: int, modalities: Sequence[str] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample Shapley values of one batch, reduced to ``(sum phi, sum phi^2, count)``.

    Args:
        values: ``(B, 2^n)`` finite coalition values ``v(S)`` in bitmask order; a NaN or inf is an error
            naming its coalitions.
        num_parts: ``n``.
        modalities: the part names, for the error message.

    Returns:
        ``(n,)`` float64 sum of phi, ``(n,)`` float64 sum of phi^2, 0-dim long count ``B``.
    """
    values = _values_validation(values, num_parts, modalities, "TriggerModalityAttribution")
    phi = values @ _shapley_weights(num_parts).to(values.device)
    count = torch.tensor(values.shape[0], dtype=torch.long, device=values.device)
    return phi.sum(dim=0), (phi * phi).sum(dim=0), count


def _trigger_modality_attribution_compute(
    phi_sum: Tensor,
    phi_sq_sum: Tensor,
    count: Tensor,
    modalities: Sequence[str],
    normalize: bool = False,
    return_ci: bool = False,
) -> dict[str, Tensor]:
    """Dataset means of phi per modality, plus shares ``phi_m / sum phi`` and 95% CI half-widths on request."""
    mean, half_width = _mean_and_ci95(phi_sum, phi_sq_sum, count, "TriggerModalityAttribution", return_ci)
    result = {name: mean[m] for m, name in enumerate(modalities)}
    if normalize:
        total = mean.sum()
        if bool(total == 0):
            rank_zero_warn(
                "TriggerModalityAttribution: the Shapley values sum to 0 (v(all) = v(none) on average), so the"
                " normalised shares are undefined and NaN is returned.",
                UserWarning,
            )
        shares = torch.where(total == 0, torch.full_like(mean, float("nan")), mean / total)
        result.update({f"{name}_share": shares[m] for m, name in enumerate(modalities)})
    if return_ci:
        result.update({f"{name}_ci95": half_width[m] for m, name in enumerate(modalities)})
    return result


def trigger_modality_attribution(
    values: Tensor,
    modalities: Sequence[str],
    normalize: bool = False,
    return_ci: bool = False,
) -> dict[str, Tensor]:
    r"""Trigger Modality Attribution: dataset mean of the exact Shapley value of each trigger part.

    For each sample, with parts :math:`N` (``n = len(modalities)``) and coalition values :math:`v(S)`:

    .. math::
        \phi_i = \sum_{S \subseteq N \setminus \{i\}} \frac{|S|!\,(n-|S|-1)!}{n!}\,[v(S \cup \{i\}) - v(S)]

    and the result is :math:`\bar\phi_i`, the mean over samples (equal to the Shapley value of the mean game,
    since :math:`\phi` is linear in :math:`v`). Efficiency: :math:`\sum_i \bar\phi_i = \bar v(N) - \bar v(\emptyset)`.

    Args:
        values: ``(B, 2^n)`` per-sample coalition values, column ``k`` = coalition with bitmask ``k`` (bit
            ``m`` set = ``modalities[m]`` active); for ``["image", "text"]`` the columns are
            ``v({}), v({image}), v({text}), v({image, text})``. See :mod:`metrics.functional.shapley`.
            Non-finite values are an error naming the coalitions that hold them.
        modalities: names of the ``n`` trigger parts (2 or 3 in practice, at most 6).
        normalize: also return the shares ``phi_m / sum_k phi_k`` under keys ``"<name>_share"``. With
            Shapley values of mixed signs a share can fall outside [0, 1]; NaN (with a warning) when the sum is 0.
        return_ci: also return the 95% confidence half-width of each mean (normal approximation,
            ``1.96 * s / sqrt(B)``) under keys ``"<name>_ci95"``; NaN (with a warning) when ``B < 2``.

    Returns:
        ``{name: mean phi}`` (0-dim float tensors), plus the optional ``_share`` and ``_ci95`` keys.

    Example:
        >>> import torch
        >>> from metrics.functional import trigger_modality_attribution
        >>> values = torch.tensor([[0.0, 0.1, 0.8, 1.0], [0.0, 0.0, 1.0, 1.0]])
        >>> tma = trigger_modality_attribution(values, ["image", "text"], normalize=True)
        >>> {k: round(v.item(), 3) for k, v in tma.items()}
        {'image': 0.075, 'text': 0.925, 'image_share': 0.075, 'text_share': 0.925}
    """
    names = _trigger_modality_attribution_arg_validation(modalities, normalize, return_ci)
    phi_sum, phi_sq_sum, count = _trigger_modality_attribution_update(values, len(names), names)
    return _trigger_modality_attribution_compute(phi_sum, phi_sq_sum, count, names, normalize, return_ci)
