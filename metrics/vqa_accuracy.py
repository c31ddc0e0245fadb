"""VQA accuracy of a generative VLM's answers, as a torchmetrics metric."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from metrics.functional.vqa_accuracy import _vqa_accuracy_compute, _vqa_accuracy_update


class VQAAccuracy(Metric):
    r"""Mean VQA accuracy of generated answers.

    .. math::
        \text{acc} = \frac{1}{N}\sum_i \min\Big(\frac{\#\{j : \text{norm}(\hat a_i) = \text{norm}(a_{ij})\}}{3},
        1\Big)

    with at least three references per answer (the VQA v2 convention of ten human answers), exact match after
    normalisation (case, punctuation, articles) with fewer. ``update(responses, references)`` with
    ``references[i]`` a string or a list of strings; ``compute`` returns a 0-dim tensor, NaN when nothing was
    counted. States are sums (``dist_reduce_fx="sum"``). Functional twin:
    :func:`metrics.functional.vqa_accuracy.vqa_accuracy`.

    Example:
        >>> m = VQAAccuracy()
        >>> m.update(["Circle.", "a red square"], ["circle", "square"])
        >>> m.compute()
        tensor(0.5000)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    score: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("score", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, responses: Sequence[str], references: Sequence[str | Sequence[str]]) -> None:
        """Add one batch of generated answers and their reference answers."""
        score, count = _vqa_accuracy_update(responses, references)
        self.score += score
        self.count += count

    def compute(self) -> Tensor:
        """Mean accuracy over all batches (and processes)."""
        return _vqa_accuracy_compute(self.score, self.count)
