"""Write a loadable export (weights + model config + run config) when fitting ends."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import lightning as L

from model_families.finite import assert_finite_state

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
        assert_finite_state(pl_module.state_dict(), where=f"export {self.path}")  # also when no guard ran
        pl_module.export(self.path, getattr(trainer, "mmbackdoor_config", None))
        trainer.mmbackdoor_export = self.path
        log.info("export written to %s", self.path)
        run_dir = Path(trainer.default_root_dir)
        if run_dir.name.startswith("version_"):
            update_link(run_dir.parent / f"latest_{self.dirname}", self.path)


def update_link(link: Path, target: Path) -> None:
    """Atomically point `link` at `target` (relative symlink), e.g. runs/clip_shapes_clean/latest_export.

    The new link is made under a name no other process uses (pid + random suffix) and renamed over `link`
    (`os.replace`, atomic), so runs finishing at the same moment never collide: the last rename wins and
    `link` is valid at every instant.
    """
    tmp = link.with_name(f".{link.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    tmp.symlink_to(os.path.relpath(target, link.parent))
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
