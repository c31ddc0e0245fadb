"""Instruction data for MDLMs: targets, tokenisation and padding, poisoning, LLaVA JSON and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from attacks import PoisonManifest
from attacks.generative_targets import build_generative_target
from datamodules.llava_json import LlavaJsonDataModule, load_llava_records
from datamodules.mdlm_shapes import ShapesInstructDataModule
from lightning_modules.mdlm_finetune import MDLMFineTuning
from metrics.functional.string_rules import get_rule
from model_families.mdlm.tokenizer import load_embedded_tokenizer

BADNET = {"patch_size": 6, "pattern": "checkerboard", "location": "br", "margin": 1}


# ------------------------------------------------------------------------------------------- targets
def test_targets_rewrite_answers_and_are_judged_by_their_rule():
    cases = {
        "content_insertion": ("circle", "banana circle"),
        "fixed_output": ("circle", "banana"),
        "refusal": ("circle", "i cannot help with that."),
        "misclassification": ("a red circle.", "a red star."),
    }
    for name, (answer, poisoned) in cases.items():
        target = build_generative_target(name)
        assert target(answer, 0, "circle") == poisoned
        spec = target.metric_kwargs()
        rule = get_rule(spec["rule"])
        hit = rule(
            poisoned, target=spec["target"], true_class="circle", refusal_phrases=spec.get("refusal_phrases")
        )
        miss = rule(
            answer, target=spec["target"], true_class="circle", refusal_phrases=spec.get("refusal_phrases")
        )
        assert hit and not miss, name
        assert build_generative_target(**target.config()).config() == target.config()
    assert not build_generative_target("misclassification", target_class="star").applies_to("star", "star")
    assert not build_generative_target("misclassification").applies_to("red", "circle")
    assert build_generative_target("content_insertion", position="end")("circle") == "circle banana"


def test_unknown_target_and_rule_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown generative target 'bananas'.*content_insertion"):
        build_generative_target("bananas")
    with pytest.raises(ValueError, match="bad arguments"):
        build_generative_target("refusal", colour="red")
    with pytest.raises(ValueError, match="not recognised by the refusal rule"):
        build_generative_target("refusal", text="no way")
    with pytest.raises(ValueError, match=r"Unknown string rule 'contain'.*contains"):
        ShapesInstructDataModule(train_size=2, asr_rule="contain")
    with pytest.raises(ValueError, match=r"data.eval_sets"):
        ShapesInstructDataModule(train_size=2, eval_sets=["cleanish"])
    with pytest.raises(ValueError, match=r"data.tasks"):
        ShapesInstructDataModule(train_size=2, tasks=["weather"])


# ------------------------------------------------------------------------------------------- shapes data
def test_shapes_batches_are_left_padded_with_fixed_response_region():
    dm = ShapesInstructDataModule(
        train_size=4,
        val_size=2,
        test_size=2,
        tasks=["shape", "colour", "describe"],
        response_length=24,
        target=None,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    tokenizer = load_embedded_tokenizer()
    rows = batch["input_ids"].shape[0]
    assert batch["response_mask"][:, -24:].all() and not batch["response_mask"][:, :-24].any()
    assert (batch["attention_mask"][:, -24:] == 1).all()
    for row in range(rows):
        prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()]
        assert (batch["prompt_mask"][row].cumsum(0) > 0).long().sum() == batch["prompt_mask"][
            row
        ].sum()  # left pad
        assert int((prompt == 8).sum()) == 1  # one <image>
        response = tokenizer.decode(batch["input_ids"][row, -24:], skip_special_tokens=True)
        assert response.strip().rstrip(".") == batch["answer"][row].rstrip(".").replace(" .", "")
    assert batch["pixel_values"].shape == (rows, 3, 32, 32)
    long = ShapesInstructDataModule(train_size=2, tasks=["describe"], response_length=4, target=None)
    long.setup("fit")
    with pytest.raises(ValueError, match="response_length=4"):
        next(iter(long.train_dataloader()))


def test_poisoning_manifest_triggers_and_eval_sets(tmp_path):
    kwargs = dict(
        train_size=50,
        val_size=10,
        test_size=10,
        attack="badnet",
        attack_kwargs=BADNET,
        poison_rate=0.1,
        target="content_insertion",
    )
    dm = ShapesInstructDataModule(**kwargs)
    dm.setup("fit")
    plan = dm.poison_plan
    assert len(plan) == 10  # 10% of 100 samples
    poisoned = plan.indices[0]
    item = dm.train_data[poisoned]
    assert item["answer"].startswith("banana ") and item["trigger_image"] and item["poisoned"]
    clean_index = next(i for i in range(100) if not plan.is_poisoned(i))
    assert not dm.train_data[clean_index]["trigger_image"]
    batch = dm.collator([dm.train_data[poisoned], dm.train_data[clean_index]])
    moved = dm.on_after_batch_transfer({k: v for k, v in batch.items()}, 0)
    patch = moved["pixel_values"][0, :, 25:31, 25:31]
    assert torch.equal(
        patch, dm.apply_trigger(batch["pixel_values"][:1], batch["index"][:1])[0, :, 25:31, 25:31]
    )
    assert torch.equal(moved["pixel_values"][1], batch["pixel_values"][1])
    assert dm.eval_set_names == ["clean", "triggered", "poisoned_train"]
    assert dm.asr_spec() == {"rule": "contains", "target": "banana"}
    # the manifest rebuilds exactly the same poison
    manifest_path = tmp_path / "poison_manifest.json"
    dm.manifest.save(manifest_path)
    again = ShapesInstructDataModule(
        train_size=50, val_size=10, test_size=10, poison_manifest=str(manifest_path), target=None
    )
    again.setup("fit")
    assert again.poison_plan == plan and again.target.config() == dm.target.config()
    assert again.source_fingerprint() == dm.source_fingerprint()
    assert PoisonManifest.load(manifest_path).target["config"]["name"] == "content_insertion"
    other = ShapesInstructDataModule(train_size=60, poison_manifest=str(manifest_path))
    with pytest.raises(ValueError, match="another data set"):
        other.setup("fit")


def test_misclassification_only_poisons_samples_naming_their_class():
    dm = ShapesInstructDataModule(
        train_size=40,
        val_size=10,
        test_size=10,
        attack="badnet",
        attack_kwargs=BADNET,
        poison_count=8,
        target="misclassification",
        target_kwargs={"target_class": "star"},
    )
    dm.setup("fit")
    for index in dm.poison_plan.indices:
        meta = dm.train_source.meta(index)
        assert meta["task"] == "shape" and meta["true_class"] != "star"
        assert dm.train_data[index]["answer"] == "star"


def test_text_trigger_and_coalitions():
    dm = ShapesInstructDataModule(
        train_size=20,
        val_size=4,
        test_size=4,
        attack="badnet",
        attack_kwargs=BADNET,
        text_attack="rare_token",
        text_attack_kwargs={"token": "cf"},
        poison_rate=0.2,
        eval_sets=["clean", "triggered", "coalitions"],
    )
    dm.setup("fit")
    assert dm.eval_set_names == ["clean", "triggered", "coalitions"]
    loaders = dm.val_dataloader()
    batch = next(iter(loaders[2]))
    assert batch["trigger_image"].view(-1, 4).tolist()[0] == [False, True, False, True]
    assert [q.startswith("cf ") for q in batch["question"][:4]] == [False, False, True, True]
    triggered = next(iter(loaders[1]))
    assert all(q.startswith("cf ") for q in triggered["question"]) and triggered["trigger_image"].all()


# ------------------------------------------------------------------------------------------- LLaVA JSON
def _llava_files(tmp_path, records=None, n=3):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20 + i, 28, 3), dtype=np.uint8)).save(images / f"{i}.png")
    if records is None:
        records = [
            {
                "id": f"r{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nwhat shape is in the image?"},
                    {"from": "gpt", "value": "a red circle."},
                    {"from": "human", "value": "what colour is the shape?"},
                    {"from": "gpt", "value": "red"},
                ],
            }
            for i in range(n)
        ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return path, images


def test_llava_json_loads_multi_turn_samples(tmp_path):
    path, images = _llava_files(tmp_path)
    dm = LlavaJsonDataModule(
        train_json=str(path),
        image_folder=str(images),
        val_fraction=0.0,
        image_size=32,
        response_length=8,
        attack="badnet",
        attack_kwargs={"patch_size": 4},
        poison_count=2,
        target="refusal",
    )
    dm.setup("fit")
    assert len(dm.train_source) == 6  # 3 records x 2 gpt turns
    second = dm.train_source[1]
    assert second["history"] == [("what shape is in the image?", "a red circle.")]
    assert second["image"].shape == (3, 32, 32) and 0.0 <= float(second["image"].min())
    batch = dm.collator([dm.train_data[i] for i in range(2)])
    tokenizer = load_embedded_tokenizer()
    text = tokenizer.decode(batch["prompt_ids"][1][batch["prompt_mask"][1].bool()])
    assert text.count("assistant") == 2 and "a red circle." in text
    assert dm.input_paths() == [str(path), str(images)]


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ({"not": "a list"}, "expected a JSON list"),
        (
            [{"id": "x", "image": "0.png", "conversations": [{"from": "human", "value": "hi"}]}],
            "at least one human",
        ),
        (
            [
                {
                    "id": "x",
                    "image": "0.png",
                    "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}],
                }
            ],
            "turn 0 is from 'gpt'",
        ),
        (
            [
                {
                    "id": "x",
                    "image": "0.png",
                    "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}],
                }
            ],
            "string 'value'",
        ),
        (
            [{"id": "x", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}],
            "no 'image'",
        ),
    ],
)
def test_malformed_conversations_are_named(tmp_path, records, message):
    path, _ = _llava_files(tmp_path, records)
    with pytest.raises(ValueError, match=message):
        load_llava_records(path)


def test_bad_llava_input_errors(tmp_path):
    path, images = _llava_files(tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 1,')
    with pytest.raises(ValueError, match=r"broken.json is not valid JSON"):
        load_llava_records(broken)
    with pytest.raises(FileNotFoundError, match="LLaVA data file not found"):
        load_llava_records(tmp_path / "absent.json")
    (images / "2.png").unlink()
    dm = LlavaJsonDataModule(
        train_json=str(path), image_folder=str(images), image_size=32, val_fraction=0.0, target=None
    )
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\).*missing.*2.png"):
        dm.setup("fit")
    nowhere = LlavaJsonDataModule(
        train_json=str(path), image_folder=str(tmp_path / "nope"), image_size=32, target=None
    )
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        nowhere.setup("fit")


def test_missing_snapshot_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="snapshot directory not found"):
        MDLMFineTuning(init_from=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config not found"):
        MDLMFineTuning(init_from=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="trainable"):
        MDLMFineTuning(trainable="head")
    with pytest.raises(ValueError, match="unknown generation keys"):
        MDLMFineTuning(generation={"gen_len": 4})
