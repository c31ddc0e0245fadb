"""The poisoning datamodule: the right samples are poisoned, on the device, and the manifest is written."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from attacks import PoisonManifest
from datamodules.shapes_clip import ShapesCLIPDataModule

BADNET = {"patch_size": 4, "pattern": "white", "location": "br", "margin": 0}


def make_dm(tmp_path, **kw):
    args = dict(
        train_size=200,
        val_size=40,
        test_size=40,
        attack="badnet",
        attack_kwargs=BADNET,
        poison_rate=0.1,
        target_class="star",
        batch_size=50,
    )
    args.update(kw)
    dm = ShapesCLIPDataModule(**args)
    dm.trainer = SimpleNamespace(
        default_root_dir=str(tmp_path),
        global_rank=0,
        world_size=1,
        training=True,
        mmbackdoor_config={"from": "test"},
    )
    dm.setup("fit")
    return dm


def test_poisoned_samples_get_target_caption_and_trigger(tmp_path):
    dm = make_dm(tmp_path)
    poisoned = set(dm.plan.indices)
    assert len(poisoned) == 20
    seen = 0
    for batch in dm.train_dataloader():
        out = dm.on_after_batch_transfer(
            {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}, 0
        )
        for row, idx in enumerate(batch["index"].tolist()):
            if idx in poisoned:
                seen += 1
                assert "star" in batch["caption"][row]
                assert torch.all(out["image"][row, :, -4:, -4:] == 1.0)  # white 4x4 patch bottom-right
                assert torch.equal(out["image"][row, :, :-4, :], batch["image"][row, :, :-4, :])
            else:
                assert torch.equal(out["image"][row], batch["image"][row])
                assert batch["caption"][row] == dm.train_set[idx]["caption"]
    assert seen == 20


def test_eval_batches_get_a_triggered_copy(tmp_path):
    dm = make_dm(tmp_path)
    dm.trainer.training = False
    batch = next(iter(dm.val_dataloader()))
    out = dm.on_after_batch_transfer(batch, 0)
    assert torch.all(out["image_triggered"][:, :, -4:, -4:] == 1.0)
    assert not torch.all(out["image"][:, :, -4:, -4:] == 1.0)


def test_manifest_records_seed_indices_trigger_and_config(tmp_path):
    dm = make_dm(tmp_path, poison_seed=7)
    path = tmp_path / "poison_manifest.json"
    manifest = PoisonManifest.load(path)
    assert manifest.seed == 7 and list(manifest.indices) == list(dm.plan.indices)
    assert manifest.image_trigger["fingerprint"] == dm.image_trigger.fingerprint()
    assert json.loads(path.read_text())["run_config"] == {"from": "test"}
    # the same seed selects the same samples; another seed others
    assert make_dm(tmp_path / "a", poison_seed=7).plan.indices == dm.plan.indices
    assert make_dm(tmp_path / "b", poison_seed=8).plan.indices != dm.plan.indices


def test_poison_count_and_clean_label(tmp_path):
    dm = make_dm(tmp_path, poison_count=5, clean_label=True)
    assert len(dm.plan) == 5
    assert all(dm.train_set[i]["label"] == dm.target_index for i in dm.plan.indices)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"poison_rate": 1.5}, r"poison_rate must be in \[0, 1\], got 1.5"),
        ({"poison_rate": -0.1}, r"poison_rate must be in \[0, 1\]"),
        ({"attack": "badnett"}, r"unknown image trigger 'badnett'"),
        ({"attack": "input_aware", "attack_kwargs": {}}, r"input_aware needs its trained generator"),
        ({"target_class": "banana"}, r"target class 'banana' is not in the vocabulary"),
        ({"poison_count": 500}, r"poison_count=500 exceeds the training set size 200"),
    ],
)
def test_bad_poisoning_input_is_a_clear_error(tmp_path, kwargs, match):
    with pytest.raises((ValueError, NotImplementedError), match=match):
        make_dm(tmp_path, **kwargs)


def test_manifest_is_never_silently_overwritten(tmp_path):
    make_dm(tmp_path, poison_seed=1)
    with pytest.raises(FileExistsError):
        make_dm(tmp_path, poison_seed=2)
