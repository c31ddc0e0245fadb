"""The datamodule's image size is checked against the CLIP model's at setup, naming the key to change.

Before, a tiny CLIP (fixed 32 px) fed 28 or 64 px images failed deep in torch pooling on the first batch.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from datamodules.image_text import check_image_size
from mmbackdoor_cli.pipeline import train
from model_families.clip import create_clip, save_clip_export
from tests.conftest import tiny_overrides


@pytest.mark.parametrize("image_size", [28, 64])
def test_clip_fine_tuning_on_images_of_another_size_fails_at_setup_naming_the_key(tmp_path, image_size):
    with pytest.raises(ValueError) as err:
        train(
            "configs/clip_shapes_clean.yaml",
            *tiny_overrides(tmp_path / "run", train_size=16, val_size=8, test_size=8),
            f"--data.init_args.image_size={image_size}",
        )
    message = str(err.value)
    assert f"gives {image_size} px images" in message and "'tiny-rn-shapes' takes 32 px" in message
    assert "set data.init_args.image_size=32" in message
    assert not list(tmp_path.rglob("*.ckpt"))  # stopped before the first training step


def test_invertune_on_images_of_another_size_fails_at_setup_naming_the_key(tmp_path):
    victim = save_clip_export(create_clip("tiny-vit-shapes"), tmp_path / "victim")
    with pytest.raises(
        ValueError, match=r"'tiny-vit-shapes' takes 32 px: set data\.init_args\.image_size=32"
    ):
        train(
            "configs/invertune_clip_shapes.yaml",
            "--trainer.logger=false",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            f"--model.init_args.victim={victim}",
            "--data.init_args.clean_size=8",
            "--data.init_args.val_size=8",
            "--data.init_args.test_size=8",
            "--data.init_args.image_size=48",
        )


def test_matching_sizes_and_datamodules_without_a_size_pass() -> None:
    check_image_size(224, SimpleNamespace(image_size=224), "RN50")
    check_image_size(224, SimpleNamespace(), "RN50")
    with pytest.raises(
        ValueError, match=r"SimpleNamespace gives 256 px images .* data\.init_args\.image_size=224"
    ):
        check_image_size(224, SimpleNamespace(image_size=256), "ViT-B-32")
