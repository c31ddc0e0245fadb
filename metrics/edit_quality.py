"""Clean edit quality of an image editor (MSE and SSIM to the exact edit; judged edit accuracy), as metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from metrics.functional.edit_quality import (
    _edit_accuracy_compute,
    _edit_accuracy_update,
    _edit_quality_compute,
    _edit_quality_update,
)


class EditQuality(Metric):
    r"""Mean per-image MSE and SSIM of edited images against the exact edits, in [0, 1] pixels.

    .. math::
        \text{MSE} = \frac{1}{N}\sum_b \tfrac{1}{CHW}\lVert x_b - y_b\rVert_2^2,\qquad
        \text{SSIM} = \frac{1}{N}\sum_b \text{SSIM}(x_b, y_b)

    SSIM is torchmetrics' ``structural_similarity_index_measure`` (Gaussian window 11, sigma 1.5,
    ``data_range=1``), per image, so the states are sums and a count and the result does not depend on how
    the set is batched.

    As input to ``update``:

    - ``preds``: ``(B, C, H, W)`` edited images in [0, 1] (a NaN image or one outside [0, 1] is a
      ``ValueError`` naming the rows, raised before the state changes).
    - ``target``: ``(B, C, H, W)`` exact edits in [0, 1].

    ``compute`` returns ``{"mse": ..., "ssim": ...}`` (0-dim float tensors; NaN with a warning when empty).

    Example:
        >>> import torch
        >>> from metrics import EditQuality
        >>> quality = EditQuality()
        >>> target = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> quality.update(target, target)
        >>> {k: round(v.item(), 4) for k, v in quality.compute().items()}
        {'mse': 0.0, 'ssim': 1.0}
    """

    is_differentiable = False
    higher_is_better = None  # MSE: lower is better; SSIM: higher is better
    full_state_update = False

    mse_sum: Tensor
    ssim_sum: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("mse_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ssim_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add one batch of edited images and their exact edits."""
        mse_sum, ssim_sum, count = _edit_quality_update(preds, target)
        self.mse_sum += mse_sum
        self.ssim_sum += ssim_sum
        self.count += count

    def compute(self) -> dict[str, Tensor]:
        """Mean MSE and SSIM over all batches (and all processes)."""
        return _edit_quality_compute(self.mse_sum, self.ssim_sum, self.count)


class EditAccuracy(Metric):
    r"""Share of edits that show the attribute their instruction asked for, by a judge's predictions.

    .. math::
        \text{acc} = \frac{1}{N}\sum_b \mathbb{1}[\hat a_b = a_b]

    As input to ``update``:

    - ``predicted``: ``B`` attribute names a judge sees on the edited images (e.g. the zero-shot class of
      :meth:`model_families.clip.judge.ClipJudge.classify` among the attribute's values).
    - ``requested``: ``B`` attribute names the instructions asked for (the batch's ``attribute``).

    Example:
        >>> from metrics import EditAccuracy
        >>> accuracy = EditAccuracy()
        >>> accuracy.update(["red", "blue"], ["red", "green"])
        >>> accuracy.update(["navy"], ["navy"])
        >>> accuracy.compute()
        tensor(0.6667)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    counted: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("counted", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predicted: Sequence[str], requested: Sequence[str]) -> None:
        """Add one batch of predicted and requested attribute names."""
        correct, counted = _edit_accuracy_update(predicted, requested, self.correct.device)
        self.correct += correct
        self.counted += counted

    def compute(self) -> Tensor:
        """Edit accuracy over all batches (and all processes)."""
        return _edit_accuracy_compute(self.correct, self.counted)
