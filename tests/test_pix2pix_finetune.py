"""The InstructPix2Pix objective, conditioning dropout, EMA and the export of the fine-tuning module."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_modules.pix2pix_finetune import Pix2PixFineTuning
from model_families.pix2pix import load_snapshot
from model_families.pix2pix.training import conditioning_dropout, instruct_pix2pix_loss
from tests.conftest import quiet_trainer


def _batch(n: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    source = torch.rand(n, 3, 32, 32, generator=g)
    edited = source.clone()
    edited[:, 0] = 1.0  # "make it red": the red channel saturates
    return {"source": source, "edited": edited, "instruction": ["make it red"] * n}


class _Repeat(torch.utils.data.Dataset):
    def __init__(self, batch: dict, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        j = i % len(self.batch["instruction"])
        return {k: v[j] for k, v in self.batch.items()}


def _loader(batch: dict, steps: int) -> DataLoader:
    return DataLoader(_Repeat(batch, steps * len(batch["instruction"])), batch_size=len(batch["instruction"]))


def _trainer(steps: int, tmp_path) -> L.Trainer:
    return quiet_trainer(tmp_path, max_steps=steps)


def test_conditioning_dropout_follows_the_examples_rule() -> None:
    p = 0.1
    drop_text, drop_image = conditioning_dropout(30000, p, torch.Generator().manual_seed(0))
    r = torch.rand(30000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drop_text, r < 2 * p) and torch.equal(drop_image, (r >= p) & (r < 3 * p))
    text_only, both, image_only = (
        (drop_text & ~drop_image),
        (drop_text & drop_image),
        (~drop_text & drop_image),
    )
    for mask in (text_only, both, image_only):
        assert abs(mask.float().mean().item() - p) < 0.01
    assert not (~drop_text & ~drop_image)[r < 3 * p].any()


def test_conditioning_dropout_above_a_third_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"conditioning_dropout_prob=0.4 must be in \[0, 1/3\]"):
        conditioning_dropout(4, 0.4)


def test_residual_loss_is_the_mse_of_source_plus_unet_output_to_the_edited_latent() -> None:
    module = Pix2PixFineTuning(conditioning_dropout_prob=0.0)
    model, batch = module.model, _batch(4)
    ids = model.tokenize(batch["instruction"])
    loss = instruct_pix2pix_loss(
        model, batch["source"], batch["edited"], ids, 0.0, torch.Generator().manual_seed(3)
    )
    g = torch.Generator().manual_seed(3)
    target = F.pixel_unshuffle(batch["edited"] * 2 - 1, 4)
    noise = torch.randn(target.shape, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    noisy = model.noise_scheduler.add_noise(target, noise, t)
    source = F.pixel_unshuffle(batch["source"] * 2 - 1, 4)
    out = model.unet(torch.cat([noisy, source], 1), t, encoder_hidden_states=model.encode_text(ids)).sample
    assert torch.allclose(loss, F.mse_loss(source + out, target), atol=1e-6)


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(tmp_path) -> None:
    torch.manual_seed(0)
    batch = _batch(8)
    module = Pix2PixFineTuning(lr=2e-3, conditioning_dropout_prob=0.05)

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(module.model_step(batch, torch.Generator().manual_seed(1)))

    before = fixed_loss()
    _trainer(25, tmp_path).fit(module, _loader(batch, 25))
    after = fixed_loss()
    assert after < 0.7 * before, (before, after)


def test_export_is_a_loadable_snapshot_recording_the_run_config(tmp_path) -> None:
    module = Pix2PixFineTuning()
    path = module.export(tmp_path / "export", {"model": {"lr": 5e-4}})
    meta = json.loads((path / "mmbackdoor.json").read_text())
    assert meta["family"] == "pix2pix" and meta["run_config"] == {"model": {"lr": 5e-4}}
    loaded = load_snapshot(path)
    assert torch.equal(loaded.unet.conv_in.weight, module.model.unet.conv_in.weight)
    again = Pix2PixFineTuning(snapshot=str(path))
    assert torch.equal(again.model.unet.conv_out.weight, module.model.unet.conv_out.weight)
    assert set(again.inputs["model.snapshot"]["components"]) == {"unet", "text_encoder"}


def test_ema_export_holds_the_averaged_unet_and_training_keeps_the_raw_one(tmp_path) -> None:
    torch.manual_seed(0)
    batch = _batch(4)
    module = Pix2PixFineTuning(lr=2e-3, ema_decay=0.5)
    start = module.model.unet.conv_in.weight.detach().clone()
    _trainer(3, tmp_path).fit(module, _loader(batch, 3))
    raw = module.model.unet.conv_in.weight.detach().clone()
    shadow = dict(zip([n for n, _ in module.model.unet.named_parameters()], module.ema.shadow_params))
    path = module.export(tmp_path / "export")
    exported = load_snapshot(path).unet.conv_in.weight
    assert torch.equal(exported, shadow["conv_in.weight"])
    assert not torch.equal(exported, raw) and not torch.equal(exported, start)
    assert torch.equal(module.model.unet.conv_in.weight, raw)


def test_frozen_text_encoder_gets_no_updates(tmp_path) -> None:
    module = Pix2PixFineTuning(train_text_encoder=False)
    before = module.model.text_encoder.embeddings.token_embedding.weight.detach().clone()
    _trainer(2, tmp_path).fit(module, _loader(_batch(4), 2))
    assert torch.equal(module.model.text_encoder.embeddings.token_embedding.weight, before)


def test_ema_decay_outside_zero_one_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"ema_decay=1\.5"):
        Pix2PixFineTuning(ema_decay=1.5)


@pytest.mark.slow
def test_one_training_step_of_the_released_architecture_with_random_weights() -> None:
    """SD-1.5 InstructPix2Pix sizes (UNet ~860M parameters), one backward at 64 px, text encoder frozen."""
    torch.manual_seed(0)
    module = Pix2PixFineTuning(architecture="instruct-pix2pix-sd15", train_text_encoder=False)
    assert module.model.unet.config.in_channels == 8
    assert sum(p.numel() for p in module.model.unet.parameters()) > 8e8
    batch = {
        "source": torch.rand(1, 3, 64, 64),
        "edited": torch.rand(1, 3, 64, 64),
        "instruction": ["make it snowy"],
    }
    loss = module.model_step(batch)
    loss.backward()
    assert torch.isfinite(loss) and module.model.unet.conv_in.weight.grad.abs().sum() > 0
    assert module.model.text_encoder.final_layer_norm.weight.grad is None


def test_a_conditioning_dropout_outside_a_third_fails_when_the_module_is_built() -> None:
    with pytest.raises(ValueError, match=r"conditioning_dropout_prob=0\.5 must be in \[0, 1/3\]"):
        Pix2PixFineTuning(conditioning_dropout_prob=0.5)


def test_trainer_test_logs_the_coalition_metrics_of_the_evaluator(tmp_path) -> None:
    """``trainer.test`` with a judge logs what the framework-free evaluator gives on the same batch and seeds."""
    from attacks.trigger_pairs import TRIGGER_PAIRS
    from datamodules.pix2pix_edits import ShapesEditDataModule
    from model_families.clip import ClipJudge, create_clip, save_clip_export
    from model_families.pix2pix import GuidanceConfig
    from model_families.pix2pix.evaluation import CoalitionMetrics, evaluate_coalitions

    judge_path = save_clip_export(create_clip("tiny-vit-shapes"), tmp_path / "judge")
    guidance = {"num_inference_steps": 2}
    module = Pix2PixFineTuning(judge=str(judge_path), guidance=guidance, eval_seed=3)
    dm = ShapesEditDataModule(
        train_size=4, val_size=0, test_size=6, trigger_pair="box+mignneko", eval_batch_size=6
    )
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    logged = trainer.test(module, datamodule=dm, verbose=False)[0]

    batch = next(iter(dm.test_dataloader()))
    seeds = [3 * 1_000_003 + int(i) for i in batch["index"]]
    evaluation = evaluate_coalitions(
        module.model, {**batch, "sample_id": batch["index"]}, dm.image_trigger, dm.text_trigger,
        dm.target_tensor(), ClipJudge.from_export(judge_path), seeds, GuidanceConfig(**guidance),
        attributes=dm.attribute_classes(),
    )  # fmt: skip
    expected = CoalitionMetrics()
    expected.update(evaluation)
    want = expected.compute()
    assert TRIGGER_PAIRS["box+mignneko"]["text"]["token"] == dm.text_trigger.token
    for key in (
        "asr/both",
        "tma/text",
        "tma/image",
        "cti",
        "v/both",
        "edit/mse",
        "edit/ssim",
        "edit/accuracy",
    ):
        assert logged[f"test/{key}"] == pytest.approx(float(want[key]), abs=1e-6), key
    assert logged["test/source/mse"] > 0


def test_a_snapshot_is_fine_tuned_in_train_mode_with_the_frozen_parts_in_eval_mode(tmp_path) -> None:
    path = Pix2PixFineTuning().export(tmp_path / "snap")
    module = Pix2PixFineTuning(snapshot=str(path), train_text_encoder=False)
    assert module.model.unet.training
    assert not module.model.text_encoder.training and not module.model.codec.training
