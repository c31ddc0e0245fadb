"""Validation and test of a generative VLM LightningModule, for every family, through one evaluator.

:class:`GenerativeEvaluation` is a mixin: the family's module implements only
``generate_responses(batch, batch_idx) -> list[str]`` (decoded answers for a batch of the instruction
collator, triggers already applied) and sets ``self.evaluator = None`` in ``__init__`` and a
``num_logged_samples`` hyperparameter; the mixin builds a :class:`evaluation.generative.GenerativeEvaluator`
from the datamodule at ``setup``, feeds it every evaluation batch and logs ``{stage}/<key>`` at the end of
the epoch (the keys of :mod:`evaluation.generative`; NaN values, e.g. a set without samples, are not logged).
Generated samples are kept for :class:`callbacks.mdlm_samples.MDLMSampleGenerations` (``generation_samples``).
"""

from __future__ import annotations

from typing import Any

import torch

from evaluation.generative import GenerativeEvaluator


def set_cpu_threads(cpu_threads: int | None) -> None:
    """``model.cpu_threads``: torch's intra-op threads (None: leave torch's default); < 1 is a ``ValueError``."""
    if cpu_threads is None:
        return
    if cpu_threads < 1:
        raise ValueError(f"model.cpu_threads must be >= 1, got {cpu_threads}")
    torch.set_num_threads(cpu_threads)


class GenerativeEvaluation:
    """Mixin of a LightningModule (see the module docstring); list it before ``L.LightningModule``."""

    def generate_responses(self, batch: dict, batch_idx: int) -> list[str]:
        """Decoded responses of one evaluation batch; the family implements it."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement generate_responses(batch, batch_idx)"
        )

    def build_evaluator(self, datamodule: Any) -> GenerativeEvaluator:
        """The evaluator of ``datamodule``'s target and tasks, built once (on the module's device)."""
        if getattr(self, "evaluator", None) is None:
            evaluator = GenerativeEvaluator.from_datamodule(datamodule, self.hparams.num_logged_samples)
            self.evaluator = evaluator.to(self.device)
        return self.evaluator

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self.build_evaluator(datamodule)

    @property
    def generation_samples(self) -> list[dict]:
        """Generations kept in the current evaluation epoch (question, reference, response per set)."""
        evaluator = getattr(self, "evaluator", None)
        return evaluator.samples if evaluator is not None else []

    def _eval_set_names(self) -> list[str]:
        return getattr(getattr(self.trainer, "datamodule", None), "eval_set_names", None) or ["clean"]

    def _evaluation_step(self, batch: dict, batch_idx: int, dataloader_idx: int) -> None:
        names = self._eval_set_names()
        name = names[dataloader_idx] if dataloader_idx < len(names) else "clean"
        self.evaluator.update(name, batch, self.generate_responses(batch, batch_idx))

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, batch_idx, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluation_step(batch, batch_idx, dataloader_idx)

    def on_validation_epoch_start(self) -> None:
        self.evaluator.start("val", self.current_epoch)

    def on_test_epoch_start(self) -> None:
        self.evaluator.start("test", self.current_epoch)

    def _log_evaluation(self, stage: str) -> None:
        for key, value in self.evaluator.compute(self._eval_set_names()).items():
            if not value.isnan():
                self.log(
                    f"{stage}/{key}",
                    value.float(),
                    add_dataloader_idx=False,
                    sync_dist=False,
                    prog_bar=key in ("ca", "asr"),
                )
        self.evaluator.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")
