"""Exact Shapley values and pairwise Shapley interaction indices for games on a few trigger parts.

Coalition order (used by every ``values`` tensor in this package): with trigger parts ``modalities =
[m_0, ..., m_{n-1}]``, column ``k`` of a ``B x 2^n`` values tensor holds ``v(S)`` for the coalition ``S`` whose
bitmask is ``k`` (bit ``m`` set = part ``m_m`` active). For ``["image", "text"]``: column 0 = {} (no trigger),
1 = {image}, 2 = {text}, 3 = {image, text}. :func:`coalition_order` lists it; :func:`coalition_index` maps
a set of part names to its column.

Both quantities are linear in ``v``, so each is a fixed weight vector over the coalitions: per-sample values
are one matrix product, and the dataset mean of per-sample values equals the value of the mean game.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache
from math import factorial

import torch
from torch import Tensor

#: Largest number of trigger parts accepted (2^n model passes per sample; 2 or 3 in practice).
MAX_PARTS = 6


def _modalities_validation(modalities: Sequence[str]) -> tuple[str, ...]:
    if isinstance(modalities, str) or not isinstance(modalities, Sequence):
        raise ValueError(f"Expected argument `modalities` to be a list of names, but got {modalities!r}.")
    names = tuple(modalities)
    if not 2 <= len(names) <= MAX_PARTS:
        raise ValueError(
            f"Expected argument `modalities` to name 2 to {MAX_PARTS} trigger parts, but got {len(names)}: {names!r}."
        )
    if not all(isinstance(name, str) and name for name in names) or len(set(names)) != len(names):
        raise ValueError(
            f"Expected argument `modalities` to hold distinct non-empty strings, but got {names!r}."
        )
    return names


def coalition_order(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """Coalitions in column order: entry ``k`` holds the parts whose bits are set in ``k``.

    Example:
        >>> coalition_order(["image", "text"])
        [(), ('image',), ('text',), ('image', 'text')]
    """
    names = _modalities_validation(modalities)
    return [tuple(name for m, name in enumerate(names) if k >> m & 1) for k in range(2 ** len(names))]


def coalition_index(active: Iterable[str], modalities: Sequence[str]) -> int:
    """Column of the coalition made of the parts ``active``: ``sum(2**modalities.index(m) for m in active)``.

    Example:
        >>> coalition_index(["text"], ["image", "text"])
        2
    """
    names = _modalities_validation(modalities)
    index = 0
    for name in set(active):
        if name not in names:
            raise ValueError(f"Unknown trigger part {name!r}; expected one of {names!r}.")
        index |= 1 << names.index(name)
    return index


@cache
@torch.inference_mode(False)
def _shapley_weights(n: int) -> Tensor:
    r"""``2^n x n`` float64 matrix ``W`` with ``phi = v @ W`` the exact Shapley values.

    .. math::
        \phi_i = \sum_{S \subseteq N \setminus \{i\}} \frac{|S|!\,(n-|S|-1)!}{n!}\,[v(S \cup \{i\}) - v(S)]

    Cached, so it is built outside inference mode: a tensor first made under ``torch.inference_mode`` (e.g. in a
    validation step) could not take part in a later differentiable computation.
    """
    weights = torch.zeros(2**n, n, dtype=torch.float64)
    for i in range(n):
        for coalition in range(2**n):
            if coalition >> i & 1:
                continue
            size = coalition.bit_count()
            weight = factorial(size) * factorial(n - size - 1) / factorial(n)
            weights[coalition | 1 << i, i] += weight
            weights[coalition, i] -= weight
    return weights


@cache
@torch.inference_mode(False)
def _interaction_weights(n: int, i: int, j: int) -> Tensor:
    r"""``2^n`` float64 vector ``w`` with ``v @ w`` the Shapley interaction index of parts ``i`` and ``j``.

    .. math::
        I_{ij} = \sum_{S \subseteq N \setminus \{i,j\}} \frac{|S|!\,(n-|S|-2)!}{(n-1)!}\,
            [v(S \cup \{i,j\}) - v(S \cup \{i\}) - v(S \cup \{j\}) + v(S)]

    For ``n = 2`` this is ``v({i,j}) - v({i}) - v({j}) + v({})`` (Grabisch, 1997). Built outside inference mode,
    like :func:`_shapley_weights`.
    """
    weights = torch.zeros(2**n, dtype=torch.float64)
    pair = 1 << i | 1 << j
    for coalition in range(2**n):
        if coalition & pair:
            continue
        size = coalition.bit_count()
        weight = factorial(size) * factorial(n - size - 2) / factorial(n - 1)
        weights[coalition | pair] += weight
        weights[coalition | 1 << i] -= weight
        weights[coalition | 1 << j] -= weight
        weights[coalition] += weight
    return weights


def _values_validation(
    values: Tensor, n: int, modalities: Sequence[str] | None = None, metric_name: str | None = None
) -> Tensor:
    """Check a ``B x 2^n`` tensor of finite coalition values and return it as float64.

    A NaN or infinite ``v(S)`` is an error naming each coalition that holds one and how many: summed into a
    metric's state it would make every later result NaN, and it means the model or score that produced it
    is broken. ``modalities`` (the part names) and ``metric_name`` only make the message clearer.
    """
    who = f"{metric_name}: e" if metric_name else "E"
    if not isinstance(values, Tensor) or values.ndim != 2 or values.shape[1] != 2**n:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(
            f"{who}xpected `values` to be a tensor of shape (B, {2**n}) (one column per coalition of {n} trigger"
            f" parts, bitmask order), but got {shape}."
        )
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        names = tuple(modalities) if modalities is not None else tuple(f"part {m}" for m in range(n))
        per_column = (~finite).sum(dim=0).tolist()
        coalitions = ", ".join(
            f"column {k} = {{{', '.join(names[m] for m in range(n) if k >> m & 1)}}}: {bad}"
            for k, bad in enumerate(per_column)
            if bad
        )
        rows = int((~finite).any(dim=1).sum())
        raise ValueError(
            f"{who}xpected finite coalition values, but {sum(per_column)} of {values.numel()} are NaN or inf"
            f" ({rows} of {values.shape[0]} rows; non-finite per coalition: {coalitions}). Added to the metric"
            " they would make it NaN for good; check the model or the score that produced them."
        )
    return values.to(torch.float64)


def _num_parts(values: Tensor) -> int:
    """Number of trigger parts ``n`` of a ``B x 2^n`` values tensor (``n >= 2``)."""
    columns = values.shape[-1] if isinstance(values, Tensor) and values.ndim == 2 else 0
    n = columns.bit_length() - 1
    if n < 2 or columns != 2**n:
        _values_validation(values, 2)  # raises with the shape that was expected and the one given
    return n


def shapley_values(values: Tensor) -> Tensor:
    """Per-sample exact Shapley values: ``(B, 2^n)`` coalition values -> ``(B, n)`` float64.

    A NaN or inf value is a ``ValueError`` naming its coalitions.

    Example:
        >>> import torch
        >>> shapley_values(torch.tensor([[0.0, 0.2, 0.6, 1.0]]))
        tensor([[0.3000, 0.7000]], dtype=torch.float64)
    """
    n = _num_parts(values)
    values = _values_validation(values, n)
    return values @ _shapley_weights(n).to(values.device)


def interaction_index(values: Tensor, i: int = 0, j: int = 1) -> Tensor:
    """Per-sample pairwise Shapley interaction index of parts ``i`` and ``j``: ``(B, 2^n)`` -> ``(B,)`` float64.

    A NaN or inf value is a ``ValueError`` naming its coalitions.

    Example:
        >>> import torch
        >>> interaction_index(torch.tensor([[0.0, 0.2, 0.6, 1.0]]))
        tensor([0.2000], dtype=torch.float64)
    """
    n = _num_parts(values)
    values = _values_validation(values, n)
    if not (0 <= i < n and 0 <= j < n and i != j):
        raise ValueError(f"Expected two distinct part indices in [0, {n}), but got i={i!r}, j={j!r}.")
    return values @ _interaction_weights(n, i, j).to(values.device)
