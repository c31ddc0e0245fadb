"""InverTune: target identification and trigger inversion (formulas, toy backdoor, errors)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defenses.invertune import (
    DEFAULT_MIN_MARGIN,
    CornerPatchUAP,
    InvertedTrigger,
    LinfUAP,
    align_loss,
    embedding_loss,
    identify_target,
    invert_trigger,
    inverted_trigger_asr,
    mask_l1_loss,
    similarity_loss,
    ssim,
    target_confidence,
    true_target_check,
    uap_objective,
)
from defenses.invertune.target_confidence import check_min_margin
from tests.conftest import ToyLinearBackdoor, identity

NUM_CLASSES = 4
TARGET = 2


class ToyCornerModel(ToyLinearBackdoor):
    """Class 2 lights up when the bottom-right 8 x 8 corner is brighter than the image
    (embedding ``8 * (corner mean - image mean) - 0.8``)."""

    def backdoor_feature(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, -8:, -8:].mean(dim=(1, 2, 3)) - x.mean(dim=(1, 2, 3))


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread avoids oversubscribing shared CPUs (10x faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def toy_model() -> ToyCornerModel:
    return ToyCornerModel()


@pytest.fixture
def class_text() -> torch.Tensor:
    return torch.eye(NUM_CLASSES)


@pytest.fixture
def clean_images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    base = 0.1 + 0.4 * torch.rand(64, 3, 1, 1, generator=generator)
    return (base + 0.05 * torch.rand(64, 3, 32, 32, generator=generator)).clamp(0, 1)


# ------------------------------------------------------------------------------------------------
# target identification
# ------------------------------------------------------------------------------------------------


def test_corner_patch_geometry_at_224() -> None:
    uap = CornerPatchUAP(224)
    assert uap.side == 38 and uap.margin == 14
    assert (uap.top, uap.left) == (224 - 14 - 38, 224 - 14 - 38)
    mask = uap.mask()
    assert mask.shape == (1, 224, 224) and mask.sum() == 38 * 38
    assert mask[0, 223 - 14, 223 - 14] == 1 and mask[0, 223 - 13, 223 - 13] == 0


def test_corner_patch_pastes_by_replacement_and_passes_gradients() -> None:
    uap = CornerPatchUAP(32, seed=1)
    x = torch.rand(2, 3, 32, 32)
    out = uap.apply(x)
    mask = uap.mask()
    full_patch = torch.zeros(3, 32, 32)
    full_patch[:, uap.top : uap.top + uap.side, uap.left : uap.left + uap.side] = uap.patch.detach()
    torch.testing.assert_close(out, mask * full_patch + (1 - mask) * x)
    out.sum().backward()
    assert uap.patch.grad is not None and torch.all(uap.patch.grad == 2)


def test_uap_objective_matches_formula() -> None:
    clean = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    adv = torch.tensor([[0.6, 0.8], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    predictions = torch.tensor([0, 1])
    cn = clean / clean.norm(dim=1, keepdim=True)
    an = adv / adv.norm(dim=1, keepdim=True)
    tn = text / text.norm(dim=1, keepdim=True)
    image_logits = (cn @ an.T / 0.1).tolist()
    image_term = -np.mean(
        [image_logits[i][i] - math.log(sum(math.exp(v) for v in image_logits[i])) for i in range(2)]
    )
    text_logits = (an @ tn.T / 0.1).tolist()
    text_term = -np.mean(
        [text_logits[i][p] - math.log(sum(math.exp(v) for v in text_logits[i])) for i, p in enumerate([0, 1])]
    )
    expected = image_term + 5.0 * text_term
    actual = uap_objective(clean, adv, text, predictions, temperature=0.1, text_weight=5.0)
    assert actual.item() == pytest.approx(expected, rel=1e-5)


def test_identify_target_with_bright_patch(toy_model, class_text, clean_images) -> None:
    uap = CornerPatchUAP(32)
    with torch.no_grad():
        uap.patch.fill_(1.0)
    result = identify_target(toy_model, clean_images, class_text, uap, identity, batch_size=16)
    assert result.target == TARGET
    assert result.ranking[0] == TARGET and sorted(result.ranking) == list(range(NUM_CLASSES))
    assert result.p_clean[TARGET] == 0 and result.p_adv[TARGET] == 1
    assert result.p_clean.sum().item() == pytest.approx(1) and result.p_adv.sum().item() == pytest.approx(1)
    torch.testing.assert_close(result.increase, result.p_adv - result.p_clean)
    runner_up = result.increase[result.ranking[1]]
    assert result.margin == pytest.approx(float(result.increase[TARGET] - runner_up))
    assert result.num_images == 64


def test_identify_target_after_fitting_the_patch(toy_model, class_text, clean_images) -> None:
    uap = CornerPatchUAP(32, seed=3)
    before = identify_target(toy_model, clean_images, class_text, uap, identity)
    assert before.p_adv[TARGET] < 0.5  # the random initial patch does not trigger the backdoor
    history = uap.fit(toy_model, clean_images, class_text, identity, epochs=30, batch_size=16, seed=0)
    assert len(history) == 30 * 4
    assert uap.patch.min() >= 0 and uap.patch.max() <= 1
    result = identify_target(toy_model, clean_images, class_text, uap, identity)
    assert result.target == TARGET and result.margin > 0.5


def test_linf_uap_stays_in_budget(toy_model, class_text, clean_images) -> None:
    uap = LinfUAP(32, eps=8 / 255)
    uap.fit(toy_model, clean_images, class_text, identity, epochs=2, batch_size=32, lr=0.01)
    assert uap.delta.abs().max() <= 8 / 255 + 1e-7
    out = uap.apply(clean_images)
    assert out.min() >= 0 and out.max() <= 1
    assert (out - clean_images).abs().max() <= 8 / 255 + 1e-6


def test_identify_target_rejects_empty_clean_set(toy_model, class_text) -> None:
    uap = CornerPatchUAP(32)
    with pytest.raises(ValueError, match="images is empty"):
        identify_target(toy_model, torch.empty(0, 3, 32, 32), class_text, uap, identity)
    with pytest.raises(ValueError, match="images is empty"):
        identify_target(toy_model, [], class_text, uap, identity)


# ------------------------------------------------------------------------------------------------
# how sure the identification is, and whether it found the true target
# ------------------------------------------------------------------------------------------------

NAMES = ["circle", "square", "triangle", "star"]


def test_a_margin_below_min_margin_is_low_confidence_and_names_the_top_two() -> None:
    increase = torch.tensor([0.05, 0.42, -0.30, 0.41], dtype=torch.float64)
    ranking = [1, 3, 0, 2]
    confidence = target_confidence(increase, ranking, NAMES, min_margin=0.1)
    assert (confidence.target, confidence.runner_up) == ("square", "star")
    assert confidence.margin == pytest.approx(0.42 - 0.41)
    assert confidence.low_confidence
    assert confidence.as_dict() == {
        "margin": pytest.approx(0.01),
        "threshold": 0.1,
        "low_confidence": True,
        "target": "square",
        "runner_up": "star",
        "target_increase": pytest.approx(0.42),
        "runner_up_increase": pytest.approx(0.41),
        "statistic": "rise",
    }
    text = confidence.describe()
    assert "0.010" in text and "'square'" in text and "'star'" in text
    # the same ranking is confident under a lower threshold; 0 never flags, not even a tie
    assert not target_confidence(increase, ranking, NAMES, min_margin=0.005).low_confidence
    tie = torch.tensor([0.2, 0.2, 0.0, 0.0], dtype=torch.float64)
    assert not target_confidence(tie, [0, 1, 2, 3], NAMES, min_margin=0.0).low_confidence
    assert target_confidence(tie, [0, 1, 2, 3], NAMES).low_confidence
    assert DEFAULT_MIN_MARGIN == 0.1


def test_target_confidence_rejects_bad_thresholds_rises_and_names() -> None:
    increase = torch.tensor([0.5, 0.1, 0.0, -0.6])
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="min_margin must be a finite number >= 0"):
            check_min_margin(bad)
    with pytest.raises(ValueError, match="4 class rises for 3 class names"):
        target_confidence(increase, [0, 1, 2, 3], NAMES[:3])
    with pytest.raises(ValueError, match=r"non-finite rise .* \['triangle'\]"):
        target_confidence(torch.tensor([0.5, 0.1, float("nan"), 0.0]), [0, 1, 2, 3], NAMES)


def test_true_target_check_says_found_missed_or_why_unknown() -> None:
    found = true_target_check(3, 3, NAMES, "unused")
    assert found == {"true_target": "star", "target_matches_true_target": True, "true_target_unknown": None}
    missed = true_target_check(1, 3, NAMES, "unused")
    assert missed == {"true_target": "star", "target_matches_true_target": False, "true_target_unknown": None}
    unknown = true_target_check(1, None, NAMES, "no attack target in the data")
    assert unknown == {
        "true_target": None,
        "target_matches_true_target": None,
        "true_target_unknown": "no attack target in the data",
    }


# ------------------------------------------------------------------------------------------------
# trigger inversion: parameterisation and losses
# ------------------------------------------------------------------------------------------------


def test_inverted_trigger_init_and_apply() -> None:
    trigger = InvertedTrigger((3, 8, 8), seed=5)
    assert trigger.mask.shape == (3, 8, 8) and trigger.pattern.shape == (3, 8, 8)
    assert torch.all(trigger.mask == 1)
    torch.testing.assert_close(
        trigger.pattern, torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(5))
    )
    with torch.no_grad():
        trigger.mask_param.fill_(0.25)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(trigger.apply(x), 0.25 * trigger.pattern + 0.75 * x)
    with torch.no_grad():
        trigger.mask_param.fill_(1.5)
        trigger.pattern_param.fill_(-0.5)
    trigger.project_()
    assert torch.all(trigger.mask == 1) and torch.all(trigger.pattern == 0)


@pytest.mark.parametrize("parameterization", ["sigmoid", "tanh"])
def test_inverted_trigger_smooth_parameterisations(parameterization) -> None:
    trigger = InvertedTrigger((3, 4, 4), parameterization=parameterization, seed=5)
    reference = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(5)).clamp(1e-3, 1 - 1e-3)
    torch.testing.assert_close(trigger.pattern, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trigger.mask, torch.full((3, 4, 4), 1 - 1e-3), atol=1e-5, rtol=1e-5)


def test_align_loss_matches_formula() -> None:
    features = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    cos = [[0.6, 0.8, 0.7 * math.sqrt(2)], [1.0, 0.0, math.sqrt(0.5)]]
    expected = np.mean([-(row[2] / 0.07 - math.log(sum(math.exp(v / 0.07) for v in row))) for row in cos])
    assert align_loss(features, text, target=2).item() == pytest.approx(expected, rel=1e-5)


def test_embedding_loss_matches_formula() -> None:
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    reference = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    fn = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    rn = [[0.0, 1.0], [1.0, 0.0]]

    def frob(rows: list[list[float]]) -> float:
        return math.sqrt(
            sum((a - b) ** 2 for f, r in zip(fn, rows, strict=True) for a, b in zip(f, r, strict=True))
        )

    assert embedding_loss(features, reference, "pairwise").item() == pytest.approx(
        frob([rn[0], rn[1], rn[0]])
    )
    assert embedding_loss(features, reference, "first").item() == pytest.approx(frob([rn[0]] * 3))
    assert embedding_loss(features, reference, "mean").item() == pytest.approx(frob([[0.5, 0.5]] * 3))
    with pytest.raises(ValueError, match="reference mode"):
        embedding_loss(features, reference, "nearest")


def _numpy_ssim(x: np.ndarray, y: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    coords = np.arange(window) - (window - 1) / 2
    g = np.exp(-(coords**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            for i in range(x.shape[2] - window + 1):
                for j in range(x.shape[3] - window + 1):
                    px, py = x[b, c, i : i + window, j : j + window], y[b, c, i : i + window, j : j + window]
                    mx, my = (w * px).sum(), (w * py).sum()
                    vx, vy = (w * px * px).sum() - mx**2, (w * py * py).sum() - my**2
                    cxy = (w * px * py).sum() - mx * my
                    values.append(
                        ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
                    )
    return float(np.mean(values))


def test_ssim_matches_numpy_reference_and_similarity_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 2, 13, 12, generator=generator, dtype=torch.float64)
    y = (x + 0.3 * torch.randn(x.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    expected = _numpy_ssim(x.numpy(), y.numpy())
    assert ssim(x, y).item() == pytest.approx(expected, rel=1e-10)
    assert similarity_loss(x, y).item() == pytest.approx(1 - expected, rel=1e-10)
    assert ssim(x, x).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="smaller than"):
        ssim(x[..., :8, :8], y[..., :8, :8])


def test_mask_l1_loss_is_the_sum_of_absolute_values() -> None:
    mask = torch.tensor([[[0.5, -0.25], [0.0, 1.0]]])
    assert mask_l1_loss(mask).item() == pytest.approx(1.75)


# ------------------------------------------------------------------------------------------------
# trigger inversion on the toy backdoor
# ------------------------------------------------------------------------------------------------


def test_invert_trigger_reproduces_the_toy_backdoor(toy_model, class_text, clean_images) -> None:
    records = []
    reference = clean_images[:4].clone()
    reference[:, :, -8:, -8:] = 1.0  # target-class images: bright corner
    trigger = invert_trigger(
        toy_model,
        clean_images,
        TARGET,
        class_text,
        reference,
        identity,
        epochs=5,
        batch_size=16,
        seed=0,
        callback=lambda record, _trigger: records.append(record),
    )
    assert len(trigger.history) == 5 * 4 and records == trigger.history
    first, last = trigger.history[0], trigger.history[-1]
    assert set(first) == {"step", "epoch", "total", "align", "embedding", "similarity", "mask_l1"}
    assert last["total"] < first["total"]
    assert trigger.mask.min() >= 0 and trigger.mask.max() <= 1
    assert trigger.pattern.min() >= 0 and trigger.pattern.max() <= 1
    assert inverted_trigger_asr(toy_model, clean_images, trigger, TARGET, class_text, identity) > 0.9
    assert not any(p.requires_grad is False for p in toy_model.parameters())  # flags restored


def test_inverted_trigger_asr_excludes_clean_target_predictions(toy_model, class_text, clean_images) -> None:
    images = clean_images.clone()
    images[:8, :, -8:, -8:] = 1.0  # already predicted as the target without a trigger
    bright = CornerPatchUAP(32)
    with torch.no_grad():
        bright.patch.fill_(1.0)
    assert inverted_trigger_asr(toy_model, images, bright, TARGET, class_text, identity) == 1.0
    asr_all = inverted_trigger_asr(
        toy_model, images, nn.Identity(), TARGET, class_text, identity, exclude_target=False
    )
    assert asr_all == pytest.approx(8 / 64)


def test_invert_trigger_errors(toy_model, class_text, clean_images) -> None:
    reference = clean_images[:2]
    with pytest.raises(ValueError, match="outside the class vocabulary"):
        invert_trigger(toy_model, clean_images, NUM_CLASSES, class_text, reference, identity, epochs=1)
    with pytest.raises(ValueError, match="outside the class vocabulary"):
        invert_trigger(toy_model, clean_images, -1, class_text, reference, identity, epochs=1)
    with pytest.raises(ValueError, match="clean_images is empty"):
        invert_trigger(
            toy_model, torch.empty(0, 3, 32, 32), TARGET, class_text, reference, identity, epochs=1
        )
    with pytest.raises(ValueError, match="clean_images is empty"):
        invert_trigger(toy_model, iter([]), TARGET, class_text, reference, identity, epochs=1)
    with pytest.raises(ValueError, match="reference_images"):
        invert_trigger(toy_model, clean_images, TARGET, class_text, reference[:0], identity, epochs=1)
    with pytest.raises(ValueError, match="outside the class vocabulary"):
        inverted_trigger_asr(toy_model, clean_images, nn.Identity(), 9, class_text, identity)


def test_invert_trigger_accepts_a_loader_of_labelled_batches(toy_model, class_text, clean_images) -> None:
    loader = [(clean_images[i : i + 16], torch.zeros(16)) for i in range(0, 64, 16)]
    trigger = invert_trigger(
        toy_model, loader, TARGET, class_text, clean_images[:2], identity, epochs=1, max_steps=3
    )
    assert len(trigger.history) == 3
    assert all(math.isfinite(record["total"]) for record in trigger.history)
    assert F.mse_loss(trigger.apply(clean_images), clean_images) >= 0
