"""W&B in the CLI: never hang or fail for lack of network (offline unless the user configured W&B), one W&B
run per stage (finished when the stage ends, even when it fails) and one group per invocation of a
multi-stage script (`MMBACKDOOR_WANDB_GROUP`)."""

from __future__ import annotations

import netrc
import os
from collections.abc import Iterable
from pathlib import Path

GROUP_ENV = "MMBACKDOOR_WANDB_GROUP"
"""The W&B `group` of every WandbLogger run that does not set one (set once by a multi-stage script)."""


def wandb_configured() -> bool:
    """True when an API key is in the environment or in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in rc.hosts)


def ensure_safe_wandb_mode() -> str:
    """Set WANDB_MODE=offline unless the user chose a mode or logged in; return the mode in force."""
    if "WANDB_MODE" not in os.environ and not wandb_configured():
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "60")
    return os.environ.get("WANDB_MODE", "online")


def finish_wandb_runs(loggers: Iterable, exit_code: int) -> None:
    """Finish the W&B run of each WandbLogger among `loggers` that started one, with `exit_code`.

    Lightning never finishes a WandbLogger's run, and a new WandbLogger reuses `wandb.run` while one is
    active: without this, every later stage in the same process logs into the first stage's run.
    """
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        # the started run only (None before the first log call and on ranks other than 0): never start one
        run = getattr(logger, "_experiment", None) if isinstance(logger, WandbLogger) else None
        if run is not None and callable(getattr(run, "finish", None)):
            run.finish(exit_code=exit_code)
