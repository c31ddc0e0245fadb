"""A final summary of a run: the last logged metrics as a table (printed, and to W&B when used)."""

from __future__ import annotations

import lightning as L
from rich.console import Console
from rich.table import Table


class RunSummary(L.Callback):
    """At the end of fit/validate/test, print the logged metrics and where the artifacts are.

    A module with a ``summary_rows()`` method (``dict[str, str]``) adds text rows after the metrics, for
    what is no number (InverTune's target by class name and how sure it is).
    """

    def _report(self, trainer: L.Trainer, title: str, pl_module: L.LightningModule | None = None) -> None:
        if trainer.global_rank != 0:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        rows = pl_module.summary_rows() if hasattr(pl_module, "summary_rows") else {}
        table = Table(title=f"mmbackdoor {title}: {trainer.default_root_dir}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in sorted(metrics):
            table.add_row(key, f"{metrics[key]:.4f}")
        for key, text in rows.items():
            table.add_row(key, text)
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
                if rows:  # text apart from the numbers: a W&B table column holds one type
                    logger.log_table(
                        f"summary/{title}_notes",
                        columns=["item", "value"],
                        data=[[k, v] for k, v in rows.items()],
                    )

    def on_fit_end(self, trainer, pl_module) -> None:
        self._report(trainer, "fit", pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self._report(trainer, "test", pl_module)
