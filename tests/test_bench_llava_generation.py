"""The LLaVA generation benchmark: batched left-padded answers equal one-at-a-time answers in every mode, and
the speedup it prints is the ratio of the seconds it measured."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_llava_generation.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_llava_generation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_batched_generation_gives_the_single_sample_answers_and_prints_the_ratio(capsys) -> None:
    rows = _load().main(["--quick"])
    out = capsys.readouterr().out
    assert [r["mode"] for r in rows] == ["greedy", "beam"]
    for r in rows:
        assert r["batched_answers"] == r["single_answers"] and r["equal_answers"] == r["samples"] == 6
        assert len(set(r["batched_answers"])) > 1  # different prompts, different answers: rows not mixed up
        assert r["speedup"] == r["single_seconds"] / r["batched_seconds"]
        assert f"| {r['mode']} | 6 | 4 | {r['batched_seconds']:.3f} |" in out


def test_a_batched_answer_that_differs_is_a_failure(monkeypatch) -> None:
    bench = _load()
    real = bench.answers
    monkeypatch.setattr(
        bench,
        "answers",
        lambda m, items, s: [a + "!" for a in real(m, items, s)] if len(items) > 1 else real(m, items, s),
    )
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--quick", "--modes", "greedy"])
    assert exit_.value.code == 1
