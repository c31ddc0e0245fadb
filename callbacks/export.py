"""Write a loadable export (weights + model config + run config) when fitting ends."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


class ExportOnFitEnd(L.Callback):
    """Calls ``pl_module.export(<run dir>/<dirname>, run_config)`` on rank 0 at the end of ``fit``.

    The folder is what ``--model.init_from`` and ``evaluate.py --checkpoint`` accept. The run config is
    the full resolved CLI config (``trainer.mmbackdoor_config``), so every export records what made it.
    """

    def __init__(self, dirname: str = "export") -> None:
        self.dirname = dirname
        self.path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0 or not hasattr(pl_module, "export"):
            return
        self.path = Path(trainer.default_root_dir) / self.dirname
        pl_module.export(self.path, getattr(trainer, "mmbackdoor_config", None))
        trainer.mmbackdoor_export = self.path
        log.info("export written to %s", self.path)
