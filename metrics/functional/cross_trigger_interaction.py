"""Cross-Trigger Interaction (CTI): the interaction index of a pair of trigger parts (modality-collapse paper)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from metrics.functional._stats import _mean_and_ci95
from metrics.functional.shapley import _interaction_weights, _modalities_validation, _values_validation


def _cross_trigger_interaction_arg_validation(
    modalities: Sequence[str], pair: Sequence[str] | None, return_ci: bool
) -> tuple[tuple[str, ...], tuple[int, int]]:
    """Validate the arguments; return the part names and the indices of the pair."""
    names = _modalities_validation(modalities)
    if not isinstance(return_ci, bool):
        raise ValueError(f"Expected argument `return_ci` to be a bool, but got {return_ci!r}.")
    if pair is None:
        if len(names) != 2:
            raise ValueError(
                f"Argument `pair` is required with {len(names)} trigger parts {names!r}: name the two parts whose"
                " interaction to measure."
            )
        pair = names
    if isinstance(pair, str) or len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(names):
        raise ValueError(
            f"Expected argument `pair` to be two distinct names from {names!r}, but got {pair!r}."
        )
    return names, (names.index(pair[0]), names.index(pair[1]))


def _cross_trigger_interaction_update(
    values: Tensor, num_parts: int, pair_index: tuple[int, int], modalities: Sequence[str] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample interaction index of one batch, reduced to ``(sum, sum of squares, count)``.

    Args:
        values: ``(B, 2^n)`` finite coalition values ``v(S)`` in bitmask order; a NaN or inf is an error
            naming its coalitions.
        num_parts: ``n``.
        pair_index: positions ``(i, j)`` of the two parts.
        modalities: the part names, for the error message.

    Returns:
        0-dim float64 sum, 0-dim float64 sum of squares, 0-dim long count ``B``.
    """
    values = _values_validation(values, num_parts, modalities, "CrossTriggerInteraction")
    cti = values @ _interaction_weights(num_parts, *pair_index).to(values.device)
    count = torch.tensor(values.shape[0], dtype=torch.long, device=values.device)
    return cti.sum(), (cti * cti).sum(), count


def _cross_trigger_interaction_compute(
    cti_sum: Tensor, cti_sq_sum: Tensor, count: Tensor, return_ci: bool = False
) -> Tensor | dict[str, Tensor]:
    """Dataset mean of the interaction; with ``return_ci`` a dict ``{"cti": mean, "cti_ci95": half-width}``."""
    mean, half_width = _mean_and_ci95(cti_sum, cti_sq_sum, count, "CrossTriggerInteraction", return_ci)
    if return_ci:
        return {"cti": mean, "cti_ci95": half_width}
    return mean


def cross_trigger_interaction(
    values: Tensor,
    modalities: Sequence[str],
    pair: Sequence[str] | None = None,
    return_ci: bool = False,
) -> Tensor | dict[str, Tensor]:
    r"""Cross-Trigger Interaction: dataset mean of the pairwise interaction of two trigger parts.

    For two parts (image I, text T):

    .. math::
        \text{CTI} = \overline{v(\{I,T\}) - v(\{I\}) - v(\{T\}) + v(\emptyset)}

    CTI > 0: the parts reinforce each other; CTI < 0: they interfere or are redundant. For ``n = 3`` parts
    the pair must be named, and the result is the Shapley interaction index of that pair (Grabisch, 1997),
    which averages the two-part formula over the coalitions :math:`S` of the other parts:

    .. math::
        I_{ij} = \sum_{S \subseteq N \setminus \{i,j\}} \frac{|S|!\,(n-|S|-2)!}{(n-1)!}\,
            [v(S \cup \{i,j\}) - v(S \cup \{i\}) - v(S \cup \{j\}) + v(S)]

    (for ``n = 3``: the mean of the two-part CTI with the third part off and with it on).

    Args:
        values: ``(B, 2^n)`` per-sample coalition values in bitmask order (see
            :mod:`metrics.functional.shapley`); for ``["image", "text"]``:
            ``v({}), v({image}), v({text}), v({image, text})``. Non-finite values are an error naming the
            coalitions that hold them.
        modalities: names of the ``n`` trigger parts.
        pair: the two parts whose interaction to measure; required when ``n > 2``.
        return_ci: return ``{"cti": mean, "cti_ci95": half-width}`` with the 95% confidence half-width
            (normal approximation, ``1.96 * s / sqrt(B)``; NaN with a warning when ``B < 2``).

    Returns:
        A 0-dim float tensor, or the dict above with ``return_ci``.

    Example:
        >>> import torch
        >>> from metrics.functional import cross_trigger_interaction
        >>> values = torch.tensor([[0.0, 0.1, 0.8, 1.0], [0.0, 0.0, 1.0, 1.0]])
        >>> cross_trigger_interaction(values, ["image", "text"])
        tensor(0.0500)
    """
    names, pair_index = _cross_trigger_interaction_arg_validation(modalities, pair, return_ci)
    cti_sum, cti_sq_sum, count = _cross_trigger_interaction_update(values, len(names), pair_index, names)
    return _cross_trigger_interaction_compute(cti_sum, cti_sq_sum, count, return_ci)
