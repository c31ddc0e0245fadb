"""The size of a domain shift: the two-sample Kolmogorov-Smirnov statistic between the distributions of
embedding similarities of source- and target-domain samples (the LVLM domain-shift study measures each shift
this way with CLIP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["centroid_similarities", "ks_statistic", "similarity_ks"]


def _sample_validation(values: Tensor, name: str) -> Tensor:
    if not isinstance(values, Tensor) or values.ndim != 1 or values.numel() == 0:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"Expected `{name}` to be a non-empty 1-D tensor of samples, but got {shape}.")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"Expected `{name}` to hold only finite values (a broken model gives NaN/inf).")
    return values.detach().double()


def ks_statistic(source: Tensor, target: Tensor) -> Tensor:
    r"""Two-sample Kolmogorov-Smirnov statistic :math:`D = \sup_x |F_{src}(x) - F_{tgt}(x)|` of the
    empirical CDFs (what ``scipy.stats.ks_2samp(source, target).statistic`` returns), in [0, 1].

    Example:
        >>> import torch
        >>> ks_statistic(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.5, 3.5]))
        tensor(0.6667)
    """
    source = _sample_validation(source, "source")
    target = _sample_validation(target, "target").to(source.device)
    a, _ = source.sort()
    b, _ = target.sort()
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True).double() / a.numel()
    cdf_b = torch.searchsorted(b, points, right=True).double() / b.numel()
    return (cdf_a - cdf_b).abs().max().to(torch.get_default_dtype())


def centroid_similarities(embeddings: Tensor, centroid: Tensor) -> Tensor:
    """Cosine similarity of each row of ``embeddings`` (N x D) to ``centroid`` (D,)."""
    if embeddings.ndim != 2 or centroid.ndim != 1 or embeddings.shape[1] != centroid.shape[0]:
        raise ValueError(
            f"Expected embeddings N x D and a centroid of D values, got {tuple(embeddings.shape)} and "
            f"{tuple(centroid.shape)}."
        )
    return F.normalize(embeddings.double(), dim=-1) @ F.normalize(centroid.double(), dim=0)


def similarity_ks(source_embeddings: Tensor, target_embeddings: Tensor) -> Tensor:
    """KS statistic of a shift from embeddings: each sample's cosine similarity to the source domain's mean
    (normalised) embedding, source samples against target samples. 0 when the target domain looks like the
    source domain to the encoder; 1 when no target sample is as close to the source centroid as any source
    sample (or the reverse)."""
    for name, value in (("source_embeddings", source_embeddings), ("target_embeddings", target_embeddings)):
        if not isinstance(value, Tensor) or value.ndim != 2 or not bool(torch.isfinite(value).all()):
            raise ValueError(f"Expected `{name}` to be a finite N x D tensor of embeddings.")
    centroid = F.normalize(source_embeddings.double(), dim=-1).mean(0)
    return ks_statistic(
        centroid_similarities(source_embeddings, centroid),
        centroid_similarities(target_embeddings.to(source_embeddings.device), centroid),
    )
