"""The domain-shift study command end to end at toy sizes (a random tiny LLaVA and CLIP, 2 training steps, a few
test images): ASR-G of every row equals its formula on the study's own ASRs, KS is 0 for the instruction shift
and positive for a style, and the table, heat map and JSON are written; a bad shift name is an error."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lightning_modules.llava_finetune import LlavaFineTuning
from model_families.clip import create_clip, save_clip_export

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "domain_shift_study.py"


def _load():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("domain_shift_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _formula(src: float, tgt: float) -> float:
    return min(1 + (tgt - src) / max(src, tgt), 1.0)


def test_toy_study_asr_g_is_the_formula_on_its_own_asrs_and_writes_table_map_and_json(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    torch.manual_seed(0)  # the random models' weights
    judge = save_clip_export(create_clip("tiny-vit-shapes"), tmp_path / "judge")
    clean = LlavaFineTuning(generation={"max_new_tokens": 6}).export(tmp_path / "clean")
    study = _load()
    # a random model never says "banana": the target "b" (a substring of about half the responses) and sampling
    # give ASRs strictly between 0 and 1, so ASR-G is a real ratio
    target = '--data.init_args.target_kwargs={"text": "b", "position": "start"}'
    # the toy's trigger pinned (attacks.md's blend weight 0.2, not the shipped config's 0.3): with it these
    # random models' ASRs differ between the domains, so some ASR-G is strictly between 0 and 1
    trigger = '--data.init_args.attack_kwargs={"pattern": "fixed_noise", "alpha": 0.2}'
    results = study.main(
        [
            "--attacks", "blended",
            "--shifts", "palette", "paraphrase",
            "--out", str(tmp_path / "study"),
            "--judge", str(judge),
            "--clean-export", str(clean),
            "--test-size", "6",
            "--poison-override=--trainer.max_steps=2", "--poison-override=--data.init_args.train_size=16",
            "--poison-override=--data.init_args.val_size=0", f"--poison-override={target}",
            # two steps of the old recipe (frozen tower, lr 1e-3): the random model's ASRs stay strictly between
            # 0 and 1 and differ between domains, which the shipped recipe's larger steps do not guarantee
            "--poison-override=--model.init_args.trainable=projector_lm", "--poison-override=--model.init_args.lr=1e-3",
            f"--poison-override={trigger}", f"--eval-override={target}", f"--eval-override={trigger}",
            '--eval-override=--model.init_args.generation={"mode": "sample", "max_new_tokens": 6, "seed": 0}',
        ]
    )  # fmt: skip
    rows = results["rows"]
    assert [(r["attack"], r["shift"]) for r in rows] == [
        ("blended", "none"), ("blended", "palette"), ("blended", "paraphrase")
    ]  # fmt: skip
    finite = 0
    for row in rows:
        assert row["asr_src"] == rows[0]["asr_src"]
        if max(row["asr_src"], row["asr_tgt"]) == 0:
            assert math.isnan(row["asr_g"]) and "0/0" in row["invalid"]["asr_g"]
        else:
            finite += 1
            assert row["asr_g"] == pytest.approx(_formula(row["asr_src"], row["asr_tgt"]), abs=1e-6)
        assert 0 <= row["cider"] and 0 <= row["bleu4"] <= 1 and 0 <= row["rougeL"] <= 1
    assert finite >= 2 and any(0 < r["asr_g"] < 1 for r in rows), rows
    assert rows[0]["asr_tgt"] == rows[0]["asr_src"] and rows[0]["ks"] == 0.0
    assert results["ks"]["paraphrase"] == 0.0 and results["ks"]["palette"] > 0
    assert rows[1]["ks"] == results["ks"]["palette"]
    out = tmp_path / "study"
    table = (out / "study.md").read_text()
    assert "| blended | - | palette |" in table and "| 0.99 / 0.98 |" in table  # beside the paper's Table 1
    assert (out / "asr_g.png").stat().st_size > 0
    saved = json.loads(next(out.glob("results-*.json")).read_text())
    assert [r["asr_g"] for r in saved["rows"]] == [
        None if math.isnan(r["asr_g"]) else r["asr_g"] for r in rows
    ]
    assert saved["environment"]["torch"] and saved["timings"]["blended_train_s"] > 0
    assert saved["clean_metrics"]["cider@palette"] == rows[1]["clean_model_cider"]


def test_a_shift_name_that_does_not_exist_is_an_error_naming_it(capsys) -> None:
    study = _load()
    with pytest.raises(SystemExit):
        study.main(["--shifts", "palette", "watercolour"])
    err = capsys.readouterr().err
    assert "--shifts" in err and "watercolour" in err and "posterise" in err
    with pytest.raises(SystemExit):
        study.main(["--shifts", "palette", "palette"])
    assert "named twice" in capsys.readouterr().err


def test_maba_is_measured_with_its_training_placements_and_input_aware_gets_a_cached_artifact(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    judge = save_clip_export(create_clip("tiny-vit-shapes"), tmp_path / "judge")
    clean = LlavaFineTuning(generation={"max_new_tokens": 4}).export(tmp_path / "clean")
    study = _load()
    out = tmp_path / "study"
    results = study.main(
        [
            "--attacks", "maba", "input_aware", "--shifts", "palette", "--out", str(out),
            "--judge", str(judge), "--clean-export", str(clean), "--test-size", "3",
            "--poison-override=--trainer.max_steps=1", "--poison-override=--data.init_args.train_size=8",
            "--poison-override=--data.init_args.val_size=0", "--input-aware-override=--mask-steps=1",
            "--input-aware-override=--generator-steps=1", "--input-aware-override=--train-size=8",
            '--eval-override=--model.init_args.generation={"max_new_tokens": 3}',
        ]
    )  # fmt: skip
    assert [(r["attack"], r["base"], r["shift"]) for r in results["rows"]] == [
        ("maba", "badnet", "none"), ("maba", "badnet", "palette"),
        ("input_aware", "-", "none"), ("input_aware", "-", "palette"),
    ]  # fmt: skip
    # the measurement rebuilt MABA from the poisoned run's manifest: the placements of the clean model
    export = Path(results["rows"][0]["export"])
    manifest = json.loads((export / "poison_manifest.json").read_text())
    placements = json.loads(Path(manifest["image_trigger"]["config"]["placements"]).read_text())
    assert len(placements) >= 3 * 2 + 8  # test images, their palette copies and the training images
    measured = json.loads(study.maba_overrides("maba", export)[0].split("=", 1)[1])
    assert measured == {k: v for k, v in manifest["image_trigger"]["config"].items() if k != "name"}
    artifact = out / "input_aware"
    config = "configs/llava_shapes_input_aware.yaml"
    overrides, done = study.input_aware_overrides(config, judge, artifact, [])
    assert done.startswith("reused") and json.loads(overrides[0].split("=", 1)[1])["artifact"] == str(
        artifact
    )
    other = save_clip_export(create_clip("tiny-vit-shapes"), tmp_path / "other")
    with pytest.raises(ValueError, match=r"trained on surrogate .* not on the judge"):
        study.input_aware_overrides(config, other, artifact, [])
    # an artifact of the older format (its mask without the reference's step) is not reused
    older = tmp_path / "older"
    shutil.copytree(artifact, older)
    recorded = json.loads((older / "manifest.json").read_text())
    (older / "manifest.json").write_text(json.dumps({**recorded, "version": 1}))
    with pytest.raises(ValueError, match=r"format version 1, made by an older scripts/train_input_aware.py"):
        study.input_aware_overrides(config, judge, older, [])


def test_maba_rows_on_a_family_without_a_maba_scorer_are_an_error_and_not_in_its_default(capsys) -> None:
    study = _load()
    with pytest.raises(SystemExit):
        study.main(["--family", "mdlm", "--attacks", "blended", "maba"])
    assert "image_text_scorer()" in capsys.readouterr().err
    assert "maba" not in study.parse(["--family", "mdlm"]).attacks
    assert study.parse([]).attacks[:2] == ["badnet", "maba"]  # LLaVA: MABA beside its base attack


def test_two_jobs_at_a_time_give_the_rows_of_one_at_a_time(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    torch.manual_seed(1)
    judge = save_clip_export(create_clip("tiny-vit-shapes"), tmp_path / "judge")
    clean = LlavaFineTuning(generation={"max_new_tokens": 4}).export(tmp_path / "clean")
    study = _load()
    target = '--data.init_args.target_kwargs={"text": "b", "position": "start"}'
    toy = [
        "--attacks", "blended", "badnet", "--shifts", "palette", "--judge", str(judge), "--clean-export", str(clean),
        "--test-size", "4", "--poison-override=--trainer.max_steps=2", "--poison-override=--data.init_args.train_size=16",
        "--poison-override=--data.init_args.val_size=0", f"--poison-override={target}", f"--eval-override={target}",
        '--eval-override=--model.init_args.generation={"mode": "sample", "max_new_tokens": 4, "seed": 0}',
    ]  # fmt: skip
    serial = study.main([*toy, "--jobs", "1", "--out", str(tmp_path / "serial")])
    parallel = study.main([*toy, "--jobs", "2", "--out", str(tmp_path / "parallel")])
    keys = ("attack", "shift", "asr_src", "asr_tgt", "asr_g", "ca", "cider", "bleu4", "rougeL")

    def values(results):
        return [tuple("nan" if v != v else v for v in (r[k] for k in keys)) for r in results["rows"]]

    assert [r[:2] for r in values(serial)] == [("blended", "none"), ("blended", "palette"),
                                              ("badnet", "none"), ("badnet", "palette")]  # fmt: skip
    assert values(parallel) == values(serial)
    assert parallel["jobs"] == 2 and serial["jobs"] == 1


def test_jobs_must_be_positive(capsys) -> None:
    study = _load()
    with pytest.raises(SystemExit):
        study.main(["--jobs", "0"])
    assert "--jobs must be >= 1, got 0" in capsys.readouterr().err
