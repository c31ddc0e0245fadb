"""Small building blocks for multi-stage commands (quickstart, attack table): train a config in-process,
return where its run and export are; evaluate an export under a config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mmbackdoor_cli.cli import main as train_main
from mmbackdoor_cli.evaluate import evaluate_checkpoint


@dataclasses.dataclass
class TrainedRun:
    config: str
    run_dir: Path
    export: Path
    metrics: dict[str, float]


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
