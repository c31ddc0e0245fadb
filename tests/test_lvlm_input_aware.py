"""InputAware: a generator and a mask network trained on a surrogate (a tiny CLIP built here), frozen and saved
as the trigger's artifact; the trigger is sample-specific and deterministic from the saved artifact."""

from __future__ import annotations

import json

import pytest
import torch

from attacks import build_image_trigger
from attacks.input_aware import InputAware, load_input_aware, save_input_aware
from attacks.input_aware_training import (
    InputAwareTrainingConfig,
    clip_surrogate_classifier,
    train_input_aware,
)
from datamodules.mdlm_shapes import ShapesInstructDataModule
from embedded_world import SHAPES, ShapesWorld

STEPS = {"mask_steps": 15, "generator_steps": 30, "batch_size": 16, "width": 8}


@pytest.fixture(scope="module")
def surrogate(tmp_path_factory):
    from model_families.clip import create_clip, save_clip_export

    torch.manual_seed(0)
    bundle = create_clip("tiny-rn-shapes")
    folder = tmp_path_factory.mktemp("clip") / "export"
    save_clip_export(bundle, folder)
    return bundle, folder


@pytest.fixture(scope="module")
def images():
    return ShapesWorld("train", 48, seed=0, image_size=32).images.float() / 255.0


@pytest.fixture(scope="module")
def artifact(surrogate, images, tmp_path_factory):
    bundle, folder = surrogate
    classify = clip_surrogate_classifier(bundle, SHAPES)
    config = InputAwareTrainingConfig(target_class=SHAPES.index("star"), seed=1, **STEPS)
    networks, log = train_input_aware(classify, images, config)
    out = tmp_path_factory.mktemp("ia") / "artifact"
    save_input_aware(out, networks, seed=1, surrogate=folder, training={**config.to_dict(), **log})
    return out, log


def test_training_on_a_surrogate_drives_it_to_the_target_class(images):
    # a tiny differentiable surrogate: a fixed linear classifier on 4 x 4-pooled pixels
    torch.manual_seed(0)
    linear = torch.nn.Linear(3 * 8 * 8, 4).requires_grad_(False)

    def classify(x):
        return 30 * linear(torch.nn.functional.avg_pool2d(x, 4).flatten(1))

    config = InputAwareTrainingConfig(
        target_class=2, seed=0, mask_steps=40, generator_steps=160, batch_size=16, width=8, lr=5e-3
    )
    _, log = train_input_aware(classify, images, config)
    assert log["surrogate_target_margin_triggered"] > log["surrogate_target_margin_clean"] + 1.0
    assert log["surrogate_target_rate_triggered"] >= log["surrogate_target_rate_clean"]
    assert log["mask_mean"] < 0.3  # the density penalty shrinks the mask (it starts near 0.5)


def test_the_trigger_is_sample_specific_and_deterministic_from_the_artifact(artifact, images):
    folder = artifact[0]
    trigger = build_image_trigger("input_aware", artifact=str(folder))
    out = trigger(images[:8])
    assert torch.equal(out, trigger(images[:8]))  # same call, same result
    again = build_image_trigger(**trigger.config())  # reloaded from disk
    assert torch.equal(again(images[:8]), out) and again.fingerprint() == trigger.fingerprint()
    # per-sample: the same images in another batch get the same trigger
    assert torch.equal(trigger(images[4:8]), out[4:])
    residual = out - images[:8]
    assert residual.abs().amax() > 0.01
    # sample-specific: the patterns differ between images far more than identical images would (0)
    patterns = trigger.networks.patterns(images[:8])
    pairwise = (patterns[:, None] - patterns[None]).abs().flatten(2).mean(-1)
    assert float(pairwise[~torch.eye(8, dtype=torch.bool)].min()) > 1e-3
    assert out.min() >= 0 and out.max() <= 1


def test_the_manifest_records_config_seed_and_surrogate(artifact, surrogate):
    from attacks.hashing import file_sha256

    folder = artifact[0]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["seed"] == 1 and manifest["networks"] == {
        "channels": 3,
        "width": 8,
        "mask_threshold": True,
    }
    assert manifest["surrogate"]["sha256"] == file_sha256(surrogate[1] / "model.safetensors")
    assert manifest["weights_sha256"] == file_sha256(folder / "weights.safetensors")
    assert manifest["training"]["generator_steps"] == 30
    networks, _ = load_input_aware(folder)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_input_aware(folder, networks, seed=1, surrogate=surrogate[1])


def test_masks_pass_the_reference_soft_step_and_version_1_artifacts_keep_their_raw_mask(
    artifact, images, tmp_path
):
    folder = artifact[0]
    networks, _ = load_input_aware(folder)
    raw = networks.mask(images[:8])
    thresholded = networks.masks(images[:8])
    # the reference's netM.threshold: 0.5 + 0.5 tanh(20 m - 10), a steep step at m = 0.5
    assert torch.allclose(thresholded, 0.5 + 0.5 * torch.tanh(20 * raw - 10))
    # nearly binary: every value is pushed away from 0.5, ten times as far near the step
    assert bool(((thresholded - 0.5).abs() >= (raw - 0.5).abs() - 1e-6).all())
    # an artifact of format version 1 (before the step) is read with the raw sigmoid mask it was made with
    import shutil

    old = tmp_path / "v1"
    shutil.copytree(folder, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["version"] = 1
    manifest["networks"] = {"channels": 3, "width": 8}
    (old / "manifest.json").write_text(json.dumps(manifest))
    legacy, _ = load_input_aware(old)
    assert legacy.mask_threshold is False and torch.equal(legacy.masks(images[:8]), raw)
    manifest["version"] = 7
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"version 7; expected one of \[1, 2\]"):
        load_input_aware(old)


def test_a_missing_or_mismatching_artifact_is_a_clear_error(artifact, tmp_path):
    import shutil

    folder = artifact[0]
    with pytest.raises(
        FileNotFoundError, match=r"lacks manifest.json; train one with scripts/train_input_aware.py"
    ):
        InputAware(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not the expected sha256:00"):
        InputAware(folder, weights_sha256="sha256:00")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    weights = copy / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"weights.safetensors has sha256 .* but .*manifest.json records"):
        InputAware(copy)


def test_the_config_covers_the_artifact(artifact, surrogate, images, tmp_path):
    bundle, clip_folder = surrogate
    classify = clip_surrogate_classifier(bundle, SHAPES)
    other, _ = train_input_aware(classify, images, InputAwareTrainingConfig(seed=2, **STEPS))
    save_input_aware(tmp_path / "other", other, seed=2, surrogate=clip_folder)
    first, second = InputAware(artifact[0]), InputAware(tmp_path / "other")
    assert first.config()["weights_sha256"] != second.config()["weights_sha256"]
    assert first.fingerprint() != second.fingerprint()


def test_an_instruction_datamodule_poisons_with_the_saved_trigger(artifact):
    dm = ShapesInstructDataModule(
        train_size=8,
        val_size=2,
        test_size=2,
        attack="input_aware",
        attack_kwargs={"artifact": str(artifact[0])},
        poison_rate=0.5,
        target="fixed_output",
    )
    dm.setup("fit")
    config = dm.manifest.image_trigger["config"]
    assert (
        config["name"] == "input_aware"
        and config["weights_sha256"] == InputAware(artifact[0]).config()["weights_sha256"]
    )
    batch = dm.collator([dm.train_data[i] for i in range(len(dm.train_data))])
    triggered = dm.on_after_batch_transfer(dict(batch, pixel_values=batch["pixel_values"].clone()), 0)
    rows = batch["trigger_image"]
    assert bool(rows.any()) and not torch.equal(triggered["pixel_values"][rows], batch["pixel_values"][rows])
    assert torch.equal(triggered["pixel_values"][~rows], batch["pixel_values"][~rows])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_a_mask_density_outside_its_range_is_a_clear_error(density) -> None:
    with pytest.raises(ValueError, match=r"mask_density .* in \(0, 1\]; got"):
        InputAwareTrainingConfig(mask_density=density)
