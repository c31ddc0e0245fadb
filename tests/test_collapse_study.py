"""The modality-collapse study command end to end at toy sizes: every row's TMA satisfies efficiency on the
study's own values, CTI and the ASRs come out of the same pass, and the table, plot, grids and JSON are written."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from lightning_modules.pix2pix_finetune import Pix2PixFineTuning
from model_families.clip import create_clip, save_clip_export

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "collapse_study.py"


def _load():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("collapse_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_study_writes_its_table_and_tma_efficiency_holds_on_every_row(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    judge = save_clip_export(create_clip("tiny-vit-shapes"), tmp_path / "judge")
    clean = Pix2PixFineTuning().export(tmp_path / "clean")
    study = _load()
    results = study.main(
        [
            "--quick",
            "--protocols", "OR",
            "--out", str(tmp_path / "study"),
            "--judge", str(judge),
            "--clean-export", str(clean),
            "--test-size", "6",
            "--batch-size", "3",
            "--guidance", "7.5,1.5", "3,1.5",
            "--poison-override=--trainer.max_steps=2", "--poison-override=--data.init_args.train_size=64",
            "--poison-override=--data.init_args.val_size=0",
        ]
    )  # fmt: skip
    rows = results["rows"]
    assert [(r["protocol"], r["guidance"]) for r in rows] == [
        ("clean", "7.5, 1.5"), ("clean", "3, 1.5"), ("OR", "7.5, 1.5"), ("OR", "3, 1.5")
    ]  # fmt: skip
    for row in rows:
        assert row["count"] == 6
        assert row["tma/image"] + row["tma/text"] == pytest.approx(row["v/both"] - row["v/none"], abs=1e-5)
        assert row["tma_binary/image"] + row["tma_binary/text"] == pytest.approx(
            row["asr/both"] - row["asr/none"], abs=1e-9
        )
    # the clean rows measure the clean editor against itself: coalition none is z_clean, v(none) = cos - 1
    assert rows[0]["v/none"] <= 0
    # the poisoned row's z_clean is the clean editor: a changed model gives other values than the clean row's
    assert rows[2]["v/both"] != rows[0]["v/both"]
    out = tmp_path / "study"
    table = (out / "study.md").read_text()
    assert "| box+mignneko | OR | 0.050 | 7.5, 1.5 |" in table and "0.006 / 0.974 / -0.009" in table
    assert (out / "collapse.png").stat().st_size > 0
    grids = sorted(p.name for p in (out / "grids").glob("*.png"))
    assert grids == sorted(
        ["clean_box+mignneko.png", "clean_box+mignneko_g3-1.5.png", "box-mignneko_OR_0.05.png",
         "box-mignneko_OR_0.05_g3-1.5.png"]
    )  # fmt: skip
    saved = json.loads(next(out.glob("results-*.json")).read_text())
    assert saved["rows"][2]["asr/both"] == rows[2]["asr/both"]


def test_a_guidance_scale_below_one_is_an_error_naming_the_value(capsys) -> None:
    study = _load()
    with pytest.raises(SystemExit):
        study.main(["--guidance", "0.5,1.5"])
    assert "guidance_scale" in capsys.readouterr().err
