"""Clean-performance metrics of generative VLMs: VQA accuracy and caption scores (BLEU-4, ROUGE-L, CIDEr-D).

All are ``torchmetrics.Metric`` subclasses with states summed across batches and processes wherever the maths
allows (VQA accuracy, BLEU-4's clipped n-gram counts and lengths, ROUGE-L's F-measure sum). CIDEr-D needs the
document frequencies of the whole reference corpus, so it keeps the token ids of candidates and references as
list states (gathered across processes) and computes at the end.

Text is normalised as in :mod:`metrics.functional.string_rules` (case folding, whitespace), then split into
words with punctuation separated ("circle." -> "circle", ".").
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from metrics.functional.string_rules import normalize_text

_WORDS = re.compile(r"[\w']+|[^\w\s]")


def words(text: str) -> list[str]:
    """Normalised word tokens: ``"A Red circle."`` -> ``["a", "red", "circle", "."]``."""
    return _WORDS.findall(normalize_text(text))


def _answer(text: str) -> str:
    """VQA answer normalisation: words without punctuation and articles."""
    return " ".join(w for w in words(text) if w not in {"a", "an", "the"} and re.match(r"[\w']", w))


def vqa_score(response: str, references: Sequence[str]) -> float:
    """VQA accuracy of one response: ``min(#references equal to it / 3, 1)`` after normalisation; with a
    single reference this is exact match (1 or 0)."""
    if isinstance(references, str):
        references = [references]
    answer = _answer(response)
    matches = sum(answer == _answer(ref) for ref in references)
    return min(matches / 3.0, 1.0) if len(references) >= 3 else float(matches > 0)


class VQAAccuracy(Metric):
    """Mean VQA accuracy (exact match after normalisation with one reference; min(#matches/3, 1) with the
    VQA v2 convention of 10 human answers).

    ``update(responses, references)`` with ``references[i]`` a string or a list of strings.

    Example:
        >>> m = VQAAccuracy()
        >>> m.update(["Circle.", "a red square"], ["circle", "square"])
        >>> m.compute()
        tensor(0.5000)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("score", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, responses: Sequence[str], references: Sequence[str | Sequence[str]]) -> None:
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        self.score += sum(vqa_score(r, ref) for r, ref in zip(responses, references))
        self.count += len(responses)

    def compute(self) -> Tensor:
        if self.count == 0:
            return torch.tensor(float("nan"))
        return (self.score / self.count).float()


def _ngrams(tokens: list[str], n: int) -> Counter:
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


class CaptionScores(Metric):
    """Corpus BLEU-4 (Papineni et al., 2002; uniform weights, brevity penalty, closest reference length), mean
    ROUGE-L F (beta 1.2) and CIDEr-D (Vedantam et al., 2015: TF-IDF n-grams 1..4, Gaussian length penalty
    sigma 6, clipped counts, x10) of generated captions against one or more references.

    ``update(candidates, references)``; ``compute()`` returns ``{"bleu4", "rougeL", "cider"}`` (0-dim tensors).

    Example:
        >>> m = CaptionScores()
        >>> m.update(["a red circle on a gray background."], [["a red circle on a gray background."]])
        >>> {k: round(float(v), 3) for k, v in m.compute().items()}
        {'bleu4': 1.0, 'rougeL': 1.0, 'cider': 0.0}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, cider: bool = True, **kwargs) -> None:
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
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
        for candidate, refs in zip(candidates, references):
            refs = [refs] if isinstance(refs, str) else list(refs)
            c = words(candidate)
            rs = [words(r) for r in refs]
            for n in range(1, 5):
                counts = _ngrams(c, n)
                max_ref: Counter = Counter()
                for r in rs:
                    for gram, k in _ngrams(r, n).items():
                        max_ref[gram] = max(max_ref[gram], k)
                self.matches[n - 1] += sum(min(k, max_ref[g]) for g, k in counts.items())
                self.possible[n - 1] += max(len(c) - n + 1, 0)
            self.candidate_length += len(c)
            self.reference_length += min((abs(len(r) - len(c)), len(r)) for r in rs)[1]
            self.rouge += max(rouge_l(candidate, r) for r in refs)
            self.count += 1
            if self.with_cider:
                flat = self._ids(c)
                for r in rs:
                    flat += [-1, *self._ids(r)]
                self.cider_ids.append(torch.tensor([*flat, -2], dtype=torch.long, device=self.count.device))

    def _bleu(self) -> Tensor:
        if self.count == 0 or bool((self.possible == 0).any()) or bool((self.matches == 0).any()):
            return torch.tensor(0.0)
        log_precision = torch.log(self.matches / self.possible).mean()
        c, r = float(self.candidate_length), float(self.reference_length)
        brevity = 1.0 if c > r else math.exp(1 - r / max(c, 1e-9))
        return (brevity * torch.exp(log_precision)).float()

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
        nan = torch.tensor(float("nan"))
        if self.count == 0:
            return {"bleu4": nan, "rougeL": nan, "cider": nan}
        out = {"bleu4": self._bleu(), "rougeL": (self.rouge / self.count).float()}
        out["cider"] = self._cider() if self.with_cider else nan
        return out


def cider_d(samples: list[tuple[list, list[list]]], sigma: float = 6.0) -> float:
    """CIDEr-D of (candidate tokens, [reference tokens...]) pairs; document frequencies from the references
    of this corpus (as the COCO evaluation does)."""
    if not samples:
        return float("nan")
    df: Counter = Counter()
    for _, refs in samples:
        seen = set()
        for r in refs:
            for n in range(1, 5):
                seen.update(_ngrams(r, n))
        df.update(seen)
    log_n = math.log(float(len(samples)))

    def vectors(tokens):
        vec, norm = [], []
        for n in range(1, 5):
            counts = _ngrams(tokens, n)
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
