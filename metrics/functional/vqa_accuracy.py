"""VQA accuracy of generated answers, as plain functions.

An answer is normalised as a caption word list (:func:`metrics.functional.caption_scores.words`) without
punctuation and articles, then compared with each reference: ``min(#references equal to it / 3, 1)`` with
the VQA v2 convention of (at least three, usually ten) human answers, exact match with fewer references.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from metrics.functional.caption_scores import check_texts, reference_list, words


def normalize_answer(text: str) -> str:
    """VQA answer normalisation: words without punctuation and articles (``"A circle."`` -> ``"circle"``)."""
    return " ".join(w for w in words(text) if w not in {"a", "an", "the"} and re.match(r"[\w']", w))


def vqa_score(response: str, references: str | Sequence[str]) -> float:
    """VQA accuracy of one response: ``min(#references equal to it / 3, 1)`` after normalisation; with fewer
    than three references this is exact match (1 or 0)."""
    references = reference_list(references)
    answer = normalize_answer(response)
    matches = sum(answer == normalize_answer(ref) for ref in references)
    return min(matches / 3.0, 1.0) if len(references) >= 3 else float(matches > 0)


def _vqa_accuracy_update(
    responses: Sequence[str], references: Sequence[str | Sequence[str]]
) -> tuple[float, int]:
    """Sum of the per-response scores and the number of responses."""
    check_texts("responses", responses, references)
    return sum(vqa_score(r, ref) for r, ref in zip(responses, references)), len(responses)


def _vqa_accuracy_compute(score: Tensor, count: Tensor) -> Tensor:
    """Mean score; NaN when nothing was counted."""
    if count == 0:
        return torch.tensor(float("nan"))
    return (score / count).float()


def vqa_accuracy(responses: Sequence[str], references: Sequence[str | Sequence[str]]) -> Tensor:
    """Mean VQA accuracy of ``responses`` (0-dim tensor; NaN for no response).

    Example:
        >>> vqa_accuracy(["Circle.", "a red square"], ["circle", "square"])
        tensor(0.5000)
    """
    score, count = _vqa_accuracy_update(responses, references)
    return _vqa_accuracy_compute(torch.tensor(score, dtype=torch.float64), torch.tensor(count))
