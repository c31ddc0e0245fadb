"""Caption scores of a generative VLM (BLEU-4, ROUGE-L, CIDEr-D), as a torchmetrics metric.

BLEU-4's clipped n-gram counts and lengths and ROUGE-L's F-measure sum are sum states. CIDEr-D needs the
document frequencies of the whole reference corpus, so it keeps the (hashed) word ids of candidates and
references as a list state (gathered across processes) and computes at the end.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from metrics.functional.caption_scores import (
    _bleu4_compute,
    _bleu_counts,
    check_texts,
    cider_d,
    reference_list,
    rouge_l,
    words,
)


class CaptionScores(Metric):
    """Corpus BLEU-4 (Papineni et al., 2002; uniform weights, brevity penalty, closest reference length), mean
    ROUGE-L F (beta 1.2) and CIDEr-D (Vedantam et al., 2015: TF-IDF n-grams 1..4, Gaussian length penalty
    sigma 6, clipped counts, x10) of generated captions against one or more references; the formulas of
    :mod:`metrics.functional.caption_scores` (functional twin: ``caption_scores``).

    ``update(candidates, references)``; ``compute()`` returns ``{"bleu4", "rougeL", "cider"}`` (0-dim tensors,
    NaN when no caption was counted).

    Args:
        cider: keep the word ids for CIDEr-D (False: ``cider`` is NaN and no list state grows).

    Example:
        >>> m = CaptionScores()
        >>> m.update(["a red circle on a gray background."], [["a red circle on a gray background."]])
        >>> {k: round(float(v), 3) for k, v in m.compute().items()}
        {'bleu4': 1.0, 'rougeL': 1.0, 'cider': 0.0}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, cider: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.with_cider = cider
        self.add_state("matches", default=torch.zeros(4, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("possible", default=torch.zeros(4, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(
            "candidate_length", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "reference_length", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("rouge", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        # CIDEr: hashed word ids of each caption, separated by -1 between references, -2 ending a sample.
        self.add_state("cider_ids", default=[], dist_reduce_fx="cat")

    @staticmethod
    def _ids(tokens: list[str]) -> list[int]:
        # A stable hash (not a per-process vocabulary), so ids agree across DDP ranks.
        return [zlib.crc32(t.encode("utf-8")) for t in tokens]

    def update(self, candidates: Sequence[str], references: Sequence[str | Sequence[str]]) -> None:
        """Add one batch of generated captions and their reference captions."""
        check_texts("candidates", candidates, references)
        for candidate, refs in zip(candidates, references):
            refs = reference_list(refs)
            c = words(candidate)
            rs = [words(r) for r in refs]
            matches, possible, closest = _bleu_counts(c, rs)
            for n in range(4):
                self.matches[n] += matches[n]
                self.possible[n] += possible[n]
            self.candidate_length += len(c)
            self.reference_length += closest
            self.rouge += max(rouge_l(candidate, r) for r in refs)
            self.count += 1
            if self.with_cider:
                flat = self._ids(c)
                for r in rs:
                    flat += [-1, *self._ids(r)]
                self.cider_ids.append(torch.tensor([*flat, -2], dtype=torch.long, device=self.count.device))

    def _cider(self) -> Tensor:
        ids = self.cider_ids
        if isinstance(ids, list):
            ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
        samples, current, caption = [], [], []
        for value in ids.tolist():
            if value == -2:
                current.append(caption)
                samples.append((current[0], current[1:]))
                current, caption = [], []
            elif value == -1:
                current.append(caption)
                caption = []
            else:
                caption.append(value)
        return torch.tensor(cider_d(samples), dtype=torch.float32)

    def compute(self) -> dict[str, Tensor]:
        """The three scores over all batches (and processes)."""
        nan = torch.tensor(float("nan"))
        if self.count == 0:
            return {"bleu4": nan, "rougeL": nan, "cider": nan}
        bleu = _bleu4_compute(
            self.matches, self.possible, self.candidate_length, self.reference_length, int(self.count)
        )
        out = {"bleu4": bleu, "rougeL": (self.rouge / self.count).float()}
        out["cider"] = self._cider() if self.with_cider else nan
        return out
