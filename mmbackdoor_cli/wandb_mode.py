"""W&B must never hang or fail for lack of network: offline unless the user configured W&B."""

from __future__ import annotations

import netrc
import os
from pathlib import Path


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
