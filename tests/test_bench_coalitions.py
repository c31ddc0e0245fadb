"""The coalition-sampling benchmark compares like with like: both paths give the same edits, and it prints the
ratio it measured."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_coalitions.py"


def test_batched_and_separate_passes_give_the_same_edits_and_the_ratio_is_printed(capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_coalitions", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    row = bench.main(["--batch-size", "3", "--steps", "2", "--repeat", "1"])
    assert row["max_diff"] < 1e-4  # the same seeds per sample: only batched-matmul rounding differs
    assert row["ratio"] == row["separate_seconds"] / row["batched_seconds"]
    assert f"separate / batched time ratio: {row['ratio']:.2f}" in capsys.readouterr().out
