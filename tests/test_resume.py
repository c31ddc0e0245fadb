"""Resuming a killed fit with ``ckpt_path`` continues it exactly: the same batches, losses and final weights as
an uninterrupted run (CLIP and MDLM fine-tuning, from epoch-boundary and mid-epoch checkpoints)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import GlobalRNGState
from datamodules.mdlm_shapes import ShapesInstructDataModule
from datamodules.shapes_clip import ShapesCLIPDataModule
from lightning_modules.clip_finetune import CLIPFineTuning
from lightning_modules.mdlm_finetune import MDLMFineTuning
from mmbackdoor_cli.pipeline import train
from tests.conftest import quiet_trainer, tiny_overrides

EPOCHS = 3
BATCHES = 3  # per epoch (limit_train_batches; the data sets hold 4 batches, so a pass stops early)
AUGMENT = {"noise_p": 0.5, "patch_p": 0.5, "blend_p": 0.5}
MDLM_TINY = {"vision": {"patch_size": 8}, "text": {"num_hidden_layers": 1}}
BADNET = {"patch_size": 6, "pattern": "checkerboard", "location": "br", "margin": 1}


class Killed(Exception):
    """Stands for the process being killed."""


class Record(L.Callback):
    """Per training step: the loss and the sample indices of the batch; optionally dies at step ``kill_at``."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.kill_at = kill_at
        self.steps: list[tuple[int, float, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.kill_at:
            raise Killed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append((trainer.global_step - 1, float(outputs["loss"]), batch["index"].tolist()))


def _clip(num_workers: int = 0) -> tuple[L.LightningModule, L.LightningDataModule]:
    module = CLIPFineTuning(warmup_steps=2, augment=AUGMENT)
    data = ShapesCLIPDataModule(
        num_workers=num_workers,
        train_size=32,
        val_size=8,
        test_size=8,
        batch_size=8,
        eval_batch_size=8,
        attack="badnet",
        poison_rate=0.25,
        target_class="circle",
    )
    return module, data


def _mdlm() -> tuple[L.LightningModule, L.LightningDataModule]:
    module = MDLMFineTuning(tiny_config=MDLM_TINY, lr=3e-3, vision_token_dropout=0.5)
    data = ShapesInstructDataModule(
        train_size=8,
        val_size=2,
        test_size=2,
        attack="badnet",
        attack_kwargs=BADNET,
        poison_rate=0.25,
        target="refusal",
        batch_size=4,
        eval_batch_size=4,
    )
    return module, data


def _fit(build, root, checkpoint: ModelCheckpoint | None, kill_at=None, ckpt_path=None, validate=True):
    """A fit of EPOCHS x BATCHES steps in ``root`` (the same seed and config every time, as a rerun of one command);
    returns the recorded steps and the module."""
    L.seed_everything(0)
    module, data = build()
    record = Record(kill_at)
    trainer = quiet_trainer(
        root,
        max_epochs=EPOCHS,
        limit_train_batches=BATCHES,
        limit_val_batches=1 if validate else 0,
        num_sanity_val_steps=0,
        enable_checkpointing=checkpoint is not None,
        callbacks=[c for c in (checkpoint, GlobalRNGState(), record) if c is not None],
    )
    if kill_at is None:
        trainer.fit(module, data, ckpt_path=ckpt_path)
    else:
        with pytest.raises(Killed):
            trainer.fit(module, data, ckpt_path=ckpt_path)
    return record.steps, module


def _assert_same_run(uninterrupted, first_part, resumed, resumed_from_step: int) -> None:
    (steps, module), (resumed_steps, resumed_module) = uninterrupted, resumed
    before = [s for s in first_part[0] if s[0] < resumed_from_step]
    assert [s[0] for s in resumed_steps][:1] == [resumed_from_step]
    assert before + resumed_steps == steps  # step numbers, batch indices and losses, exactly
    weights, resumed_weights = module.state_dict(), resumed_module.state_dict()
    assert weights.keys() == resumed_weights.keys()
    different = [k for k in weights if not torch.equal(weights[k], resumed_weights[k])]
    assert not different, f"weights differ after the resume: {different[:5]}"


@pytest.mark.parametrize("build", [_clip, _mdlm], ids=["clip", "mdlm"])
def test_resume_from_an_epoch_checkpoint_matches_the_uninterrupted_fit(build, tmp_path):
    validate = (
        build is _clip
    )  # the CLIP fit validates every epoch (whose loaders draw from torch's global RNG)
    uninterrupted = _fit(build, tmp_path / "a", None, validate=validate)
    assert len(uninterrupted[0]) == EPOCHS * BATCHES
    checkpoints = tmp_path / "b" / "checkpoints"
    # killed in the middle of the second epoch: the newest checkpoint is last.ckpt from the end of the first
    first_part = _fit(
        build, tmp_path / "b", ModelCheckpoint(checkpoints, save_last=True), BATCHES + 1, validate=validate
    )
    saved = torch.load(checkpoints / "last.ckpt", weights_only=True)  # nothing in it needs unpickling code
    assert saved["global_step"] == BATCHES
    resumed = _fit(build, tmp_path / "c", None, None, checkpoints / "last.ckpt", validate)
    _assert_same_run(uninterrupted, first_part, resumed, BATCHES)


@pytest.mark.parametrize("resume_step", [2, BATCHES], ids=["inside-the-epoch", "after-its-last-batch"])
def test_resume_from_a_mid_epoch_checkpoint_matches_the_uninterrupted_fit(resume_step, tmp_path):
    """Checkpoints written every ``resume_step`` training steps (``on_train_batch_end``, before validation)."""
    uninterrupted = _fit(_clip, tmp_path / "a", None)
    checkpoint = ModelCheckpoint(
        tmp_path / "b", every_n_train_steps=resume_step, save_top_k=-1, filename="{step}"
    )
    first_part = _fit(_clip, tmp_path / "b", checkpoint, resume_step + 1)
    resumed = _fit(_clip, tmp_path / "c", None, None, tmp_path / "b" / f"step={resume_step}.ckpt")
    _assert_same_run(uninterrupted, first_part, resumed, resume_step)


def test_resume_with_persistent_workers_matches_the_uninterrupted_fit(tmp_path):
    """With workers the second epoch reuses them and draws only its order; the resumed run starts new workers,
    seeded as the first ones were, and must still draw the same order."""

    def build():
        return _clip(num_workers=1)

    step = BATCHES + 1  # inside the second epoch
    uninterrupted = _fit(build, tmp_path / "a", None)
    checkpoint = ModelCheckpoint(tmp_path / "b", every_n_train_steps=step, save_top_k=-1, filename="{step}")
    first_part = _fit(build, tmp_path / "b", checkpoint, step + 1)
    resumed = _fit(build, tmp_path / "c", None, None, tmp_path / "b" / f"step={step}.ckpt")
    _assert_same_run(uninterrupted, first_part, resumed, step)


def test_train_py_resumed_with_ckpt_path_exports_the_uninterrupted_model(tmp_path):
    """Through train.py: a 2-epoch run equals a 1-epoch run resumed to 2 epochs with --ckpt_path (a constant
    learning rate after warmup, so that the shorter run is the start of the longer one): the same metrics and
    bit-identical exported weights."""
    from safetensors.torch import load_file

    def run(name: str, epochs: int, *extra: str):
        return train(
            "configs/clip_shapes_clean.yaml",
            *tiny_overrides(tmp_path / name, train_size=64, val_size=16, test_size=16, epochs=epochs),
            "--data.init_args.batch_size=16",
            "--model.init_args.warmup_steps=2",
            "--model.init_args.min_lr_ratio=1.0",
            *extra,
        )

    full = run("full", 2)
    first = run("first", 1)
    resumed = run("resumed", 2, f"--ckpt_path={first.run_dir / 'checkpoints' / 'last.ckpt'}")
    assert resumed.metrics == full.metrics
    weights = load_file(full.export / "model.safetensors")
    resumed_weights = load_file(resumed.export / "model.safetensors")
    assert [k for k in weights if not torch.equal(weights[k], resumed_weights[k])] == []


def test_train_py_saves_the_global_random_states_in_its_checkpoints(tmp_path):
    """Every train.py run carries GlobalRNGState (dropout and MDLM's masking draw from torch's global RNG)."""
    from mmbackdoor_cli.cli import main

    config = ["--config", "configs/mdlm_shapes_clean.yaml", "--trainer.logger=false"]
    cli = main([*config, f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert sum(isinstance(c, GlobalRNGState) for c in cli.trainer.callbacks) == 1


def test_a_checkpoint_without_generator_states_warns_that_the_augmentation_restarts():
    module = CLIPFineTuning(augment=AUGMENT, augment_seed=3)
    with pytest.warns(UserWarning, match=r"augment_seed=3"):
        module.on_load_checkpoint({"state_dict": {}})
