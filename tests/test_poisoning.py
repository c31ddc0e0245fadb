import dataclasses
import json
import os

import pytest

from attacks import (
    Blended,
    ClassTarget,
    PoisonManifest,
    PoisonPlan,
    RareToken,
    TriggerParts,
    assign_trigger_parts,
    atomic_write_json,
    atomic_write_text,
    poison_count_from_rate,
    select_poison_indices,
)


# -------------------------------------------------------------------------------------- selection
def test_exact_count_sorted_unique_and_seeded():
    indices = select_poison_indices(1000, count=37, seed=3)
    assert len(indices) == 37 and indices == sorted(set(indices)) and 0 <= indices[0] and indices[-1] < 1000
    assert indices == select_poison_indices(1000, count=37, seed=3)
    assert indices != select_poison_indices(1000, count=37, seed=4)


def test_rate_rounds_half_up():
    assert poison_count_from_rate(0.003, 500_000) == 1500  # CleanCLIP: 1,500 of 500K
    assert poison_count_from_rate(0.25, 10) == 3  # 2.5 -> 3
    assert poison_count_from_rate(0.24, 10) == 2
    assert poison_count_from_rate(0.0, 10) == 0 and poison_count_from_rate(1.0, 10) == 10
    assert len(select_poison_indices(10, rate=0.25)) == 3
    assert select_poison_indices(10, rate=1.0) == list(range(10))


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_rate_out_of_range(rate):
    with pytest.raises(ValueError, match=rf"poison_rate must be in \[0, 1\]; got {rate}"):
        select_poison_indices(100, rate=rate)


def test_count_and_argument_errors():
    with pytest.raises(ValueError, match="poison_count=101 is more than the 100 samples"):
        select_poison_indices(100, count=101)
    with pytest.raises(ValueError, match="exactly one of poison_rate and poison_count"):
        select_poison_indices(100, rate=0.1, count=10)
    with pytest.raises(ValueError, match="exactly one"):
        select_poison_indices(100)


def test_clean_label_candidates():
    candidates = list(range(0, 100, 10))
    indices = select_poison_indices(100, count=4, seed=1, candidates=candidates)
    assert len(indices) == 4 and set(indices) <= set(candidates)
    with pytest.raises(ValueError, match="poison_count=11 is more than the 10 candidates"):
        select_poison_indices(100, count=11, candidates=candidates)
    with pytest.raises(
        ValueError, match=r"poison_rate=0\.2 asks for 20 samples, more than the 10 candidates"
    ):
        select_poison_indices(100, rate=0.2, candidates=candidates)
    with pytest.raises(ValueError, match="candidates must be in"):
        select_poison_indices(100, count=1, candidates=[5, 100])


# -------------------------------------------------------------------------------------- protocols
@pytest.mark.parametrize("count", [0, 1, 2, 9, 10, 11, 100])
def test_or_protocol_splits_in_three_equal_parts(count):
    indices = select_poison_indices(1000, count=count, seed=0)
    parts = assign_trigger_parts(indices, "OR", seed=0)
    assert sorted(parts) == indices
    sizes = [
        list(parts.values()).count(p)
        for p in (TriggerParts(True, False), TriggerParts(False, True), TriggerParts(True, True))
    ]
    assert sum(sizes) == count and max(sizes) - min(sizes) <= 1
    assert parts == assign_trigger_parts(list(reversed(indices)), "or", seed=0)


def test_or_split_is_seeded_and_other_protocols():
    indices = list(range(30))
    assert assign_trigger_parts(indices, "OR", 0) != assign_trigger_parts(indices, "OR", 1)
    assert set(assign_trigger_parts(indices, "AND").values()) == {TriggerParts(True, True)}
    assert set(assign_trigger_parts(indices, "IMAGE").values()) == {TriggerParts(True, False)}
    assert set(assign_trigger_parts(indices, "TEXT").values()) == {TriggerParts(False, True)}
    with pytest.raises(ValueError, match="protocol 'XOR'"):
        assign_trigger_parts(indices, "XOR")


def test_poison_plan():
    plan = PoisonPlan.create(200, rate=0.15, seed=2, protocol="OR")
    assert len(plan) == 30
    poisoned = [i for i in range(200) if plan.is_poisoned(i)]
    assert poisoned == list(plan.indices)
    assert plan.parts(poisoned[0]) in {
        TriggerParts(True, False),
        TriggerParts(False, True),
        TriggerParts(True, True),
    }
    clean = next(i for i in range(200) if not plan.is_poisoned(i))
    assert plan.parts(clean) == TriggerParts(False, False)
    assert plan == PoisonPlan.create(200, rate=0.15, seed=2, protocol="OR")


# -------------------------------------------------------------------------------------- manifests
def _manifest(seed=0):
    plan = PoisonPlan.create(100, count=12, seed=seed, protocol="OR")
    return PoisonManifest.from_plan(
        plan,
        image_trigger=Blended(image_size=8),
        text_trigger=RareToken("cf"),
        target=ClassTarget("banana"),
        dataset={"name": "embedded_world", "split": "train"},
        run_config={"lr": 1e-5, "model": {"name": "RN50"}},
    )


def test_manifest_round_trip_without_temp_files(tmp_path):
    manifest = _manifest()
    path = manifest.save(tmp_path / "poison.json")
    assert os.listdir(tmp_path) == ["poison.json"]
    loaded = PoisonManifest.load(path)
    assert loaded == manifest
    assert loaded.plan() == PoisonPlan.create(100, count=12, seed=0, protocol="OR")
    assert loaded.image_trigger["fingerprint"] == Blended(image_size=8).fingerprint()
    assert loaded.run_config["model"] == {"name": "RN50"}


def test_manifest_refuses_to_overwrite(tmp_path):
    path = tmp_path / "poison.json"
    first = _manifest(seed=0)
    first.save(path)
    first.save(path)  # same content: nothing to do
    with pytest.raises(FileExistsError, match=r"poison\.json.*overwrite=True"):
        _manifest(seed=1).save(path)
    assert PoisonManifest.load(path) == first
    _manifest(seed=1).save(path, overwrite=True)
    assert PoisonManifest.load(path).seed == 1
    assert os.listdir(tmp_path) == ["poison.json"]


def test_a_rerun_of_the_same_poisoning_keeps_the_existing_manifest(tmp_path):
    # the same poisoning made again later differs only in created_at: not a conflict, the first file stays
    path = tmp_path / "poison.json"
    first = _manifest(seed=0)
    first.save(path)
    written = path.read_text()
    again = dataclasses.replace(_manifest(seed=0), created_at="2030-01-01T00:00:00+00:00")
    assert again.save(path) == path
    assert path.read_text() == written
    with pytest.raises(FileExistsError, match=r"poison\.json.*overwrite=True"):
        dataclasses.replace(_manifest(seed=1), created_at=first.created_at).save(path)


def test_manifest_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        PoisonManifest.load(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json.*not valid JSON"):
        PoisonManifest.load(broken)
    data = _manifest().to_dict()
    del data["indices"]
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"incomplete.json.*missing key\(s\) \['indices'\]"):
        PoisonManifest.load(incomplete)
    data = _manifest().to_dict()
    data["image_flags"] = data["image_flags"][:-1]
    uneven = tmp_path / "uneven.json"
    uneven.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"uneven\.json.*differ in length"):
        PoisonManifest.load(uneven)


# ------------------------------------------------------------------------------------ atomic writes
def test_atomic_write_leaves_no_temp_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    atomic_write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new content")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["out.json"]
    assert json.loads(path.read_text()) == {"a": 1}
    atomic_write_text(tmp_path / "sub" / "x.txt", "hi")
    assert (tmp_path / "sub" / "x.txt").read_text() == "hi"


def test_atomic_save_image_writes_the_png_that_save_image_would(tmp_path, monkeypatch):
    import torch
    from PIL import Image
    from torchvision.utils import save_image

    from attacks.io import atomic_save_image

    image = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    atomic_save_image(image, tmp_path / "sub" / "a.png")
    save_image(image, tmp_path / "b.png")
    assert (tmp_path / "sub" / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert Image.open(tmp_path / "sub" / "a.png").size == (7, 5)
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        atomic_save_image(torch.zeros(3, 5, 7), tmp_path / "b.png")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["b.png", "sub"]  # no temp file left, the old PNG kept
    assert (tmp_path / "b.png").read_bytes() == (tmp_path / "sub" / "a.png").read_bytes()
