"""CleanCLIP and PAR baselines: losses against their formulas, augmentations, objectives."""

from __future__ import annotations

import copy
import math

import numpy as np
import open_clip
import pytest
import torch

from defenses.cleanclip import CleanCLIPObjective, augment_images, augment_text, cleanclip_loss
from defenses.contrastive import clip_contrastive_loss, info_nce_loss
from defenses.par import (
    PARObjective,
    par_loss,
    perturb_images,
    random_erasing,
    threshold,
    thresholded_distance,
)

TEXT_CFG = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 4, "layers": 1}
RN_CFG = {"image_size": 32, "layers": (1, 1, 1, 1), "width": 16}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread avoids oversubscribing shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.25


def hash_tokenizer(captions: list[str]) -> torch.Tensor:
    """A stand-in tokenizer for the 100-token vocabulary of the tiny model (ids 1..99, 0 pads)."""
    tokens = torch.zeros(len(captions), 16, dtype=torch.long)
    for i, caption in enumerate(captions):
        ids = [1 + sum(map(ord, word)) % 99 for word in caption.split()][:16]
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return tokens


def _ce(logits: np.ndarray, label: int) -> float:
    return float(-(logits[label] - math.log(np.exp(logits).sum())))


def _normalise(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


IMAGE = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
TEXT = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 1.0]])
AUG_IMAGE = np.array([[1.0, 0.2, 0.0], [0.0, 1.0, 1.0], [2.0, 1.0, 0.0]])
AUG_TEXT = np.array([[1.0, 0.5, 0.5], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
SCALE = 10.0


def reference_clip(image: np.ndarray, text: np.ndarray, scale: float) -> float:
    logits = scale * _normalise(image) @ _normalise(text).T
    return 0.5 * (
        np.mean([_ce(logits[i], i) for i in range(3)]) + np.mean([_ce(logits.T[i], i) for i in range(3)])
    )


def reference_nce(a: np.ndarray, b: np.ndarray, scale: float) -> float:
    logits = scale * _normalise(a) @ _normalise(b).T
    return float(np.mean([_ce(logits[i], i) for i in range(3)]))


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


# ------------------------------------------------------------------------------------------------
# shared contrastive losses
# ------------------------------------------------------------------------------------------------


def test_clip_contrastive_loss_matches_formula() -> None:
    assert clip_contrastive_loss(t(IMAGE), t(TEXT), SCALE).item() == pytest.approx(
        reference_clip(IMAGE, TEXT, SCALE)
    )
    with pytest.raises(ValueError, match="same B x D"):
        clip_contrastive_loss(t(IMAGE), t(TEXT[:2]), SCALE)


def test_info_nce_loss_matches_formula() -> None:
    assert info_nce_loss(t(IMAGE), t(AUG_IMAGE), SCALE).item() == pytest.approx(
        reference_nce(IMAGE, AUG_IMAGE, SCALE)
    )


# ------------------------------------------------------------------------------------------------
# CleanCLIP
# ------------------------------------------------------------------------------------------------


def test_cleanclip_loss_matches_formula() -> None:
    out = cleanclip_loss(
        t(IMAGE), t(TEXT), t(AUG_IMAGE), t(AUG_TEXT), SCALE, image_weight=2.0, text_weight=0.5
    )
    clip = reference_clip(IMAGE, TEXT, SCALE)
    image_nce = reference_nce(IMAGE, AUG_IMAGE, SCALE)
    text_nce = reference_nce(TEXT, AUG_TEXT, SCALE)
    assert out.clip.item() == pytest.approx(clip)
    assert out.image_nce.item() == pytest.approx(image_nce)
    assert out.text_nce.item() == pytest.approx(text_nce)
    assert out.total.item() == pytest.approx(clip + 2.0 * image_nce + 0.5 * text_nce)


def test_augment_images_is_seeded_and_stays_in_range() -> None:
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    first = augment_images(images, torch.Generator().manual_seed(1))
    second = augment_images(images, torch.Generator().manual_seed(1))
    assert first.shape == images.shape and torch.equal(first, second)
    assert first.min() >= 0 and first.max() <= 1 and not torch.allclose(first, images)
    identity = augment_images(
        images, torch.Generator(), crop_scale=(1.0, 1.0), flip_p=0.0, brightness=0.0, contrast=0.0
    )
    torch.testing.assert_close(identity, images)


def test_augment_text_drops_and_swaps_words_reproducibly() -> None:
    captions = ["a photo of a small red dog", "cat", ""]
    first = augment_text(captions, torch.Generator().manual_seed(0), p_drop=0.3)
    assert first == augment_text(captions, torch.Generator().manual_seed(0), p_drop=0.3)
    assert first[1] == "cat" and first[2] == ""
    assert set(first[0].split()) <= set(captions[0].split()) and first[0] != captions[0]
    assert augment_text(["one two"], torch.Generator(), p_drop=1.0)[0] in {"one", "two"}
    swapped = augment_text(["w1 w2 w3 w4 w5"], torch.Generator().manual_seed(2), p_drop=0.0)[0]
    assert sorted(swapped.split()) == ["w1", "w2", "w3", "w4", "w5"]


def test_cleanclip_objective_runs_on_a_tiny_clip() -> None:
    torch.manual_seed(0)
    model = open_clip.model.CLIP(32, RN_CFG, TEXT_CFG)
    objective = CleanCLIPObjective(hash_tokenizer, normalize, seed=0)
    images = torch.rand(4, 3, 32, 32)
    captions = ["a red square", "a blue circle", "a green star", "a dog on grass"]
    out = objective(model, images, captions)
    assert out.total.item() == pytest.approx(
        out.clip.item() + out.image_nce.item() + out.text_nce.item(), rel=1e-6
    )
    out.total.backward()
    assert model.visual.conv1.weight.grad is not None and model.token_embedding.weight.grad is not None


# ------------------------------------------------------------------------------------------------
# PAR
# ------------------------------------------------------------------------------------------------


def test_threshold_keeps_values_up_to_tau() -> None:
    z = torch.tensor([0.0, 1.0, 2.15, 2.2, 4.0])
    assert threshold(z).tolist() == pytest.approx([0.0, 1.0, 2.15, 0.0, 0.0])


def test_thresholded_distance_matches_formula() -> None:
    u = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    v = np.array([[0.0, 1.0], [-1.0, 0.0], [-1.0, 0.0]])
    squared = ((_normalise(u) - _normalise(v)) ** 2).sum(1)  # 2, 2, 4
    assert thresholded_distance(t(u), t(v), tau=2.15).item() == 0.0  # batch mean 8/3 > tau
    assert thresholded_distance(t(u), t(v), tau=3.0).item() == pytest.approx(squared.mean())
    per_sample = np.mean([s if s <= 2.15 else 0.0 for s in squared])
    assert thresholded_distance(t(u), t(v), tau=2.15, reduction="per_sample").item() == pytest.approx(
        per_sample
    )


def test_par_loss_matches_formula() -> None:
    frozen_image = IMAGE + 0.3
    frozen_text = TEXT[::-1].copy()
    out = par_loss(t(IMAGE), t(TEXT), t(frozen_image), t(frozen_text), SCALE)

    def thr_mean(a: np.ndarray, b: np.ndarray) -> float:
        z = ((_normalise(a) - _normalise(b)) ** 2).sum(1).mean()
        return z if z <= 2.15 else 0.0

    expected = reference_clip(IMAGE, TEXT, SCALE) - 0.5 * (
        thr_mean(IMAGE, frozen_image) + thr_mean(TEXT, frozen_text)
    )
    assert out.total.item() == pytest.approx(expected)
    assert out.image_distance.item() == pytest.approx(thr_mean(IMAGE, frozen_image))
    perturbed_text = AUG_TEXT
    out = par_loss(
        t(IMAGE), t(TEXT), t(frozen_image), t(frozen_text), SCALE, perturbed_text_features=t(perturbed_text)
    )
    assert out.text_distance.item() == pytest.approx(thr_mean(perturbed_text, frozen_text))


def test_perturb_images_noise_and_erasing() -> None:
    images = torch.full((16, 3, 32, 32), 0.5)
    unchanged = perturb_images(images, torch.Generator().manual_seed(0), noise_p=0.0, erase_p=0.0)
    assert torch.equal(unchanged, images)
    noisy = perturb_images(images, torch.Generator().manual_seed(0), noise_p=1.0, erase_p=0.0)
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert (noisy - images).std().item() == pytest.approx(0.2, rel=0.1)
    erased = random_erasing(images, torch.Generator().manual_seed(0), p=1.0)
    area = (erased == 0).all(dim=1).float().mean(dim=(1, 2))
    assert torch.all(area > 0) and torch.all(area <= 0.34)
    mixed = perturb_images(images, torch.Generator().manual_seed(1))
    assert torch.equal(mixed, perturb_images(images, torch.Generator().manual_seed(1)))


def test_par_objective_equals_clip_loss_before_tuning() -> None:
    torch.manual_seed(0)
    model = open_clip.model.CLIP(32, RN_CFG, TEXT_CFG).eval()
    frozen = copy.deepcopy(model).requires_grad_(False)
    images = torch.rand(4, 3, 32, 32)
    captions = ["a red square", "a blue circle", "a green star", "a dog on grass"]
    out = PARObjective(frozen, hash_tokenizer, normalize, seed=0)(model, images, captions)
    assert out.image_distance.item() == pytest.approx(0.0, abs=1e-6)
    assert out.text_distance.item() == pytest.approx(0.0, abs=1e-6)
    assert out.total.item() == pytest.approx(out.clip.item(), rel=1e-6)
    out.total.backward()
    assert model.visual.conv1.weight.grad is not None
    perturbed = PARObjective(frozen, hash_tokenizer, normalize, text_perturbation=augment_text)(
        model, images, captions
    )
    assert math.isfinite(perturbed.total.item())
