"""The identification table script: one row per setting on the world's models (fast checks only; the
table itself is measured in docs/invertune.md)."""

from __future__ import annotations

import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def table():
    return load_script("identification_table")


def test_a_missing_model_is_named_with_the_command_that_makes_it(table, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"clip_fmnist_badnet.*attack_table.py --world fmnist"):
        table.main(["--world", "fmnist", "--models", str(tmp_path), "--output", str(tmp_path / "t.json")])


def test_the_defender_data_drops_the_reporting_trigger(table, tmp_path) -> None:
    config = {
        "data": {
            "class_path": "datamodules.defender_shapes.DefenderShapesDataModule",
            "init_args": {
                "clean_size": 16,
                "val_size": 8,
                "test_size": 8,
                "image_size": 32,
                "batch_size": 8,
                "attack": "badnet",
                "target_class": "star",
            },
        }
    }
    dm = table.defender_data(config)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[0] == 8 and len(dm.train_data) == 16
    assert "star" in dm.class_names
