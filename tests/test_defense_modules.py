"""Defense LightningModules, the trigger-inversion callback and the defender datamodule.

Tiny randomly initialised ``tiny-rn-shapes`` exports and a few dozen embedded-world images: these
tests check the wiring (errors, artefacts, exports, restricted updates end to end), not the defense's
effect, which ``scripts/defense_table.py`` measures on the real poisoned models.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from callbacks import RunSummary
from callbacks.trigger_inversion import InversionOutcome, TriggerInversion, warn_if_unsure
from datamodules.defender_shapes import DefenderShapesDataModule
from defenses.invertune import InvertedTrigger, TargetConfidence, TuneConfig
from defenses.victim import load_victim
from lightning_modules.cleanclip import CleanCLIPFineTuning
from lightning_modules.invertune import InverTuneModule
from lightning_modules.par import PARFineTuning
from mmbackdoor_cli.cli import main as cli_main
from model_families.clip import create_clip, save_clip_export

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_DATA = [
    "--data.init_args.clean_size=64",
    "--data.init_args.val_size=16",
    "--data.init_args.test_size=16",
    "--data.init_args.batch_size=32",
    "--data.init_args.eval_batch_size=16",
]
QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def victim(tmp_path_factory) -> Path:
    """A random tiny-rn-shapes export standing in for a suspect model."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("victim") / "export"
    save_clip_export(create_clip("tiny-rn-shapes"), path)
    return path


def run_cli(config: str, victim: Path, root: Path, *extra: str):
    return cli_main(
        [
            "fit",
            "--config",
            str(CONFIGS / config),
            f"--model.victim={victim}",
            f"--trainer.default_root_dir={root}",
            *QUIET,
            *TINY_DATA,
            *extra,
        ]
    )


# ------------------------------------------------------------------------------------------------
# never a silent fall-back to another model
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [InverTuneModule, CleanCLIPFineTuning, PARFineTuning])
def test_missing_victim_is_an_error_naming_it(module, tmp_path) -> None:
    missing = tmp_path / "no_such_export"
    with pytest.raises(FileNotFoundError, match="no_such_export"):
        module(victim=str(missing))
    with pytest.raises(ValueError, match=r"model\.victim is required"):
        module(victim="")


def test_export_folder_without_metadata_is_an_error(tmp_path) -> None:
    (tmp_path / "half_export").mkdir()
    with pytest.raises(FileNotFoundError, match=r"mmbackdoor\.json"):
        load_victim(str(tmp_path / "half_export"))


def test_plain_checkpoint_needs_an_architecture(tmp_path) -> None:
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match=r"model\.model_name"):
        load_victim(str(weights))


def test_cli_with_a_missing_victim_fails_before_training(tmp_path) -> None:
    # jsonargparse wraps the module's FileNotFoundError in a ValueError that keeps its message
    with pytest.raises((FileNotFoundError, ValueError), match=r"victim checkpoint not found: .*not_there"):
        run_cli("invertune_clip_shapes.yaml", tmp_path / "not_there", tmp_path / "runs")


def test_victim_is_loaded_bit_exactly(victim) -> None:
    module = InverTuneModule(victim=str(victim))
    saved = load_file(str(victim / "model.safetensors"))
    for name, tensor in module.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert module.suspect_model is not module.model
    assert not any(p.requires_grad for p in module.suspect_model.parameters())


# ------------------------------------------------------------------------------------------------
# the defender's data
# ------------------------------------------------------------------------------------------------


def test_defender_data_are_clean_and_disjoint_from_the_test_split() -> None:
    dm = DefenderShapesDataModule(
        clean_size=40, val_size=10, test_size=10, attack="badnet", target_class="star"
    )
    dm.setup("fit")
    assert len(dm.train_data) == 40 and len(dm.val_set) == 10 and len(dm.test_set) == 10
    assert dm.plan is None, "the defender's data must never be poisoned"
    clean = torch.stack([dm.train_data[i]["image"] for i in range(40)])
    val = torch.stack([dm.val_set[i]["image"] for i in range(10)])
    test = torch.stack([dm.test_set[i]["image"] for i in range(10)])
    for other in (val, test):
        assert not any(torch.equal(a, b) for a in clean for b in other)
    batch = next(iter(dm.train_dataloader()))
    assert "image_triggered" not in batch and not batch["poison_image"].any()


def test_defender_data_reject_an_empty_clean_set_and_poisoning() -> None:
    with pytest.raises(ValueError, match="clean_size must be >= 1"):
        DefenderShapesDataModule(clean_size=0)
    with pytest.raises(ValueError, match="clean"):
        DefenderShapesDataModule(clean_size=10, attack="badnet", target_class="star", poison_rate=0.1)


def test_reporting_target_outside_the_vocabulary_is_an_error() -> None:
    dm = DefenderShapesDataModule(
        clean_size=8, val_size=4, test_size=4, attack="badnet", target_class="unicorn"
    )
    with pytest.raises(ValueError, match="unicorn"):
        dm.setup("fit")


# ------------------------------------------------------------------------------------------------
# the trigger-inversion callback
# ------------------------------------------------------------------------------------------------


def module_with_vocabulary(victim: Path) -> InverTuneModule:
    module = InverTuneModule(victim=str(victim), tuning_batch_size=8)
    module.class_names = ["circle", "square", "triangle", "star"]
    return module


def test_given_target_outside_the_vocabulary_is_an_error(victim) -> None:
    images = [{"image": torch.rand(8, 3, 32, 32)}]
    with pytest.raises(ValueError, match="'unicorn' is not in the class vocabulary"):
        TriggerInversion(target="unicorn").run(module_with_vocabulary(victim), images)


def test_identified_target_outside_the_vocabulary_is_rejected(victim) -> None:
    module = module_with_vocabulary(victim)

    class Outcome:
        target = 7
        timings: ClassVar[dict] = {}

    with pytest.raises(ValueError, match="not in the class vocabulary"):
        module.receive_inversion(Outcome())


def test_empty_clean_set_is_an_error(victim) -> None:
    with pytest.raises(ValueError, match="empty"):
        TriggerInversion(uap_epochs=1, epochs=1).run(module_with_vocabulary(victim), [])


def test_inversion_runs_on_clean_batches_and_reports(victim) -> None:
    images = [
        {"image": torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(i))} for i in range(2)
    ]
    outcome = TriggerInversion(uap_epochs=1, epochs=1, reference_source="predicted").run(
        module_with_vocabulary(victim), images
    )
    assert outcome.identification is not None and outcome.target == outcome.identification.target
    assert len(outcome.trigger.history) == 2 and 0.0 <= outcome.inverted_asr <= 1.0
    assert outcome.num_clean_images == 32 and outcome.num_reference_images >= 1
    summary = outcome.summary(["circle", "square", "triangle", "star"])
    assert summary["ranking"][0] == summary["target"]
    assert set(summary["timings"]) >= {"identification_s", "inversion_s"}


def unsure_messages(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "unsure of the backdoor target" in str(w.message)]


def test_a_small_margin_warns_with_the_margin_classes_and_keys() -> None:
    confidence = TargetConfidence("square", "star", 0.42, 0.41, 0.01, threshold=0.1)
    with pytest.warns(UserWarning, match="unsure of the backdoor target") as caught:
        warn_if_unsure(confidence)
    (message,) = unsure_messages(caught.list)
    for part in ("margin 0.010", "'square'", "'star'", "min_margin=0.1", "TriggerInversion.target"):
        assert part in message, part
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_unsure(TargetConfidence("square", "star", 0.42, 0.41, 0.01, threshold=0.005))
        warn_if_unsure(None)  # a given target: nothing to be unsure of
    assert unsure_messages(caught) == []


def test_identification_reports_the_target_by_name_margin_and_rises_and_flags_low_confidence(victim) -> None:
    images = [
        {"image": torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(i))} for i in range(2)
    ]
    names = ["circle", "square", "triangle", "star"]
    # a margin is at most 2 (rises are differences of fractions): min_margin=10 forces low confidence
    with pytest.warns(UserWarning, match=r"TriggerInversion\.min_margin=10") as caught:
        outcome = TriggerInversion(uap_epochs=1, epochs=1, min_margin=10).run(
            module_with_vocabulary(victim), images
        )
    summary = json.loads(json.dumps(outcome.summary(names)))  # what report.json holds
    assert type(summary["target_index"]) is int and summary["target"] == names[summary["target_index"]]
    assert summary["target_source"] == "identified"
    assert set(summary["increase"]) == set(names)
    ranking = summary["ranking"]
    assert summary["margin"] == pytest.approx(
        summary["increase"][ranking[0]] - summary["increase"][ranking[1]]
    )
    assert summary["target_confidence"] == {
        "margin": pytest.approx(summary["margin"]),
        "threshold": 10.0,
        "low_confidence": True,
        "target": summary["target"],
        "runner_up": ranking[1],
        "target_increase": pytest.approx(summary["increase"][ranking[0]]),
        "runner_up_increase": pytest.approx(summary["increase"][ranking[1]]),
        "statistic": "rise",
    }
    (message,) = unsure_messages(caught.list)
    assert repr(summary["target"]) in message and repr(ranking[1]) in message
    # min_margin 0 never warns; a given target has no confidence to report
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calm = TriggerInversion(uap_epochs=1, epochs=1, min_margin=0).run(
            module_with_vocabulary(victim), images
        )
        given = TriggerInversion(target="star", epochs=1).run(module_with_vocabulary(victim), images)
    assert unsure_messages(caught) == []
    assert calm.summary(names)["target_confidence"]["low_confidence"] is False
    assert given.summary(names)["target_confidence"] is None and given.target_source == "given"


def outcome_for(target: int, confidence: TargetConfidence | None = None) -> InversionOutcome:
    names = ["circle", "square", "triangle", "star"]
    return InversionOutcome(
        target=target,
        target_name=names[target],
        trigger=InvertedTrigger((3, 32, 32)),
        identification=None,
        inverted_asr=1.0,
        num_clean_images=16,
        num_reference_images=4,
        confidence=confidence,
    )


def test_invertune_report_says_whether_the_identified_target_is_the_true_one(victim) -> None:
    module = module_with_vocabulary(victim)
    module.report_target = 3  # "star"
    module.inversion = outcome_for(3)
    report = module.report()
    assert (report["identified_target"], report["true_target"]) == ("star", "star")
    assert report["target_matches_true_target"] is True and report["true_target_unknown"] is None
    assert module.summary_rows()["identify/true_target"] == "star (found)"
    module.inversion = outcome_for(1)
    report = module.report()
    assert (report["identified_target"], report["true_target"]) == ("square", "star")
    assert report["target_matches_true_target"] is False
    assert module.summary_rows()["identify/true_target"] == "star (MISSED)"
    # data without an attack target: null, and the report says why
    dm = DefenderShapesDataModule(clean_size=8, val_size=4, test_size=4, attack=None, target_class=None)
    dm.setup("fit")
    module.trainer = SimpleNamespace(datamodule=dm)
    module.setup("fit")
    report = module.report()
    assert report["true_target"] is None and report["target_matches_true_target"] is None
    assert "DefenderShapesDataModule has no attack target" in report["true_target_unknown"]


def test_run_summary_prints_the_target_by_name_and_a_low_confidence(victim, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # no wrapping inside the table's cells
    module = module_with_vocabulary(victim)
    module.report_target = 3
    module.inversion = outcome_for(1, TargetConfidence("square", "star", 0.42, 0.41, 0.01, threshold=0.1))
    trainer = SimpleNamespace(global_rank=0, callback_metrics={}, default_root_dir="run", loggers=[])
    RunSummary()._report(trainer, "fit", module)
    printed = capsys.readouterr().out
    assert "square (index 1, identified)" in printed
    assert "LOW CONFIDENCE: margin 0.010 over 'star', min_margin 0.1" in printed
    assert "star (MISSED)" in printed


def test_tuning_without_inversion_is_an_error(victim, tmp_path) -> None:
    with pytest.raises(RuntimeError, match="TriggerInversion"):
        run_cli("invertune_clip_shapes.yaml", victim, tmp_path, "--trainer.callbacks=[]")


# ------------------------------------------------------------------------------------------------
# end to end through train.py
# ------------------------------------------------------------------------------------------------


QUICK_TUNING = (
    "--model.tuning_batch_size=32",
    "--model.iterations=3",
    "--model.lr=0.01",
    "--trainer.callbacks.init_args.uap_epochs=1",
    "--trainer.callbacks.init_args.epochs=1",
)
"""A three-step InverTune run of the shipped config through train.py (one epoch per inversion stage)."""


def test_invertune_end_to_end_restricted_updates(victim, tmp_path) -> None:
    cli = run_cli(
        "invertune_clip_shapes.yaml",
        victim,
        tmp_path,
        *QUICK_TUNING,
        "--model.update_scope=neurons",  # the paper's restricted updates (the config ships model_code)
    )
    metrics = cli.trainer.callback_metrics
    for key in ("before/ca", "before/asr", "val/ca", "val/asr", "val/inverted_asr", "invert/asr"):
        assert key in metrics, key
    module = cli.model
    result = module.tuning_result
    assert result is not None and len(result.history) == 3
    assert module.session.done
    run_dir = Path(cli.trainer.default_root_dir)
    for name in ("mask.png", "pattern.png", "examples.png", "trigger.safetensors", "report.json"):
        assert (run_dir / "trigger_inversion" / name).is_file(), name
    report = json.loads((run_dir / "invertune_report.json").read_text())
    assert report["tuning"]["selected_layers"] == result.selected_layers
    assert report["true_target"] == "star"
    assert report["identified_target"] == report["inversion"]["target"]
    assert report["target_matches_true_target"] is (report["identified_target"] == "star")
    assert report["inversion"]["target_confidence"]["threshold"] == 0.1
    assert "identify/target" not in metrics  # a class index is no metric: summary_rows print its name
    # the export holds the tuned model; outside the selected neurons it is bit-identical to the victim
    before = load_file(str(victim / "model.safetensors"))
    after = load_file(str(Path(cli.trainer.mmbackdoor_export) / "model.safetensors"))
    changed = False
    for name, tensor in after.items():
        mask = result.parameter_masks.get(name)
        if mask is None:
            assert torch.equal(tensor, before[name]), f"{name} changed outside the selection"
        else:
            assert torch.equal(tensor[~mask.cpu()], before[name][~mask.cpu()]), name
            changed |= not torch.equal(tensor, before[name])
    assert changed or result.best_iteration == 0


def test_the_shipped_invertune_config_updates_the_whole_image_tower_and_no_text_weights(
    victim, tmp_path
) -> None:
    # the tiny-model configs ship update_scope: model_code (the authors' code; ninth sweep): the neuron masks
    # act inside the loss, AdamW moves the image tower outside the selected writers too, never the text side
    cli = run_cli(
        "invertune_clip_shapes.yaml",
        victim,
        tmp_path,
        *QUICK_TUNING,
    )
    assert cli.model.hparams.update_scope == "model_code"
    masks = cli.model.tuning_result.parameter_masks
    tower = {name for name, _ in cli.model.model.named_parameters() if name.startswith("visual.")}
    assert set(masks) == tower and all(mask is None for mask in masks.values())  # the stem included
    assert "visual.conv1.weight" in masks  # no residual writer: only model_code trains it
    before = load_file(str(victim / "model.safetensors"))
    after = load_file(str(Path(cli.trainer.mmbackdoor_export) / "model.safetensors"))
    for name, tensor in after.items():
        if not name.startswith("visual."):
            assert torch.equal(tensor, before[name]), f"{name} (outside the image tower) changed"


@pytest.mark.parametrize("config", ["cleanclip_clip_shapes.yaml", "par_clip_shapes.yaml"])
def test_baselines_fit_and_export(config, victim, tmp_path) -> None:
    cli = run_cli(
        config,
        victim,
        tmp_path,
        "--trainer.max_epochs=1",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.limit_train_batches=2",
    )
    metrics = cli.trainer.callback_metrics
    assert {"train/loss", "val/ca", "val/asr"} <= set(metrics)
    after = load_file(str(Path(cli.trainer.mmbackdoor_export) / "model.safetensors"))
    before = load_file(str(victim / "model.safetensors"))
    assert any(not torch.equal(after[k], before[k]) for k in before), "fine-tuning changed nothing"
    if isinstance(cli.model, PARFineTuning):
        frozen = cli.model.frozen.model
        assert not frozen.training
        for name, tensor in frozen.state_dict().items():
            assert torch.equal(tensor.cpu(), before[name]), f"PAR's frozen copy moved: {name}"


def test_saved_trigger_is_reused_with_load_from(victim, tmp_path) -> None:
    first = run_cli(
        "invertune_clip_shapes.yaml",
        victim,
        tmp_path / "first",
        "--model.tuning_batch_size=32",
        "--model.iterations=1",
        "--trainer.callbacks.init_args.uap_epochs=1",
        "--trainer.callbacks.init_args.epochs=1",
    )
    saved = Path(first.trainer.default_root_dir) / "trigger_inversion"
    second = run_cli(
        "invertune_clip_shapes.yaml",
        victim,
        tmp_path / "second",
        "--model.tuning_batch_size=32",
        "--model.iterations=1",
        f"--trainer.callbacks.init_args.load_from={saved}",
        "--model.augment={flip_p: 0.5, max_shift: 1}",
        "--model.tune_with_uap=true",
        "--model.target_preserve_weight=1.0",
    )
    rows = second.model.session.target_rows  # the suspect's own predictions of the tuning batch
    assert rows is not None and rows.shape == (32,) and rows.dtype == torch.bool
    history = second.model.session.result.history
    assert ("target_preserve" in history[0]) == bool(rows.any())
    old, new = first.model.inversion, second.model.inversion
    assert new.target == old.target and new.identification is None
    assert torch.equal(new.trigger.mask.cpu(), old.trigger.mask.cpu())
    assert torch.equal(new.trigger.pattern.cpu(), old.trigger.pattern.cpu())
    assert new.inverted_asr == pytest.approx(old.inverted_asr)
    report = json.loads(
        (Path(second.trainer.default_root_dir) / "trigger_inversion" / "report.json").read_text()
    )
    assert report["config"]["loaded_from"] == str(saved)
    saved_report = json.loads((saved / "report.json").read_text())
    assert report["target_source"] == "loaded"
    assert report["target_confidence"] == saved_report["target_confidence"] is not None
    assert second.model.tuner.augment is not None
    # the identification UAP is saved and reloaded bit-exactly, and tuning used it as a second trigger
    old_state, new_state = old.uap.state_dict(), new.uap.state_dict()
    assert old_state.keys() == new_state.keys()
    assert all(torch.equal(new_state[k].cpu(), old_state[k].cpu()) for k in old_state)
    assert len(second.model.session.extra_triggers) == 1


def test_load_from_errors(victim, tmp_path) -> None:
    module = module_with_vocabulary(victim)
    images = [{"image": torch.rand(8, 3, 32, 32)}]
    with pytest.raises(FileNotFoundError, match=r"trigger\.safetensors"):
        TriggerInversion(load_from=str(tmp_path / "nothing")).load(module, images)
    folder = tmp_path / "saved"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file(
        {"mask": torch.ones(3, 16, 16), "pattern": torch.zeros(3, 16, 16)},
        str(folder / "trigger.safetensors"),
    )
    (folder / "report.json").write_text(json.dumps({"target": "unicorn"}))
    with pytest.raises(ValueError, match="'unicorn' is not in the class vocabulary"):
        TriggerInversion(load_from=str(folder)).load(module, images)
    (folder / "report.json").write_text(json.dumps({"target": "star"}))
    with pytest.raises(ValueError, match="does not fit this run's images"):
        TriggerInversion(load_from=str(folder)).load(module, images)


def test_tuning_with_the_uap_needs_an_identification(victim, tmp_path) -> None:
    with pytest.raises(ValueError, match="tune_with_uap needs the identification UAP"):
        run_cli(
            "invertune_clip_shapes.yaml",
            victim,
            tmp_path,
            "--model.tuning_batch_size=32",
            "--model.tune_with_uap=true",
            "--trainer.callbacks.init_args.target=star",
            "--trainer.callbacks.init_args.epochs=1",
        )


def test_labelled_tuning_rows_and_the_label_term_use_the_clean_set_labels(victim, tmp_path) -> None:
    common = (
        "--model.tuning_batch_size=32",
        "--model.iterations=1",
        "--model.tune_with_uap=false",
        "--model.target_preserve_weight=1.0",
        "--trainer.callbacks.init_args.target=circle",
        "--trainer.callbacks.init_args.epochs=1",
    )
    cli = run_cli(
        "invertune_clip_shapes.yaml",
        victim,
        tmp_path / "label",
        *common,
        "--model.target_rows=label",
        "--model.label_weight=0.5",
    )
    session, dm = cli.model.session, cli.trainer.datamodule
    circle = dm.class_names.index("circle")
    # each tuning image's label, looked up in the defender's clean set itself
    clean = torch.stack([dm.train_set[i]["image"] for i in range(len(dm.train_set))])
    labels = torch.tensor([int(dm.train_set[i]["label"]) for i in range(len(dm.train_set))])
    matches = (session.x.cpu()[:, None] == clean[None]).flatten(2).all(-1)
    assert bool((matches.sum(1) == 1).all()), "every tuning image is one clean-set image"
    expected = labels[matches.float().argmax(1)] == circle
    assert bool(expected.any()), "the batch holds labelled circles (else the test checks nothing)"
    assert torch.equal(session.target_rows.cpu(), expected)
    assert torch.equal(session.labels.cpu(), labels[matches.float().argmax(1)])
    assert "label" in session.result.history[0]
    # the same images as with predicted rows: only the marking differs
    other = run_cli("invertune_clip_shapes.yaml", victim, tmp_path / "predicted", *common)
    assert torch.equal(other.model.session.x, session.x)


def test_target_rows_must_be_predicted_or_label(victim) -> None:
    with pytest.raises(ValueError, match=r"model\.target_rows must be 'predicted' or 'label', got 'both'"):
        InverTuneModule(victim=str(victim), target_rows="both")
    with pytest.raises(
        ValueError, match=r"spare_target_ratio .* needs model\.target_rows: label, got 'predicted'"
    ):
        InverTuneModule(victim=str(victim), spare_target_ratio=0.5)


def test_validating_during_tuning_logs_a_trajectory_and_changes_no_weight(victim, tmp_path) -> None:
    common = (
        "--model.tuning_batch_size=32",
        "--model.iterations=6",
        "--trainer.callbacks.init_args.target=circle",
        "--trainer.callbacks.init_args.epochs=1",
        "--model.tune_with_uap=false",
    )
    plain = run_cli("invertune_clip_shapes.yaml", victim, tmp_path / "plain", *common)
    watched = run_cli(
        "invertune_clip_shapes.yaml",
        victim,
        tmp_path / "watched",
        *common,
        "--trainer.val_check_interval=2",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path / 'logs'}",
    )
    (metrics,) = (tmp_path / "logs").rglob("metrics.csv")
    with metrics.open() as handle:
        steps = [row["step"] for row in csv.DictReader(handle) if row.get("val/ca")]
    assert len(steps) >= 3, f"validation ran at steps {steps} only"  # every 2 of 6 steps, then the end
    for cli in (plain, watched):
        assert cli.model.tuning_result.best_iteration >= 0
    first = load_file(str(Path(plain.trainer.mmbackdoor_export) / "model.safetensors"))
    second = load_file(str(Path(watched.trainer.mmbackdoor_export) / "model.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first), "validating moved the tuned weights"


def test_warp_estimate_is_fitted_saved_reloaded_and_tuned_against(victim, tmp_path) -> None:
    common = ("--model.tuning_batch_size=32", "--model.iterations=1", "--model.tune_with_uap=false")
    first = run_cli(
        "invertune_clip_shapes.yaml",
        victim,
        tmp_path / "first",
        *common,
        "--trainer.callbacks.init_args.target=circle",
        "--trainer.callbacks.init_args.epochs=1",
        "--trainer.callbacks.init_args.warp_epochs=1",
        "--model.tune_with_warp=true",
    )
    outcome = first.model.inversion
    assert outcome.warp is not None and 0.0 <= outcome.warp_asr <= 1.0
    assert first.model.session.extra_triggers == [outcome.warp]
    saved = Path(first.trainer.default_root_dir) / "trigger_inversion"
    report = json.loads((saved / "report.json").read_text())
    assert report["warp"]["grid"] == 4 and report["config"]["warp"]["epochs"] == 1
    assert (saved / "warp.safetensors").is_file() and (saved / "warp_examples.png").is_file()
    second = run_cli(
        "invertune_clip_shapes.yaml",
        victim,
        tmp_path / "second",
        *common,
        f"--trainer.callbacks.init_args.load_from={saved}",
        "--model.tune_with_warp=true",
    )
    assert torch.equal(second.model.inversion.warp.control.cpu(), outcome.warp.control.cpu())
    assert second.model.inversion.warp_asr == pytest.approx(outcome.warp_asr)
    with pytest.raises(ValueError, match="tune_with_warp needs a warp trigger estimate"):
        run_cli(
            "invertune_clip_shapes.yaml",
            victim,
            tmp_path / "third",
            *common,
            "--trainer.callbacks.init_args.target=circle",
            "--trainer.callbacks.init_args.epochs=1",
            "--model.tune_with_warp=true",
        )


def test_extra_trigger_estimates_follow_the_config_and_name_a_missing_one() -> None:
    uap, warp = nn.Identity(), nn.Identity()
    assert TuneConfig.from_config({}).extra_trigger_estimates(uap, warp) == []
    assert TuneConfig.from_config({"tune_with_uap": True, "tune_with_warp": True}).extra_trigger_estimates(
        uap, warp
    ) == [uap, warp]
    assert TuneConfig.from_config({"tune_with_warp": True}).extra_trigger_estimates(None, warp) == [warp]
    with pytest.raises(ValueError, match="tune_with_uap needs the identification UAP"):
        TuneConfig.from_config({"tune_with_uap": True}).extra_trigger_estimates(None, warp)
    with pytest.raises(ValueError, match="tune_with_warp needs a warp trigger estimate"):
        TuneConfig.from_config({"tune_with_warp": True}).extra_trigger_estimates(uap, None)


def test_oracle_trigger_tunes_against_the_real_trigger_and_says_so(victim, tmp_path) -> None:
    cli = run_cli(
        "invertune_clip_shapes.yaml",
        victim,
        tmp_path,
        "--model.tuning_batch_size=32",
        "--model.iterations=1",
        "--model.tune_with_uap=false",
        "--trainer.callbacks.init_args.uap_epochs=1",
        "--trainer.callbacks.init_args.epochs=1",
        "--trainer.callbacks.init_args.oracle_trigger=true",
    )
    real = cli.datamodule.image_trigger
    outcome = cli.model.inversion
    assert outcome.tuning_trigger is real and cli.model.session.trigger is real
    # the tuning pairs X' with the real BadNet patch, not with the inverted mask and pattern
    images = torch.rand(4, 3, 32, 32)
    assert not torch.equal(real(images), outcome.trigger(images))
    assert cli.model.report()["inversion"]["oracle_trigger"] is True
    saved = json.loads((Path(cli.trainer.default_root_dir) / "trigger_inversion" / "report.json").read_text())
    assert saved["oracle_trigger"] is True and saved["config"]["oracle_trigger"] is True


def test_oracle_trigger_without_an_attack_is_an_error(victim, tmp_path) -> None:
    with pytest.raises(ValueError, match="oracle_trigger: DefenderShapesDataModule has no image trigger"):
        run_cli(
            "invertune_clip_shapes.yaml",
            victim,
            tmp_path,
            "--data.init_args.attack=null",
            "--trainer.callbacks.init_args.oracle_trigger=true",
        )
