"""The InverTune sweep script's setting parser and inversion lookup (the runs themselves are the sweep)."""

from __future__ import annotations

import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def sweep():
    return load_script("invertune_sweep")


def test_settings_split_into_model_and_callback_keys(sweep) -> None:
    name, model, callback = sweep.parse_setting(
        "views+inv:augment={flip_p: 0.5, max_shift: 2};invariance_weight=0.5;cb.load_from=null"
    )
    assert name == "views+inv"
    assert model == {"augment": {"flip_p": 0.5, "max_shift": 2}, "invariance_weight": 0.5}
    assert callback == {"load_from": None}
    assert sweep.parse_setting("base") == ("base", {}, {})
    with pytest.raises(ValueError, match="expected key=value, got 'lr'"):
        sweep.parse_setting("bad:lr")


def test_the_newest_saved_inversion_is_used(sweep, tmp_path) -> None:
    for version in (0, 2, 10):
        folder = tmp_path / f"version_{version}" / "trigger_inversion"
        folder.mkdir(parents=True)
        if version != 10:  # a run without a saved trigger is skipped
            (folder / "trigger.safetensors").write_bytes(b"")
    assert sweep.latest_inversion(tmp_path) == tmp_path / "version_2" / "trigger_inversion"
    with pytest.raises(FileNotFoundError, match="no saved inversion"):
        sweep.latest_inversion(tmp_path / "nothing")


def test_acceptance_counts_the_removal_criterion(sweep) -> None:
    table = sweep.sys.modules["defense_table"]  # imported by the sweep script

    def row(before_asr, before_ca, after_asr, after_ca, found=True, inverted=0.9):
        return {
            "scores": {
                "none": {"asr": before_asr, "ca": before_ca},
                "invertune": {"asr": after_asr, "ca": after_ca},
            },
            "invertune": {"target_found": found, "inverted_asr": inverted},
        }

    results = {
        "kept": row(0.99, 0.96, 0.05, 0.91),  # ASR 0.05 and a drop of 0.05: both at the bound
        "ca_lost": row(0.99, 0.96, 0.02, 0.90),  # drop 0.06
        "asr_left": row(0.99, 0.96, 0.06, 0.96),
        "weak_attack": row(0.80, 0.96, 0.00, 0.96, found=False, inverted=0.5),  # ASR was never >= 0.90
    }
    assert table.removed(0.05, 0.05) and not table.removed(0.051, 0.0) and not table.removed(0.0, 0.051)
    assert table.acceptance(results) == {
        "attacks": 4,
        "target_found": 3,
        "asr_removed_ca_kept": 1,
        "inverted_trigger_asr_ge_0.80": 3,
    }


def test_val_size_is_passed_to_the_data_block(sweep) -> None:
    plain = sweep.data_overrides("sig")
    assert "--data.init_args.attack=sig" in plain and not any("val_size" in o for o in plain)
    assert sweep.data_overrides("sig", 5000) == [*plain, "--data.init_args.val_size=5000"]
    with pytest.raises(ValueError, match="--val-size must be >= 1, got 0"):
        sweep.data_overrides("sig", 0)


def test_the_fmnist_world_reads_its_own_attack_configs_and_has_no_val_size(sweep) -> None:
    overrides = sweep.data_overrides("badnet", world="fmnist")
    assert "--data.init_args.target_class=bag" in overrides
    assert any("location" in o and "random" in o for o in overrides)
    with pytest.raises(ValueError, match="fixed val folder"):
        sweep.data_overrides("badnet", 5000, world="fmnist")
