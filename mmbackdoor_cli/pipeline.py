"""Small building blocks for multi-stage commands (quickstart, attack table): train a config in-process,
return where its run and export are; evaluate an export under a config; group the stages' W&B runs."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from mmbackdoor_cli.cli import DEFAULT_LOGGER
from mmbackdoor_cli.cli import main as train_main
from mmbackdoor_cli.evaluate import evaluate_checkpoint
from mmbackdoor_cli.wandb_mode import GROUP_ENV


@dataclasses.dataclass
class TrainedRun:
    config: str
    run_dir: Path
    export: Path
    metrics: dict[str, float]


def invocation_group(script: str) -> str:
    """The W&B group of this invocation, `<script>-<YYYYmmdd-HHMMSS>`, set once in `MMBACKDOOR_WANDB_GROUP`.

    A multi-stage script calls this at its start: every stage it then trains (each its own W&B run,
    named after its run folder) is grouped under it. A group already in the environment (set by the user
    or by an outer script) is kept; `--trainer.logger.init_args.group` of a stage still wins.
    """
    if not os.environ.get(GROUP_ENV):
        os.environ[GROUP_ENV] = f"{script}-{time.strftime('%Y%m%d-%H%M%S')}"
    return os.environ[GROUP_ENV]


LOGGERS = ("wandb", "false")
"""The `--logger` choices of the multi-stage scripts."""


def logger_overrides(logger: str) -> list[str]:
    """The `--trainer.logger` override of a script's `--logger` choice: `wandb` is train.py's default
    WandbLogger (offline unless W&B is configured), also for configs that turn the logger off; `false`
    logs nothing."""
    if logger == "false":
        return ["--trainer.logger=false"]
    if logger == "wandb":
        return [f"--trainer.logger={json.dumps(DEFAULT_LOGGER)}"]
    raise ValueError(f"--logger must be one of {LOGGERS}, got {logger!r}")


def train(config: str, *overrides: str) -> TrainedRun:
    """`python train.py --config config *overrides` in this process; the run's folder, export and metrics."""
    cli = train_main(["fit", "--config", config, *overrides])
    trainer = cli.trainer
    export = getattr(trainer, "mmbackdoor_export", None)
    if export is None:
        raise RuntimeError(f"{config}: the run finished without an export (is ExportOnFitEnd disabled?)")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    return TrainedRun(config, Path(trainer.default_root_dir), Path(export), metrics)


def evaluate(config: str, checkpoint: str | Path, *overrides: str, split: str = "test") -> dict[str, float]:
    """Test-split metrics of `checkpoint` with the data, trigger and target of `config`."""
    return evaluate_checkpoint(config, str(checkpoint), split, list(overrides))
