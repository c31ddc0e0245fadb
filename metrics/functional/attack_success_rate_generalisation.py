"""ASR-G: how much of a backdoor's success survives a domain shift (the LVLM generalisation study)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.utilities import rank_zero_warn

from metrics.functional._stats import _ratio_or_nan


def _hits_validation(hits: Tensor, name: str) -> Tensor:
    if not isinstance(hits, Tensor) or hits.ndim != 1:
        shape = tuple(hits.shape) if isinstance(hits, Tensor) else type(hits).__name__
        raise ValueError(f"Expected `{name}` to be a 1-D tensor of per-sample hits (0/1), but got {shape}.")
    if hits.numel() and not bool(((hits == 0) | (hits == 1)).all()):
        raise ValueError(
            f"Expected `{name}` to hold only 0/1 (or bool) hits, but got values {hits.unique()}."
        )
    return hits


def _asr_validation(asr: Tensor | float, name: str) -> Tensor:
    asr = torch.as_tensor(asr, dtype=torch.float64)
    if bool(asr.isnan().any()) or bool(((asr < 0) | (asr > 1)).any()):
        raise ValueError(f"Expected argument `{name}` to be a rate in [0, 1], but got {asr}.")
    return asr


def _attack_success_rate_generalisation_update(
    source_hits: Tensor, target_hits: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(source successes, source count, target successes, target count)`` of one batch, as long tensors."""
    source_hits = _hits_validation(source_hits, "source_hits")
    target_hits = _hits_validation(target_hits, "target_hits")
    return (
        source_hits.long().sum(),
        torch.tensor(source_hits.numel(), dtype=torch.long, device=source_hits.device),
        target_hits.long().sum(),
        torch.tensor(target_hits.numel(), dtype=torch.long, device=target_hits.device),
    )


def _asr_g_from_rates(asr_src: Tensor | float, asr_tgt: Tensor | float) -> Tensor:
    """``min(1 + (ASR_tgt - ASR_src) / max(ASR_src, ASR_tgt), 1)``, element-wise; NaN where both ASRs are 0."""
    asr_src = _asr_validation(asr_src, "asr_src")
    asr_tgt = _asr_validation(asr_tgt, "asr_tgt")
    denominator = torch.maximum(asr_src, asr_tgt)
    if bool((denominator == 0).any()):
        rank_zero_warn(
            "ASR-G: ASR_src and ASR_tgt are both 0, so the backdoor never fired in either domain and the ratio"
            " (ASR_tgt - ASR_src) / max(ASR_src, ASR_tgt) is 0/0; NaN is returned.",
            UserWarning,
        )
    asr_g = (1 + (asr_tgt - asr_src) / denominator).clamp(max=1.0)
    return asr_g.to(torch.get_default_dtype())


def attack_success_rate_generalisation(asr_src: Tensor | float, asr_tgt: Tensor | float) -> Tensor:
    r"""ASR-G: the share of a backdoor's attack success that survives a domain shift.

    .. math::
        \text{ASR-G} = \min\left(1 + \frac{\text{ASR}_{tgt} - \text{ASR}_{src}}
            {\max(\text{ASR}_{src}, \text{ASR}_{tgt})},\ 1\right) \in [0, 1]

    ``ASR_src`` is measured in the attacker's (training) domain, ``ASR_tgt`` in the user's domain after a
    shift of the images (style) or of the instructions (paraphrase). It equals
    ``min(ASR_tgt / ASR_src, 1)``: 1 when the backdoor is at least as strong after the shift. The paper
    prints the numerator as ``ASR_src - ASR_tgt``, but its own table only fits ``ASR_tgt - ASR_src`` (BadNets
    with ASR_tgt = 7.68% has ASR-G = 0.08); this implementation follows the table.

    Args:
        asr_src: source-domain ASR in [0, 1] (float or tensor; tensors broadcast element-wise).
        asr_tgt: target-domain ASR in [0, 1].

    Returns:
        A float tensor of the broadcast shape; NaN (with a warning) where both ASRs are 0, since the
        backdoor never fired and its survival is undefined.

    Example:
        >>> from metrics.functional import attack_success_rate_generalisation
        >>> attack_success_rate_generalisation(0.96, 0.0768)
        tensor(0.0800)
        >>> attack_success_rate_generalisation(0.5, 0.9)
        tensor(1.)
    """
    return _asr_g_from_rates(asr_src, asr_tgt)


def _attack_success_rate_generalisation_compute(
    src_successes: Tensor, src_counted: Tensor, tgt_successes: Tensor, tgt_counted: Tensor
) -> Tensor:
    """ASR-G from accumulated hit counts (NaN with a warning if a domain has no samples)."""
    asr_src = _ratio_or_nan(src_successes, src_counted, "AttackSuccessRateGeneralisation (source domain)")
    asr_tgt = _ratio_or_nan(tgt_successes, tgt_counted, "AttackSuccessRateGeneralisation (target domain)")
    if bool(asr_src.isnan()) or bool(asr_tgt.isnan()):
        return torch.tensor(float("nan"), dtype=torch.get_default_dtype(), device=src_successes.device)
    return _asr_g_from_rates(asr_src, asr_tgt).to(src_successes.device)
