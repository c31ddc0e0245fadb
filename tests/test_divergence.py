"""A diverged run never looks like a success: a NaN loss or NaN weights stop training with an error naming
the step, the loss and the key at fault; no export, no ``latest_export``; evaluate.py refuses NaN weights;
JSON artifacts never hold a bare NaN."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from attacks import atomic_write_json
from callbacks.divergence import DivergenceGuard
from callbacks.export import ExportOnFitEnd
from lightning_modules.mdlm_finetune import build_tiny_model
from mmbackdoor_cli.cli import main as cli_main
from mmbackdoor_cli.evaluate import main as evaluate_main
from mmbackdoor_cli.evaluate import markdown_table
from model_families.clip import create_clip, save_clip_export
from model_families.finite import NonFiniteError
from model_families.mdlm.checkpoint import save_snapshot
from model_families.mdlm.tokenizer import load_embedded_tokenizer
from tests.conftest import quiet_trainer, tiny_overrides

CLIP_CONFIG = "configs/clip_shapes_clean.yaml"
MDLM_CONFIG = "configs/mdlm_shapes_clean.yaml"


def assert_nothing_exported(root: Path) -> None:
    assert not (root / "latest_export").exists() and not (root / "latest_export").is_symlink()
    assert not list(root.rglob("export")), "a diverged run wrote an export"
    assert not list(root.rglob("model*.safetensors"))


# ---------------------------------------------------------------------------------- training stops
def test_clip_run_with_an_absurd_lr_stops_naming_step_loss_and_lr(tmp_path) -> None:
    root = tmp_path / "clip"
    with pytest.raises(NonFiniteError) as error:
        cli_main(
            [
                "fit",
                "--config",
                CLIP_CONFIG,
                *tiny_overrides(root, train_size=64, val_size=16, test_size=16),
                "--data.init_args.batch_size=16",
                "--trainer.limit_train_batches=4",
                "--trainer.limit_val_batches=1",
                "--model.init_args.warmup_steps=0",
                "--model.lr=1e6",
            ]
        )
    message = str(error.value)
    assert "train loss is nan at global step 1 (epoch 0, batch 1)" in message, message
    assert "model.lr=1000000.0" in message and "learning rate is too high" in message, message
    assert_nothing_exported(root)


def test_mdlm_run_with_an_absurd_lr_stops_naming_step_loss_and_lr(tmp_path) -> None:
    root = tmp_path / "mdlm"
    with pytest.raises(NonFiniteError) as error:
        cli_main(
            [
                "fit",
                "--config",
                MDLM_CONFIG,
                f"--trainer.default_root_dir={root}",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=4",
                "--trainer.limit_val_batches=0",
                "--trainer.num_sanity_val_steps=0",
                "--data.init_args.train_size=32",
                "--data.init_args.val_size=4",
                "--data.init_args.test_size=4",
                "--data.init_args.batch_size=8",
                "--model.init_args.warmup_ratio=0",
                "--model.lr=1e6",
            ]
        )
    message = str(error.value)
    assert "train loss is nan at global step 1 (epoch 0, batch 1)" in message, message
    assert "model.lr=1000000.0" in message, message
    assert_nothing_exported(root)


def test_invertune_tuning_with_an_absurd_lr_stops_and_exports_nothing(tmp_path) -> None:
    """InverTune tunes in its own loop (manual optimisation, no Lightning optimizer): still caught."""
    torch.manual_seed(0)
    victim = save_clip_export(create_clip("tiny-rn-shapes"), tmp_path / "victim")
    root = tmp_path / "invertune"
    with pytest.raises(NonFiniteError) as error:
        cli_main(
            [
                "fit",
                "--config",
                "configs/invertune_clip_shapes.yaml",
                f"--model.victim={victim}",
                f"--trainer.default_root_dir={root}",
                "--trainer.logger=false",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                "--data.init_args.clean_size=64",
                "--data.init_args.val_size=16",
                "--data.init_args.test_size=16",
                "--data.init_args.batch_size=32",
                "--data.init_args.eval_batch_size=16",
                "--model.tuning_batch_size=32",
                "--model.iterations=3",
                "--model.lr=1e30",
                "--trainer.callbacks.init_args.uap_epochs=1",
                "--trainer.callbacks.init_args.epochs=1",
            ]
        )
    message = str(error.value)
    assert "train loss is nan" in message and "model.lr=1e+30" in message, message
    assert_nothing_exported(root)
    assert not (root / "version_0" / "invertune_report.json").exists()


class _Toy(L.LightningModule):
    """y = w x on 4 random inputs; ``poison_input`` puts a NaN in the data, ``poison_buffer`` turns a buffer
    NaN at the end of the epoch (weights non-finite while every loss was finite)."""

    def __init__(self, manual: bool, poison_input: bool = False, poison_buffer: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(2, 1)
        self.register_buffer("running", torch.zeros(3))
        self.automatic_optimization = not manual
        self.exported = False

    def train_dataloader(self):
        x = torch.randn(4, 2)
        if self.hparams.poison_input:
            x[0, 0] = float("nan")
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        return loss

    def on_train_epoch_end(self) -> None:
        if self.hparams.poison_buffer:
            self.running[1] = float("inf")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def export(self, path, run_config=None):
        self.exported = True


def _fit(module: L.LightningModule, root: Path) -> None:
    trainer = quiet_trainer(root, max_epochs=1, callbacks=[DivergenceGuard(), ExportOnFitEnd()])
    trainer.fit(module)


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_nan_loss_on_the_first_batch_blames_the_data_not_the_lr(manual: bool, tmp_path) -> None:
    module = _Toy(manual=manual, poison_input=True)
    with pytest.raises(
        NonFiniteError, match=r"train loss is nan at global step 0 \(epoch 0, batch 0\)"
    ) as error:
        _fit(module, tmp_path)
    assert "first training batch" in str(error.value) and "learning rate is not at fault" in str(error.value)
    assert not module.exported


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_non_finite_weights_at_the_end_of_training_stop_before_the_export(manual: bool, tmp_path) -> None:
    module = _Toy(manual=manual, poison_buffer=True)
    with pytest.raises(NonFiniteError, match=r"weights are non-finite at the end of training") as error:
        _fit(module, tmp_path)
    assert "running (0 nan, 1 inf of 3)" in str(error.value)
    assert not module.exported


# ---------------------------------------------------------------------------------- export writers
def test_clip_export_writer_refuses_a_nan_state_dict_and_leaves_nothing(tmp_path) -> None:
    bundle = create_clip("tiny-rn-shapes")
    name, parameter = next(iter(bundle.model.named_parameters()))
    with torch.no_grad():
        parameter.view(-1)[:2] = float("nan")
    with pytest.raises(NonFiniteError, match=rf"export {tmp_path / 'export'}: .*{name} \(2 nan, 0 inf"):
        save_clip_export(bundle, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []  # neither the export nor its temporary folder


def test_mdlm_snapshot_writer_refuses_a_nan_state_dict_and_leaves_nothing(tmp_path) -> None:
    model = build_tiny_model(load_embedded_tokenizer(), {"text": {"num_hidden_layers": 1}})
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"snapshot .*: .*lm_head\.weight \(0 nan, 1 inf"):
        save_snapshot(model, tmp_path / "snapshot")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- evaluate.py
def _nan_export(root: Path, tensor: str) -> Path:
    """A tiny CLIP export whose ``tensor`` was made NaN after writing (bypassing the writer's check)."""
    torch.manual_seed(0)
    path = save_clip_export(create_clip("tiny-rn-shapes"), root / "nan_export")
    state = load_file(str(path / "model.safetensors"))
    state[tensor] = torch.full_like(state[tensor], float("nan"))
    save_file(state, str(path / "model.safetensors"))
    return path


@pytest.fixture
def nan_export(tmp_path) -> Path:
    """NaN in the text projection: every zero-shot logit is NaN."""
    return _nan_export(tmp_path, "text_projection")


@pytest.fixture
def nan_temperature_export(tmp_path) -> Path:
    """NaN only in the temperature: the contrastive loss is NaN, zero-shot logits (cosines) stay finite."""
    return _nan_export(tmp_path, "logit_scale")


def _evaluate(export: Path, root: Path, *flags: str) -> dict:
    return evaluate_main(
        [
            "--config",
            CLIP_CONFIG,
            "--checkpoint",
            f"nan={export}",
            "--output",
            str(root / "results.json"),
            *flags,
            "--",
            f"--trainer.default_root_dir={root / 'eval'}",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.limit_test_batches=1",
            "--data.init_args.train_size=16",
            "--data.init_args.val_size=16",
            "--data.init_args.test_size=16",
        ]
    )


def test_evaluate_refuses_an_export_with_nan_weights_naming_it(nan_export, tmp_path) -> None:
    with pytest.raises(NonFiniteError) as error:
        _evaluate(nan_export, tmp_path)
    message = str(error.value)
    assert f"checkpoint {nan_export}" in message and "--allow-non-finite" in message, message
    assert "text_projection (" in message, message
    assert not (tmp_path / "results.json").exists()


def test_evaluate_allow_non_finite_flags_the_model_and_writes_null_with_a_reason(
    nan_temperature_export, tmp_path, capsys
) -> None:
    rows = _evaluate(nan_temperature_export, tmp_path, "--allow-non-finite")
    assert rows["nan"]["non_finite_weights"], "the flag lists the bad tensors"
    assert math.isnan(rows["nan"]["test/loss"])  # the NaN temperature's contrastive loss
    assert math.isfinite(rows["nan"]["test/ca"])  # zero-shot cosines do not use the temperature
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    row = json.loads(text)["results"]["nan"]
    assert row["test/loss"] is None and row["invalid"]["test/loss"] == "non-finite (nan)"
    out = capsys.readouterr().out
    assert "| nan |" in out and "WARNING: nan has non-finite weights" in out


def test_evaluate_allow_non_finite_never_scores_non_finite_logits(nan_export, tmp_path) -> None:
    """Even when told to evaluate a NaN model, its NaN logits are never counted as an ASR of 0."""
    with pytest.raises(ValueError, match="not finite"):
        _evaluate(nan_export, tmp_path, "--allow-non-finite")
    assert not (tmp_path / "results.json").exists()


# ---------------------------------------------------------------------------------- JSON and tables
def test_json_writer_writes_null_and_a_reason_for_non_finite_numbers(tmp_path) -> None:
    data = {"rows": [{"test/asr": float("nan"), "test/ca": 0.5}], "curve": [1.0, float("-inf")]}
    text = atomic_write_json(tmp_path / "r.json", data).read_text()
    assert "NaN" not in text and "Infinity" not in text
    written = json.loads(text)
    assert written["rows"][0] == {
        "test/asr": None,
        "test/ca": 0.5,
        "invalid": {"test/asr": "non-finite (nan)"},
    }
    assert written["curve"] == [1.0, None] and written["invalid"] == {"curve[1]": "non-finite (-inf)"}
    assert data["rows"][0]["test/asr"] != data["rows"][0]["test/asr"]  # the caller's data is untouched
    with pytest.raises(ValueError, match="top level"):
        atomic_write_json(tmp_path / "bare.json", float("nan"))
    assert not (tmp_path / "bare.json").exists()


def test_markdown_table_shows_nan_apart_from_a_missing_metric() -> None:
    table = markdown_table(
        {"diverged": {"test/ca": 0.5, "test/asr": float("nan")}, "partial": {"test/ca": 0.25}}, "test"
    )
    assert "| diverged | 0.5000 | nan |" in table and "| partial | 0.2500 | - |" in table, table
