"""DiSP self-purification: resumable after an interruption, atomic outputs, never over its input, and the
datamodule swapping purified responses in."""

from __future__ import annotations

import json

import pytest
import torch

from datamodules.mdlm_shapes import ShapesInstructDataModule
from defenses.disp.masking import DiSPMasking
from defenses.disp.purified_set import purification_dataset, use_purified
from defenses.disp.purify import PurificationError, purify_dataset
from lightning_modules.mdlm_finetune import build_tiny_model
from model_families.mdlm.inference import GenerationConfig
from model_families.mdlm.tokenizer import load_embedded_tokenizer

TINY = {"vision": {"patch_size": 8}, "text": {"num_hidden_layers": 1}}
BADNET = {"patch_size": 6, "pattern": "checkerboard", "location": "br", "margin": 1}


@pytest.fixture(scope="module")
def setup_data():
    torch.manual_seed(0)
    tokenizer = load_embedded_tokenizer()
    model = build_tiny_model(tokenizer, TINY).eval()
    dm = ShapesInstructDataModule(
        train_size=7,
        val_size=2,
        test_size=2,
        attack="badnet",
        attack_kwargs=BADNET,
        poison_rate=0.3,
        target="content_insertion",
        response_length=8,
    )
    dm.setup("fit")
    return model, tokenizer, dm


def _purify(model, tokenizer, dm, out, **kwargs):
    return purify_dataset(
        model,
        purification_dataset(dm),
        dm.collator,
        out,
        tokenizer,
        DiSPMasking(rho=0.45, num_probes=2),
        GenerationConfig(gen_length=8, block_length=8, steps=4),
        batch_size=2,
        chunk_size=3,
        source={"fingerprint": dm.source_fingerprint(), "paths": []},
        **kwargs,
    )


def test_purification_resumes_without_redoing_finished_chunks(tmp_path, setup_data):
    model, tokenizer, dm = setup_data
    reference = _purify(model, tokenizer, dm, tmp_path / "reference")
    records = json.loads(reference.read_text())
    assert [r["index"] for r in records] == list(range(14))  # 7 images x 2 tasks
    assert all(r["masked_vision_tokens"] == 7 for r in records)  # round(0.45 * 16)
    assert records[0]["conversations"][0]["value"].startswith("<image>\n")
    manifest = json.loads((reference.parent / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["num_samples"] == 14

    done: list[int] = []

    def interrupt(chunk, samples):
        done.append(chunk)
        if len(done) == 2:
            raise KeyboardInterrupt  # killed after two of the five chunks

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _purify(model, tokenizer, dm, out, on_chunk_done=interrupt)
    assert not (out / "purified.json").exists() and not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / "parts").glob("chunk-*.json")) == [
        "chunk-000000.json",
        "chunk-000001.json",
    ]

    redone: list[int] = []
    path = _purify(model, tokenizer, dm, out, on_chunk_done=lambda chunk, n: redone.append(chunk))
    assert redone == [2, 3, 4], "finished chunks must not be recomputed"
    assert json.loads(path.read_text()) == records  # identical to the uninterrupted run
    # a complete purification is not redone at all
    again: list[int] = []
    _purify(model, tokenizer, dm, out, on_chunk_done=lambda chunk, n: again.append(chunk))
    assert again == []


def test_ranks_take_their_chunks(tmp_path, setup_data):
    model, tokenizer, dm = setup_data
    seen = {0: [], 1: []}
    for rank in (1, 0):  # rank 1 first: rank 0 merges once every chunk exists
        _purify(
            model,
            tokenizer,
            dm,
            tmp_path / "ddp",
            rank=rank,
            world_size=2,
            on_chunk_done=lambda chunk, n, rank=rank: seen[rank].append(chunk),
        )
    assert seen == {0: [0, 2, 4], 1: [1, 3]}
    assert len(json.loads((tmp_path / "ddp" / "purified.json").read_text())) == 14


def test_resume_with_other_settings_and_output_over_input_fail(tmp_path, setup_data):
    model, tokenizer, dm = setup_data
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _purify(
            model, tokenizer, dm, out, on_chunk_done=lambda c, n: (_ for _ in ()).throw(KeyboardInterrupt())
        )
    with pytest.raises(PurificationError, match="other settings"):
        purify_dataset(
            model,
            purification_dataset(dm),
            dm.collator,
            out,
            tokenizer,
            DiSPMasking(rho=0.2),
            GenerationConfig(),
            chunk_size=3,
            source={"fingerprint": dm.source_fingerprint()},
        )
    data = tmp_path / "poisoned" / "train.json"
    data.parent.mkdir()
    data.write_text("[]")
    with pytest.raises(PurificationError, match="would hold the input"):
        purify_dataset(
            model,
            purification_dataset(dm),
            dm.collator,
            tmp_path / "poisoned",
            tokenizer,
            DiSPMasking(),
            GenerationConfig(),
            source={"paths": [str(data)]},
        )
    assert data.read_text() == "[]"


def test_datamodule_trains_on_purified_responses(tmp_path, setup_data):
    model, tokenizer, dm = setup_data
    path = _purify(model, tokenizer, dm, tmp_path / "p")
    records = {r["index"]: r["conversations"][-1]["value"] for r in json.loads(path.read_text())}
    fresh = ShapesInstructDataModule(
        train_size=7,
        val_size=2,
        test_size=2,
        attack="badnet",
        attack_kwargs=BADNET,
        poison_rate=0.3,
        target="content_insertion",
        response_length=8,
    )
    fresh.setup("fit")
    loader = fresh.train_dataloader()  # built before the swap: must still see the purified responses
    use_purified(fresh, path)
    assert [fresh.train_data[i]["answer"] for i in range(14)] == [records[i] for i in range(14)]
    poisoned = fresh.poison_plan.indices[0]
    assert fresh.train_data[poisoned]["trigger_image"]  # inputs keep their triggers; only responses change
    assert sum(len(b["answer"]) for b in loader) == 14
    other = ShapesInstructDataModule(train_size=7, val_size=2, test_size=2, response_length=8, target=None)
    other.setup("fit")
    with pytest.raises(ValueError, match="another training set"):
        use_purified(other, path)
    with pytest.raises(FileNotFoundError, match="purified data set not found"):
        use_purified(fresh, tmp_path / "nothing")
