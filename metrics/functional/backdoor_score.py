"""The continuous backdoor score of the modality-collapse paper: v = cos(z, z_target) - cos(z, z_clean)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _embedding_validation(z: Tensor, name: str, batch: int | None) -> Tensor:
    """``(B, D)`` (or ``(D,)``, broadcast to every sample) finite, non-zero embeddings, as ``(B or 1, D)``."""
    if not isinstance(z, Tensor) or z.ndim not in (1, 2) or not z.is_floating_point():
        got = f"{z.dtype} tensor of shape {tuple(z.shape)}" if isinstance(z, Tensor) else type(z)
        raise ValueError(
            f"backdoor_score: expected `{name}` to be float embeddings (B, D) or (D,), but got {got}."
        )
    z = z.unsqueeze(0) if z.ndim == 1 else z
    if batch is not None and z.shape[0] not in (1, batch):
        raise ValueError(
            f"backdoor_score: `{name}` holds {z.shape[0]} embeddings for {batch} outputs; give 1 or {batch}."
        )
    bad = ~torch.isfinite(z).all(dim=1)
    if bool(bad.any()):
        raise ValueError(
            f"backdoor_score: {int(bad.sum())} of {z.shape[0]} embeddings of `{name}` hold NaN or inf (rows"
            f" {bad.nonzero().flatten()[:10].tolist()}); check the judge and the images it embedded."
        )
    zero = z.norm(dim=1) == 0
    if bool(zero.any()):
        raise ValueError(
            f"backdoor_score: {int(zero.sum())} embeddings of `{name}` are zero vectors (rows"
            f" {zero.nonzero().flatten()[:10].tolist()}); their cosine similarity is undefined."
        )
    return z


def backdoor_score(z_output: Tensor, z_target: Tensor, z_clean: Tensor) -> Tensor:
    r"""Per-sample continuous backdoor score :math:`v(S)` of the modality-collapse paper.

    .. math::
        v(S) = \cos(z_S, z_{\text{target}}) - \cos(z_S, z_{\text{clean}})

    where :math:`z_S` is the (CLIP image) embedding of the output produced with the trigger parts in
    :math:`S` active, :math:`z_{\text{target}}` that of the backdoor target image and :math:`z_{\text{clean}}`
    that of the **clean reference output** for the same input: what the editor should have produced without
    any trigger. :func:`model_families.pix2pix.evaluation.evaluate_coalitions` takes it, by default, to be the
    evaluated model's own output under coalition ``none`` with the same noise (then :math:`v(\emptyset) =
    \cos(z_\emptyset, z_{\text{target}}) - 1`), or the clean model's output on the clean input when given
    (the paper's reading). :math:`v \in [-2, 2]`; :math:`v > 0` means the output is closer to the target
    than to the clean reference. Embeddings need not be normalised (the cosine normalises).

    Args:
        z_output: ``(B, D)`` embeddings :math:`z_S` of the outputs.
        z_target: ``(D,)`` (one target) or ``(B, D)``.
        z_clean: ``(B, D)`` clean-reference embeddings (or ``(D,)``).

    Returns:
        ``(B,)`` float tensor. Non-finite or zero embeddings are a ``ValueError`` naming the argument and rows.

    Example:
        >>> import torch
        >>> from metrics.functional import backdoor_score
        >>> z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> backdoor_score(z, torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
        tensor([ 1., -1.])
    """
    z_output = _embedding_validation(z_output, "z_output", None)
    batch = z_output.shape[0]
    z_target = _embedding_validation(z_target, "z_target", batch)
    z_clean = _embedding_validation(z_clean, "z_clean", batch)
    for name, z in (("z_target", z_target), ("z_clean", z_clean)):
        if z.shape[1] != z_output.shape[1]:
            raise ValueError(
                f"backdoor_score: `{name}` has dimension {z.shape[1]}, `z_output` {z_output.shape[1]}; embed them"
                " with the same model."
            )
    return F.cosine_similarity(z_output, z_target, dim=1) - F.cosine_similarity(z_output, z_clean, dim=1)
