"""The training-step benchmark runs both families in a tiny mode; for MDLM the plain loop does the same step
as the Lightning Trainer (equal losses step for step), so the ratio compares like with like."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_training_step.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_training_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_mdlm_plain_loop_and_lightning_take_the_same_steps_and_the_ratio_is_printed(capsys) -> None:
    bench = _load()
    rows = bench.main(
        ["--family", "mdlm", "clip", "--steps", "3", "--batch-size", "4", "--threads", "1", "--repeat", "2"]
    )
    out = capsys.readouterr().out
    by_family = {row["family"]: row for row in rows}
    assert set(by_family) == {"mdlm", "clip"}
    mdlm = by_family["mdlm"]
    # Same batches, same masks, same AdamW updates: the losses after the first step depend on the updates.
    assert len(mdlm["plain_losses"]) == len(mdlm["lightning_losses"]) == 3
    assert mdlm["plain_losses"] == mdlm["lightning_losses"]
    assert len(set(mdlm["plain_losses"])) == 3
    clip = by_family["clip"]
    assert clip["plain_losses"][0] == clip["lightning_losses"][0]  # the same first batch
    for row in rows:
        assert row["ratio"] == row["lightning_seconds"] / row["plain_seconds"]
        assert f"{row['family']}: Lightning / plain time ratio: {row['ratio']:.3f}, median step ratio " in out
        assert row["median_step_ratio"] > 0
        assert f"| {row['family']} | LightningModule (Trainer) | 3 | 4 |" in out


def test_llava_plain_transformers_loop_and_lightning_take_the_same_steps() -> None:
    bench = _load()
    (row,) = bench.main(["--family", "llava", "--steps", "3", "--batch-size", "4", "--repeat", "1"])
    assert row["family"] == "llava" and len(row["plain_losses"]) == len(row["lightning_losses"]) == 3
    # same batches, deterministic steps, same AdamW updates: equal losses, and each step changed the model
    assert row["plain_losses"] == row["lightning_losses"]
    assert len(set(row["plain_losses"])) == 3
    assert row["ratio"] == row["lightning_seconds"] / row["plain_seconds"]
