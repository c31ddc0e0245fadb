"""Checks for non-finite (NaN or infinite) weights, shared by every family's export writer, the training
guard (:class:`callbacks.divergence.DivergenceGuard`) and ``evaluate.py``.

A diverged model is not a model: its exports would load and score (a NaN CLIP predicts one class for every
image, which reads as ASR 0.000), so writers and readers refuse it and name the first bad tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

__all__ = ["NonFiniteError", "assert_finite_state", "describe_non_finite", "non_finite_tensors"]

SHOWN = 5  # bad tensors named in a message


class NonFiniteError(FloatingPointError):
    """A loss or weights hold NaN or infinite values; the message says where and what is at fault."""


def non_finite_tensors(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> list[str]:
    """``name (n nan, m inf of k)`` for every floating tensor holding NaN or +-inf, in iteration order.

    Integer, boolean and meta tensors cannot be non-finite and are skipped. One tensor is checked at a
    time, so the temporary masks stay as small as the largest tensor.
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    bad = []
    for name, tensor in items:
        if not tensor.is_floating_point() or tensor.is_meta:
            continue
        tensor = tensor.detach()
        if bool(torch.isfinite(tensor).all()):
            continue
        nan = int(torch.isnan(tensor).sum())
        inf = tensor.numel() - nan - int(torch.isfinite(tensor).sum())
        bad.append(f"{name} ({nan} nan, {inf} inf of {tensor.numel()})")
    return bad


def describe_non_finite(bad: list[str], total: int) -> str:
    """``3 of 40 tensors hold non-finite values: a (...), b (...), c (...)`` with at most ``SHOWN`` named."""
    shown = ", ".join(bad[:SHOWN]) + (f", ... ({len(bad) - SHOWN} more)" if len(bad) > SHOWN else "")
    return f"{len(bad)} of {total} tensors hold non-finite values: {shown}"


def assert_finite_state(
    state: Mapping[str, torch.Tensor],
    where: str,
    hint: str = "the training run diverged; lower the learning rate or check the data",
) -> None:
    """Raise :class:`NonFiniteError` naming ``where`` (the file or folder), the first non-finite tensors
    and ``hint`` (what to do)."""
    bad = non_finite_tensors(state)
    if bad:
        raise NonFiniteError(
            f"{where}: refusing non-finite weights, {describe_non_finite(bad, len(state))} ({hint})"
        )
