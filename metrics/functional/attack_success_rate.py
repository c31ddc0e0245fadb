"""Attack success rate (ASR) for classification: the share of triggered inputs predicted as the target class."""

from __future__ import annotations

import torch
from torch import Tensor

from metrics.functional._stats import _ratio_or_nan


def _attack_success_rate_arg_validation(target_class: int, exclude_target_class: bool) -> None:
    if isinstance(target_class, bool) or not isinstance(target_class, int) or target_class < 0:
        raise ValueError(
            f"Expected argument `target_class` to be a non-negative int, but got {target_class!r}."
        )
    if not isinstance(exclude_target_class, bool):
        raise ValueError(
            f"Expected argument `exclude_target_class` to be a bool, but got {exclude_target_class!r}."
        )


def _logits_validation(logits: Tensor) -> None:
    """Reject rows of ``(B, C)`` logits whose argmax means nothing: a NaN, or a maximum that is not finite.

    ``argmax`` of an all-NaN row is class 0, so a diverged model would count as a success whenever the
    target is class 0 and as a failure otherwise (what a working defense looks like). ``-inf`` entries for
    masked classes are fine as long as some class has a finite score.
    """
    if logits.numel() == 0:
        return
    bad = logits.isnan().any(dim=1) | ~torch.isfinite(logits.amax(dim=1))
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        shown = ", ".join(str(int(r)) for r in rows[:10]) + (", ..." if rows.numel() > 10 else "")
        raise ValueError(
            f"AttackSuccessRate: {rows.numel()} of {logits.shape[0]} rows of the logits `preds` are not finite"
            f" (a NaN, +inf, or no finite class score; rows {shown}), so their argmax is meaningless and"
            " would silently count as a hit or a miss. Check the model (non-finite weights or activations)."
        )


def _attack_success_rate_update(
    preds: Tensor,
    labels: Tensor | None,
    target_class: int,
    exclude_target_class: bool,
) -> tuple[Tensor, Tensor]:
    """Count successes and counted samples in one batch.

    Args:
        preds: predicted class indices ``(B,)`` (integer) or logits/scores ``(B, C)`` (float, argmax taken);
            a row with a NaN or no finite maximum is an error naming the rows.
        labels: true class indices ``(B,)``; required when ``exclude_target_class`` is true.
        target_class: the backdoor target class index.
        exclude_target_class: drop the inputs whose true class is the target.

    Returns:
        ``(successes, counted)``, two 0-dim long tensors.
    """
    if preds.is_floating_point():
        if preds.ndim != 2:
            raise ValueError(
                f"Expected float `preds` to be logits of shape (B, C), but got shape {tuple(preds.shape)}."
            )
        if target_class >= preds.shape[1]:
            raise ValueError(
                f"Argument `target_class`={target_class} is out of range for logits with {preds.shape[1]} classes."
            )
        _logits_validation(preds)
        preds = preds.argmax(dim=1)
    elif preds.dtype == torch.bool or preds.ndim != 1:
        raise ValueError(
            "Expected `preds` to be integer class indices of shape (B,) or float logits of shape (B, C), but got"
            f" dtype {preds.dtype} and shape {tuple(preds.shape)}."
        )

    counted_mask = torch.ones_like(preds, dtype=torch.bool)
    if labels is not None:
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.shape != preds.shape:
            raise ValueError(
                f"Expected `labels` to be integer class indices of shape {tuple(preds.shape)}, but got dtype"
                f" {labels.dtype} and shape {tuple(labels.shape)}."
            )
        if exclude_target_class:
            counted_mask = labels != target_class
    elif exclude_target_class:
        raise ValueError(
            "`labels` (the true classes) are required when `exclude_target_class=True`; pass them or set"
            " `exclude_target_class=False`."
        )

    successes = ((preds == target_class) & counted_mask).sum()
    return successes, counted_mask.sum()


def _attack_success_rate_compute(successes: Tensor, counted: Tensor) -> Tensor:
    """``ASR = successes / counted``; NaN (with a warning) when nothing was counted."""
    return _ratio_or_nan(successes, counted, "AttackSuccessRate")


def attack_success_rate(
    preds: Tensor,
    labels: Tensor | None,
    target_class: int,
    exclude_target_class: bool = True,
) -> Tensor:
    r"""Attack success rate of triggered inputs for a classifier (e.g. CLIP zero-shot).

    .. math::
        \text{ASR} = \frac{\#\{i \in C : \hat y_i = t\}}{|C|},\qquad
        C = \{i : y_i \ne t\}\ \text{if exclude\_target\_class else all inputs}

    where :math:`\hat y_i` is the prediction on the triggered input, :math:`y_i` its true class and
    :math:`t` the target class. Excluding the target class is the stricter, common form: an input that
    already belongs to the target class says nothing about the backdoor.

    Args:
        preds: ``(B,)`` predicted class indices, or ``(B, C)`` float logits (argmax taken); a row with a NaN
            or without a finite maximum is a ``ValueError`` naming the rows, never a silent hit or miss.
        labels: ``(B,)`` true class indices; required when ``exclude_target_class`` is true.
        target_class: the backdoor target class index.
        exclude_target_class: do not count inputs whose true class is ``target_class``.

    Returns:
        A 0-dim float tensor in [0, 1]; NaN (with a warning) if no input was counted.

    Example:
        >>> import torch
        >>> from metrics.functional import attack_success_rate
        >>> preds = torch.tensor([3, 3, 1, 3])
        >>> labels = torch.tensor([0, 3, 1, 2])
        >>> attack_success_rate(preds, labels, target_class=3)
        tensor(0.6667)
        >>> attack_success_rate(preds, labels, target_class=3, exclude_target_class=False)
        tensor(0.7500)
    """
    _attack_success_rate_arg_validation(target_class, exclude_target_class)
    successes, counted = _attack_success_rate_update(preds, labels, target_class, exclude_target_class)
    return _attack_success_rate_compute(successes, counted)
