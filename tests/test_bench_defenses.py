"""The defense benchmark runs end to end with the shipped InverTune config (slow: 400 tuning iterations)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_defenses.py"


@pytest.mark.slow
def test_bench_times_every_stage_with_the_shipped_config(capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_defenses", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--clean-size", "96", "--threads", "1", "--device", "cpu"])
    assert set(rows) == {"identification", "inversion", "tuning", "cleanclip_epoch", "par_epoch"}
    assert all(row["seconds"] > 0 for row in rows.values())
    assert rows["cleanclip_epoch"]["steps"] == rows["par_epoch"]["steps"] >= 1
    assert "| InverTune total |" in capsys.readouterr().out
