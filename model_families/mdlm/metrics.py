"""Old home of the clean-performance metrics of generative VLMs, kept so that existing imports keep working:
they live in :mod:`metrics` (``VQAAccuracy``, ``CaptionScores``) with functional twins in
:mod:`metrics.functional.vqa_accuracy` and :mod:`metrics.functional.caption_scores`."""

from metrics.caption_scores import CaptionScores
from metrics.functional.caption_scores import cider_d, rouge_l, words
from metrics.functional.vqa_accuracy import vqa_score
from metrics.vqa_accuracy import VQAAccuracy

__all__ = ["CaptionScores", "VQAAccuracy", "cider_d", "rouge_l", "vqa_score", "words"]
