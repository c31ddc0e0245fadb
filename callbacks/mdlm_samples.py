"""Sample generations of an MDLM (clean, triggered and poisoned-training prompts) as a table.

At the end of every validation and test epoch the module's ``generation_samples`` (question, reference,
response per evaluation set) are written to ``<run>/generations/<stage>_epoch<N>.json`` and logged as a W&B
table ``<stage>/generations`` when a logger with ``log_table`` is attached.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from attacks import atomic_write_json

COLUMNS = ["stage", "epoch", "set", "key", "question", "reference", "response"]


class MDLMSampleGenerations(L.Callback):
    """Log the generations kept by :class:`lightning_modules.mdlm_finetune.MDLMFineTuning`."""

    def __init__(self, dirname: str = "generations") -> None:
        self.dirname = dirname

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        samples = getattr(pl_module, "generation_samples", None)
        if trainer.global_rank != 0 or not samples or trainer.sanity_checking:
            return
        path = Path(trainer.default_root_dir) / self.dirname / f"{stage}_epoch{trainer.current_epoch}.json"
        atomic_write_json(path, samples)
        rows = [[str(s.get(c, "")) for c in COLUMNS] for s in samples]
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):
                logger.log_table(f"{stage}/generations", columns=COLUMNS, data=rows)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "test")
