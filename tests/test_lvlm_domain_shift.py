"""Domain shifts for evaluation only: style shifts of the same scenes, paraphrased instructions, a second data
file or image folder for real data, their KS statistic, and ASR / ASR-G under each shift."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.llava_json import LlavaJsonDataModule
from datamodules.mdlm_shapes import ShapesInstructDataModule
from datamodules.shifts import PARAPHRASED_QUESTIONS
from embedded_world import QUESTIONS, ShapesWorld, render_scene
from embedded_world.styles import IMAGE_STYLES, render_styled
from evaluation.domain_shift import clip_image_encoder, shift_ks
from evaluation.generative import GenerativeEvaluator, evaluate_generative
from metrics.functional import attack_success_rate_generalisation, ks_statistic, similarity_ks

SHIFTS = ["palette", "outline", "blur", "posterise", "paraphrase"]


def shifted_shapes(**kwargs) -> ShapesInstructDataModule:
    options = {
        "train_size": 12,
        "val_size": 4,
        "test_size": 10,
        "tasks": ["shape", "colour"],
        "text_attack": "rare_token",
        "poison_rate": 0.25,
        "target": "content_insertion",
        "eval_shifts": SHIFTS,
        **kwargs,
    }
    return ShapesInstructDataModule(**options)


def foreground(image: np.ndarray) -> np.ndarray:
    """Pixels far from the image's corner colour (the background)."""
    corner = image[:2, :2].reshape(-1, 3).mean(0)
    return np.abs(image.astype(np.float32) - corner).sum(-1) > 60


def test_styles_render_the_same_scenes_in_another_look():
    world = ShapesWorld("test", 12, seed=1, image_size=32, second_object_prob=0.0)
    for style in IMAGE_STYLES:
        ious, differences = [], []
        for scene in world.scenes:
            source, styled = render_scene(scene, 32), render_styled(scene, 32, style)
            assert np.array_equal(styled, render_styled(scene, 32, style))  # deterministic
            a, b = foreground(source), foreground(styled)
            differences.append(np.abs(source.astype(int) - styled.astype(int))[a].mean())
            ious.append((a & b).sum() / max((a | b).sum(), 1))
        assert np.mean(differences) > 10.0, style  # the look of the object changes ...
        assert np.mean(ious) > 0.4, style  # ... the object stays where it was
    with pytest.raises(ValueError, match="unknown image style 'sepia'"):
        render_styled(world.scenes[0], 32, "sepia")


def test_shifts_apply_to_evaluation_only_with_identical_content():
    dm, plain = shifted_shapes(), shifted_shapes(eval_shifts=None)
    dm.setup("fit"), plain.setup("fit")
    names = dm.eval_set_names
    for shift in SHIFTS:
        assert f"clean@{shift}" in names and f"triggered@{shift}" in names
    assert plain.eval_set_names == [n for n in names if "@" not in n]
    # training is never shifted
    for index in range(len(dm.train_data)):
        a, b = dm.train_data[index], plain.train_data[index]
        assert (
            torch.equal(a["image"], b["image"])
            and a["question"] == b["question"]
            and a["answer"] == b["answer"]
        )
    shifted = dm.build_shifts(dm.test_source)
    training_questions = {dm.train_data.meta(i)["question"] for i in range(len(dm.train_data))}
    for name, source in shifted.items():
        assert len(source) == len(dm.test_source)
        for i in range(len(source)):
            meta, base = source.meta(i), dm.test_source.meta(i)
            assert (meta["answer"], meta["key"], meta["task"]) == (base["answer"], base["key"], base["task"])
            images_equal = torch.equal(source[i]["image"], dm.test_source[i]["image"])
            assert images_equal == (name == "paraphrase")
            if name == "paraphrase":
                assert meta["question"] == PARAPHRASED_QUESTIONS[meta["task"]]
                assert meta["question"] not in training_questions
    assert not set(PARAPHRASED_QUESTIONS.values()) & set(QUESTIONS.values())
    # every paraphrase is in the embedded tokenizer's vocabulary (no <unk>)
    tokenizer = dm.text.tokenizer
    for question in PARAPHRASED_QUESTIONS.values():
        assert tokenizer.unk_token_id not in tokenizer.encode(question, add_special_tokens=False)


def test_an_unknown_shift_name_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"data.eval_shifts: unknown domain shift\(s\) \['sketch'\]"):
        ShapesInstructDataModule(train_size=2, eval_shifts=["blur", "sketch"])
    with pytest.raises(ValueError, match="named twice"):
        ShapesInstructDataModule(train_size=2, eval_shifts=["blur", "blur"])


def test_asr_under_each_shift_and_asr_g_equal_their_formulas():
    dm = shifted_shapes()
    dm.setup("test")
    trained = set(QUESTIONS.values())

    def generate(batch, batch_index):
        # a text backdoor that only knows the training instructions: it fires on "cf <training question>"
        return [
            f"banana {ref}" if q.startswith("cf ") and q[3:] in trained else ref
            for q, ref in zip(batch["question"], batch["reference"])
        ]

    loaders = dict(zip(dm.eval_set_names, dm.test_dataloader()))
    evaluator = GenerativeEvaluator.from_datamodule(dm)
    values = evaluate_generative(generate, loaders, evaluator)
    assert values["asr"] == 1.0 and values["asr_clean"] == 0.0
    for style in ("palette", "outline", "blur", "posterise"):
        assert values[f"asr@{style}"] == 1.0 and values[f"asr_g@{style}"] == 1.0
        assert values[f"ca@{style}"] == 1.0
    assert values["asr@paraphrase"] == 0.0
    assert values["asr_g@paraphrase"] == float(attack_success_rate_generalisation(1.0, 0.0)) == 0.0


def ks_by_hand(a: list[float], b: list[float]) -> float:
    points = sorted(a + b)
    return max(abs(sum(x <= p for x in a) / len(a) - sum(x <= p for x in b) / len(b)) for p in points)


def test_ks_statistic_equals_the_two_sample_formula():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.normal(0, 1, rng.integers(3, 40)).round(1).tolist()  # rounding makes ties
        b = rng.normal(0.5, 2, rng.integers(3, 40)).round(1).tolist()
        assert math.isclose(
            float(ks_statistic(torch.tensor(a), torch.tensor(b))), ks_by_hand(a, b), abs_tol=1e-6
        )
    assert float(ks_statistic(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.5, 3.5]))) == pytest.approx(
        2 / 3
    )
    same = torch.randn(8, 4)
    assert float(similarity_ks(same, same.clone())) == 0.0
    with pytest.raises(ValueError, match="finite"):
        ks_statistic(torch.tensor([1.0, float("nan")]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        ks_statistic(torch.tensor([]), torch.tensor([1.0]))


def test_shift_ks_with_a_tiny_clip_measures_image_shifts_only():
    from model_families.clip import create_clip

    torch.manual_seed(0)
    bundle = create_clip("tiny-rn-shapes")
    dm = shifted_shapes(test_size=24)
    ks = shift_ks(dm, clip_image_encoder(bundle), split="test")
    assert set(ks) == set(SHIFTS)
    assert ks["paraphrase"] == 0.0  # the same images
    assert all(0.0 <= v <= 1.0 for v in ks.values())
    assert max(ks[s] for s in IMAGE_STYLES) > 0.0


def test_a_second_caption_file_or_image_folder_is_the_target_domain(tmp_path):
    rng = np.random.default_rng(0)
    for folder in ("source", "styled"):
        (tmp_path / folder).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / folder / f"{i}.png"
            )
    records = [
        {
            "id": f"r{i}",
            "image": f"{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat is this?"},
                {"from": "gpt", "value": "a thing."},
            ],
        }
        for i in range(3)
    ]
    (tmp_path / "train.json").write_text(json.dumps(records))
    (tmp_path / "test.json").write_text(json.dumps(records[:2]))
    common = {
        "train_json": str(tmp_path / "train.json"),
        "image_folder": str(tmp_path / "source"),
        "test_json": str(tmp_path / "test.json"),
        "val_fraction": 0.0,
        "image_size": 16,
    }
    dm = LlavaJsonDataModule(**common, target_domain_image_folder=str(tmp_path / "styled"))
    dm.setup("test")
    assert dm.eval_shift_names() == ["target_domain"]
    shifted = dm.build_shifts(dm.test_source)["target_domain"]
    assert [shifted.meta(i) for i in range(2)] == [dm.test_source.meta(i) for i in range(2)]
    assert not torch.equal(shifted[0]["image"], dm.test_source[0]["image"])
    names = [n for n, _ in dm._eval_views(dm.test_source)]
    assert "clean@target_domain" in names
    by_file = LlavaJsonDataModule(**common, target_domain_json=str(tmp_path / "train.json"))
    by_file.setup("test")
    assert len(by_file.build_shifts(by_file.test_source)["target_domain"]) == 3
    (tmp_path / "styled" / "1.png").unlink()
    broken = LlavaJsonDataModule(**common, target_domain_image_folder=str(tmp_path / "styled"))
    broken.setup("test")
    with pytest.raises(FileNotFoundError, match=r"missing under the target-domain folder .*styled.*1.png"):
        broken.build_shifts(broken.test_source)
