"""Write a loadable export (weights + model config + run config) when fitting ends."""

from __future__ import annotations

import inspect
import logging
import os
import uuid
from pathlib import Path

import lightning as L

from model_families.finite import assert_finite_state

log = logging.getLogger(__name__)


class ExportOnFitEnd(L.Callback):
    """Calls ``pl_module.export(<run dir>/<dirname>, run_config)`` on rank 0 at the end of ``fit``.

    Under FSDP the full state dict is first gathered on all ranks (:func:`gather_full_state_dict`) and rank 0
    exports from it (``pl_module.export(..., state_dict=...)``); other strategies export ``pl_module`` as is.

    The folder is what ``--model.init_from`` and ``evaluate.py --checkpoint`` accept. The run config is
    the full resolved CLI config (``trainer.mmbackdoor_config``), so every export records what made it.
    """

    def __init__(self, dirname: str = "export") -> None:
        self.dirname = dirname
        self.path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "export"):
            return
        state = gather_full_state_dict(trainer, pl_module)  # sharded runs only: every rank takes part
        if trainer.global_rank != 0:
            return
        self.path = Path(trainer.default_root_dir) / self.dirname
        run_config = getattr(trainer, "mmbackdoor_config", None)
        if state is None:
            assert_finite_state(pl_module.state_dict(), where=f"export {self.path}")  # also when no guard ran
            pl_module.export(self.path, run_config)
        else:
            assert_finite_state(state, where=f"export {self.path}")
            pl_module.export(self.path, run_config, state_dict=state)
        trainer.mmbackdoor_export = self.path
        log.info("export written to %s", self.path)
        run_dir = Path(trainer.default_root_dir)
        if run_dir.name.startswith("version_"):
            update_link(run_dir.parent / f"latest_{self.dirname}", self.path)


def gather_full_state_dict(trainer: L.Trainer, pl_module: L.LightningModule) -> dict | None:
    """The full (unsharded) state dict of an FSDP-wrapped module on rank 0 (empty on the others), or None when
    the trainer does not shard the module.

    A collective: under FSDP every rank must call it (whatever ``state_dict_type`` the strategy checkpoints
    with, the export needs the full weights). The tensors are gathered to CPU, one FSDP unit at a time.
    """
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    wrapped = trainer.model
    if not isinstance(wrapped, FSDP):
        return None
    if "state_dict" not in inspect.signature(pl_module.export).parameters:  # raised on every rank: no hang
        raise TypeError(
            f"{type(pl_module).__name__}.export takes no state_dict: it cannot export from a sharded (FSDP) run"
        )
    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, config):
        return wrapped.state_dict()


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
