"""BadCLIP-style optimised patch: the optimisation, its artifact, the ``patch_optimized`` trigger."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from attacks import (
    OptimizedPatch,
    build_image_trigger,
    list_attacks,
    load_patch_artifact,
    save_patch_artifact,
)
from attacks.badclip import PatchOptimizationConfig, optimize_patch, paste_patch, patch_box
from attacks.optimized_patch import MANIFEST_FILE, PATCH_FILE
from datamodules.shapes_clip import ShapesCLIPDataModule, cached_world
from embedded_world import ShapesWorld
from model_families.clip import create_clip


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return create_clip("tiny-rn-shapes")


@pytest.fixture(scope="module")
def world():
    world = cached_world("train", 96, 0, 32, 0.25)
    return world.images.float() / 255.0, world.labels


def _optimise(tiny_clip, world, **overrides):
    images, labels = world
    settings = {
        "target_class": "star",
        "patch_size": 12,
        "steps": 12,
        "batch_size": 16,
        "lr": 0.1,
        **overrides,
    }
    bundle = tiny_clip
    return optimize_patch(
        bundle.model,
        bundle.tokenizer,
        bundle.normalize,
        images,
        labels,
        ShapesWorld.class_names,
        PatchOptimizationConfig(**settings),
    )


def test_patch_optimisation_lowers_its_loss_and_repeats_from_its_seed(tiny_clip, world):
    before = {k: v.clone() for k, v in tiny_clip.model.state_dict().items()}
    tiny_clip.model.train()
    first = _optimise(tiny_clip, world)
    assert first.final["total"] < first.initial["total"] - 1e-3
    assert first.final["text"] < first.initial["text"]
    assert len(first.history) == 12 and first.patch.shape == (3, 12, 12)
    assert 0.0 <= float(first.patch.min()) and float(first.patch.max()) <= 1.0
    again = _optimise(tiny_clip, world)
    assert torch.equal(first.patch, again.patch) and first.final == again.final
    other = _optimise(tiny_clip, world, seed=1)
    assert not torch.equal(first.patch, other.patch)
    # the clean model is only read: same weights, its train flag restored
    assert tiny_clip.model.training
    after = tiny_clip.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_final_target_rate_is_the_clean_model_prediction_rate_on_patched_images(tiny_clip, world):
    images, labels = world
    result = _optimise(tiny_clip, world, steps=2)
    target = ShapesWorld.class_names.index("star")
    from model_families.clip import zero_shot_predict, zero_shot_weights

    weights = zero_shot_weights(tiny_clip.model, tiny_clip.tokenizer, ShapesWorld.class_names, "embedded")
    sources = images[labels != target]
    box = patch_box(PatchOptimizationConfig("star", patch_size=12), 32, 32)
    tiny_clip.model.eval()
    predicted = zero_shot_predict(
        tiny_clip.model, paste_patch(sources, result.patch, box), weights, tiny_clip.normalize
    )
    assert result.final["target_rate"] == pytest.approx(float((predicted == target).float().mean()), abs=1e-6)


def test_patch_box_is_where_badnet_puts_the_patch():
    assert patch_box(PatchOptimizationConfig("star", patch_size=4), 32, 32) == (14, 14, 4)
    assert patch_box(PatchOptimizationConfig("star", patch_size=4, location="br", margin=1), 32, 32) == (
        27,
        27,
        4,
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"location": "random"}, "must be fixed"),
        ({"steps": 0}, "steps must be an int >= 1"),
        ({"text_weight": 0.0, "image_weight": 0.0}, "not both 0"),
    ],
)
def test_bad_optimisation_settings_are_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        PatchOptimizationConfig("star", **overrides)


def test_unknown_target_class_is_an_error(tiny_clip, world):
    with pytest.raises(ValueError, match=r"target_class 'starr' is not one of the classes"):
        _optimise(tiny_clip, world, target_class="starr")


def _artifact(folder, value=0.25):
    patch = torch.full((3, 4, 4), value)
    patch[0, 0, 0] = 1.0
    save_patch_artifact(folder, patch, image_size=32, location="center", record={"seed": 3})
    return patch


def test_artifact_round_trips_and_the_trigger_pastes_it_at_its_location(tmp_path):
    patch = _artifact(tmp_path / "a")
    artifact = load_patch_artifact(tmp_path / "a")
    assert torch.equal(artifact.patch, patch)
    assert artifact.manifest["seed"] == 3 and artifact.manifest["image_size"] == [32, 32]
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    trigger = OptimizedPatch(tmp_path / "a")
    expected = images.clone()
    expected[:, :, 14:18, 14:18] = patch
    assert torch.equal(trigger(images), expected)
    rebuilt = build_image_trigger(**trigger.config())
    assert isinstance(rebuilt, OptimizedPatch) and rebuilt.fingerprint() == trigger.fingerprint()
    assert OptimizedPatch(tmp_path / "a", location="tl").config()["location"] == "tl"


def test_existing_artifact_is_not_overwritten(tmp_path):
    _artifact(tmp_path / "a")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        _artifact(tmp_path / "a", value=0.5)
    save_patch_artifact(tmp_path / "a", torch.zeros(3, 4, 4), image_size=32, location="br", overwrite=True)
    assert load_patch_artifact(tmp_path / "a").manifest["location"] == "br"


def test_tampered_patch_is_an_error_naming_the_file(tmp_path):
    _artifact(tmp_path / "a")
    save_file({"patch": torch.ones(3, 4, 4)}, str(tmp_path / "a" / PATCH_FILE))
    with pytest.raises(ValueError, match=r"patch\.safetensors does not match its manifest: sha256"):
        OptimizedPatch(tmp_path / "a")


def test_manifest_of_another_format_or_shape_is_an_error(tmp_path):
    _artifact(tmp_path / "a")
    manifest_path = tmp_path / "a" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "patch_shape": [3, 5, 5]}))
    with pytest.raises(
        ValueError, match=r"patch of shape \[3, 4, 4\] but .* records patch_shape \[3, 5, 5\]"
    ):
        load_patch_artifact(tmp_path / "a")
    manifest_path.write_text(json.dumps({**manifest, "format_version": 7}))
    with pytest.raises(ValueError, match="format_version 7 is not supported"):
        load_patch_artifact(tmp_path / "a")
    del manifest["patch_sha256"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="missing key 'patch_sha256'"):
        load_patch_artifact(tmp_path / "a")


def test_missing_artifact_is_a_clear_error(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"'.*nowhere' is not a folder \(make it with scripts/optimize_patch.py"
    ):
        build_image_trigger("patch_optimized", patch=str(tmp_path / "nowhere"))
    _artifact(tmp_path / "a")
    (tmp_path / "a" / MANIFEST_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"patch_manifest\.json is missing"):
        OptimizedPatch(tmp_path / "a")


def test_patch_outside_the_unit_interval_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"patch values must be in \[0, 1\]"):
        save_patch_artifact(tmp_path / "a", torch.full((3, 4, 4), 1.5), image_size=32, location="center")
    with pytest.raises(ValueError, match="non-finite"):
        save_patch_artifact(
            tmp_path / "b", torch.full((3, 4, 4), float("nan")), image_size=32, location="center"
        )


def test_patch_for_another_image_size_is_refused(tmp_path):
    _artifact(tmp_path / "a")
    with pytest.raises(ValueError, match=r"was optimised for 32x32 images, got 16x16"):
        OptimizedPatch(tmp_path / "a")(torch.rand(1, 3, 16, 16))


def test_registry_and_datamodule_build_the_patch_trigger(tmp_path):
    _artifact(tmp_path / "a")
    assert isinstance(build_image_trigger("patch_optimized", patch=str(tmp_path / "a")), OptimizedPatch)
    rows = {row.name: row for row in list_attacks()}
    assert rows["patch_optimized"].status == "available" and "BadCLIP" in rows["patch_optimized"].note
    dm = ShapesCLIPDataModule(
        train_size=100,
        val_size=20,
        test_size=20,
        attack="patch_optimized",
        attack_kwargs={"patch": str(tmp_path / "a")},
        poison_rate=0.05,
        target_class="star",
    )
    dm.trainer = SimpleNamespace(
        default_root_dir=str(tmp_path), global_rank=0, world_size=1, training=True, mmbackdoor_config={}
    )
    dm.setup("fit")
    assert isinstance(dm.image_trigger, OptimizedPatch)
    recorded = json.loads((tmp_path / "poison_manifest.json").read_text())["image_trigger"]
    assert recorded["config"]["patch"] == str(tmp_path / "a")
    assert recorded["fingerprint"] == dm.image_trigger.fingerprint()
    assert len(recorded["config"]) == 5 and recorded["config"]["name"] == "patch_optimized"


def _attack_table():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "attack_table.py"
    spec = importlib.util.spec_from_file_location("attack_table", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attack_table_makes_the_patch_of_a_badclip_config_once_per_clean_model(tmp_path, monkeypatch):
    from model_families.clip import save_clip_export
    from model_families.loading import input_provenance

    table = _attack_table()
    assert "badclip" in table.ATTACKS
    torch.manual_seed(0)
    clean = save_clip_export(create_clip("tiny-rn-shapes"), tmp_path / "clean")
    config = tmp_path / "badclip.yaml"
    patch = tmp_path / "patch"
    config.write_text(
        "data:\n  init_args:\n    attack: patch_optimized\n"
        f"    attack_kwargs: {{patch: {patch}}}\n    target_class: star\n"
    )
    calls = []
    monkeypatch.setattr(table, "make_patch", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert table.prepare_trigger(str(config), clean).startswith("optimised")
    assert calls[0][0][:2] == (clean, patch) and calls[0][0][2].target_class == "star"
    assert calls[0][1] == {"overwrite": True}
    save_patch_artifact(
        patch,
        torch.zeros(3, 4, 4),
        image_size=32,
        location="center",
        record={"clean_model": input_provenance(clean)},
    )
    assert table.prepare_trigger(str(config), clean).startswith("reused") and len(calls) == 1
    config.write_text("data:\n  init_args:\n    attack: badnet\n    target_class: star\n")
    assert table.prepare_trigger(str(config), clean) is None
