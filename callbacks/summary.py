"""A final summary of a run: the last logged metrics as a table (printed, and to W&B when used)."""

from __future__ import annotations

import lightning as L
from rich.console import Console
from rich.table import Table


class RunSummary(L.Callback):
    """At the end of fit/validate/test, print the logged metrics and where the artifacts are."""

    def _report(self, trainer: L.Trainer, title: str) -> None:
        if trainer.global_rank != 0:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        table = Table(title=f"mmbackdoor {title}: {trainer.default_root_dir}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in sorted(metrics):
            table.add_row(key, f"{metrics[key]:.4f}")
        export = getattr(trainer, "mmbackdoor_export", None)
        if export is not None:
            table.caption = f"export: {export}"
        Console().print(table)
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):
                logger.log_table(
                    f"summary/{title}",
                    columns=["metric", "value"],
                    data=[[k, v] for k, v in sorted(metrics.items())],
                )

    def on_fit_end(self, trainer, pl_module) -> None:
        self._report(trainer, "fit")

    def on_test_end(self, trainer, pl_module) -> None:
        self._report(trainer, "test")
