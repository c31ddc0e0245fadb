"""Evaluation of models on the evaluation sets of a datamodule, framework-free (the Lightning modules only
call it): :mod:`evaluation.generative` for generative VLMs of any family."""

from evaluation.generative import CAPTION_TASKS, GenerativeEvaluator, evaluate_generative, is_caption_task

__all__ = ["CAPTION_TASKS", "GenerativeEvaluator", "evaluate_generative", "is_caption_task"]
