"""Caption scores of generated text: corpus BLEU-4, mean ROUGE-L F and CIDEr-D, as plain functions.

Text is normalised as in :mod:`metrics.functional.string_rules` (case folding, whitespace), then split into
words with punctuation separated (``"circle."`` -> ``"circle", "."``). The formulas follow the COCO caption
evaluation (pycocoevalcap): BLEU-4 with uniform weights, clipped n-gram counts and the brevity penalty of the
closest reference length (Papineni et al., 2002); ROUGE-L with ``beta = 1.2`` (Lin, 2004); CIDEr-D with TF-IDF
n-grams 1..4, document frequencies from the references of the corpus, clipped counts, a Gaussian length
penalty (sigma 6) and a factor 10 (Vedantam et al., 2015).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from metrics.functional.string_rules import normalize_text

_WORDS = re.compile(r"[\w']+|[^\w\s]")


def words(text: str) -> list[str]:
    """Normalised word tokens: ``"A Red circle."`` -> ``["a", "red", "circle", "."]``."""
    return _WORDS.findall(normalize_text(text))


def check_texts(kind: str, texts: Sequence, references: Sequence) -> None:
    """``texts`` and ``references`` as lists of equal length, every text a string (a generator that returned
    ``None`` or ids must not be scored as an empty caption)."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"Expected `{kind}` to be a list of strings, but got {type(texts).__name__}.")
    if len(texts) != len(references):
        raise ValueError(f"{len(texts)} {kind} but {len(references)} references")
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{kind}[{row}] is {type(text).__name__} {text!r}, expected a string")


def reference_list(references: str | Sequence[str]) -> list[str]:
    """One reference or several, as a non-empty list of strings."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs or not all(isinstance(r, str) for r in refs):
        raise ValueError(
            f"Expected a reference string or a non-empty list of strings, but got {references!r}."
        )
    return refs


def ngrams(tokens: Sequence[Hashable], n: int) -> Counter:
    """Counts of the ``n``-grams of ``tokens``."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str, beta: float = 1.2) -> float:
    """ROUGE-L F-measure (Lin, 2004): ``(1 + b^2) P R / (R + b^2 P)`` from the longest common subsequence;
    ``beta = 1.2`` as in the COCO caption evaluation."""
    c, r = words(candidate), words(reference)
    lcs = _lcs(c, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def _bleu_counts(candidate: list[str], references: list[list[str]]) -> tuple[list[int], list[int], int]:
    """Clipped n-gram matches and candidate n-grams (n = 1..4), and the closest reference length."""
    matches, possible = [], []
    for n in range(1, 5):
        counts = ngrams(candidate, n)
        max_ref: Counter = Counter()
        for r in references:
            for gram, k in ngrams(r, n).items():
                max_ref[gram] = max(max_ref[gram], k)
        matches.append(sum(min(k, max_ref[g]) for g, k in counts.items()))
        possible.append(max(len(candidate) - n + 1, 0))
    closest = min((abs(len(r) - len(candidate)), len(r)) for r in references)[1]
    return matches, possible, closest


def _bleu4_compute(
    matches: Tensor, possible: Tensor, candidate_length: float, reference_length: float, count: int
) -> Tensor:
    """``BP * exp(mean_n log(matches_n / possible_n))``, ``BP = 1`` if ``c > r`` else ``exp(1 - r / c)``; 0 when
    some n-gram order has no match (no smoothing, as in the COCO evaluation)."""
    if count == 0 or bool((possible == 0).any()) or bool((matches == 0).any()):
        return torch.tensor(0.0)
    log_precision = torch.log(matches / possible).mean()
    c, r = float(candidate_length), float(reference_length)
    brevity = 1.0 if c > r else math.exp(1 - r / max(c, 1e-9))
    return (brevity * torch.exp(log_precision)).float()


def bleu4(candidates: Sequence[str], references: Sequence[str | Sequence[str]]) -> Tensor:
    """Corpus BLEU-4 of ``candidates`` against their references (see the module docstring).

    Example:
        >>> bleu4(["a red circle on a gray background."], ["a red circle on a gray background."])
        tensor(1.)
    """
    check_texts("candidates", candidates, references)
    matches = torch.zeros(4, dtype=torch.float64)
    possible = torch.zeros(4, dtype=torch.float64)
    c_len = r_len = 0
    for candidate, refs in zip(candidates, references):
        c = words(candidate)
        m, p, closest = _bleu_counts(c, [words(r) for r in reference_list(refs)])
        matches += torch.tensor(m, dtype=torch.float64)
        possible += torch.tensor(p, dtype=torch.float64)
        c_len, r_len = c_len + len(c), r_len + closest
    return _bleu4_compute(matches, possible, c_len, r_len, len(candidates))


def cider_d(samples: Sequence[tuple[Sequence, Sequence[Sequence]]], sigma: float = 6.0) -> float:
    """CIDEr-D of (candidate tokens, [reference tokens...]) pairs; document frequencies from the references
    of this corpus (as the COCO evaluation does). Tokens are any hashable values (words or word ids)."""
    if not samples:
        return float("nan")
    df: Counter = Counter()
    for _, refs in samples:
        seen = set()
        for r in refs:
            for n in range(1, 5):
                seen.update(ngrams(r, n))
        df.update(seen)
    log_n = math.log(float(len(samples)))

    def vectors(tokens):
        vec, norm = [], []
        for n in range(1, 5):
            counts = ngrams(tokens, n)
            v = {g: k * (log_n - math.log(max(1.0, df[g]))) for g, k in counts.items()}
            vec.append(v)
            norm.append(math.sqrt(sum(x * x for x in v.values())))
        return vec, norm

    total = 0.0
    for candidate, refs in samples:
        vc, nc = vectors(candidate)
        score = 0.0
        for r in refs:
            vr, nr = vectors(r)
            delta = len(candidate) - len(r)
            for n in range(4):
                dot = sum(min(x, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, x in vc[n].items())
                if nc[n] and nr[n]:
                    score += dot / (nc[n] * nr[n]) * math.exp(-(delta**2) / (2 * sigma**2))
        total += score / 4 / max(len(refs), 1) * 10.0
    return total / len(samples)


def caption_scores(candidates: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, Tensor]:
    """``{"bleu4", "rougeL", "cider"}`` of generated captions (0-dim tensors; NaN for no caption).

    Example:
        >>> scores = caption_scores(["a red circle."], [["a red circle.", "a circle."]])
        >>> round(float(scores["rougeL"]), 3), round(float(scores["cider"]), 3)
        (1.0, 0.0)
    """
    check_texts("candidates", candidates, references)
    nan = torch.tensor(float("nan"))
    if not candidates:
        return {"bleu4": nan, "rougeL": nan, "cider": nan}
    rouge = torch.tensor(0.0, dtype=torch.float64)
    samples = []
    for candidate, refs in zip(candidates, references):
        refs = reference_list(refs)
        rouge += max(rouge_l(candidate, r) for r in refs)
        samples.append((words(candidate), [words(r) for r in refs]))
    return {
        "bleu4": bleu4(candidates, references),
        "rougeL": (rouge / len(candidates)).float(),
        "cider": torch.tensor(cider_d(samples), dtype=torch.float32),
    }
