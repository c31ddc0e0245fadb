"""The CLIP judge of generated images: embeddings as the CLIP pipeline sees images, zero-shot classes."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from model_families.clip import create_clip, save_clip_export, zero_shot_weights
from model_families.clip.judge import ClipJudge

COLOURS = ["red", "green", "blue", "yellow"]
TEMPLATES = ["a {} shape.", "a photo of a {} circle."]


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    return create_clip("tiny-rn-shapes")


@pytest.fixture(scope="module")
def judge(bundle):
    return ClipJudge(bundle)


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_embed_is_the_normalised_clip_image_embedding_of_normalised_pixels(judge, bundle) -> None:
    images = _images(4)
    expected = bundle.model.encode_image(bundle.normalize(images))
    expected = expected / expected.norm(dim=1, keepdim=True)
    z = judge.embed(images)
    assert torch.allclose(z, expected, atol=1e-5)
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)


def test_classify_is_the_argmax_of_embeddings_against_the_zero_shot_weights(judge, bundle) -> None:
    images = _images(16, seed=1)
    weights = zero_shot_weights(bundle.model, bundle.tokenizer, COLOURS, TEMPLATES)
    expected = (judge.embed(images) @ weights.T).argmax(dim=1)
    predicted = judge.classify(images, COLOURS, TEMPLATES)
    assert predicted.dtype == torch.long and torch.equal(predicted, expected)
    assert torch.equal(judge.class_weights(COLOURS, TEMPLATES), weights)
    # the class order matters: reversing the names maps every prediction to the mirrored index
    reversed_prediction = judge.classify(images, COLOURS[::-1], TEMPLATES)
    assert torch.equal(reversed_prediction, len(COLOURS) - 1 - expected)


def test_images_of_another_size_are_resized_as_the_datamodules_do(judge) -> None:
    large = _images(3, size=64, seed=2)
    resized = TF.resize(large, 32, interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    assert torch.allclose(judge.embed(large), judge.embed(resized), atol=1e-5)
    wide = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    cropped = wide[..., 8:40]  # shorter side already 32: only the centre crop
    assert torch.allclose(judge.embed(wide), judge.embed(cropped), atol=1e-5)


def test_the_judge_stays_frozen_and_in_eval_mode(judge) -> None:
    judge.train()
    assert not judge.training and not judge.model.training
    assert not any(p.requires_grad for p in judge.parameters())


def test_non_finite_images_are_an_error_naming_the_rows(judge) -> None:
    images = _images(3)
    images[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"1 of 3 images hold NaN or inf \(rows \[1\]\)"):
        judge.embed(images)
    with pytest.raises(ValueError, match="expected float images B x 3 x H x W"):
        judge.embed(torch.rand(3, 32, 32))


def test_a_judge_from_an_export_embeds_as_the_bundle_it_was_saved_from(bundle, tmp_path) -> None:
    path = save_clip_export(bundle, tmp_path / "judge")
    images = _images(2, seed=4)
    assert torch.allclose(
        ClipJudge.from_export(path).embed(images), ClipJudge(bundle).embed(images), atol=1e-6
    )
