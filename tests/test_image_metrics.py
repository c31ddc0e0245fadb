"""Image-output backdoor metrics: image ASR (MSE and judge forms), the backdoor score v(S), edit quality."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from metrics import EditAccuracy, EditQuality, ImageAttackSuccessRate, JudgedAttackSuccessRate
from metrics.functional import (
    backdoor_score,
    edit_accuracy,
    edit_quality,
    image_attack_success_rate,
    image_target_hits,
    judged_attack_success_rate,
    per_image_mse,
)


def _images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _near_target(target: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Outputs at spread-out distances from the target: some MSEs below 0.1, some above."""
    rng = torch.Generator().manual_seed(seed)
    mix = torch.rand(n, 1, 1, 1, generator=rng)
    return (mix * target + (1 - mix) * torch.rand(n, *target.shape, generator=rng)).clamp(0, 1)


def test_per_image_mse_equals_the_mean_squared_pixel_difference() -> None:
    images, target = _images(5, 0), _images(1, 1)[0]
    expected = ((images.numpy() - target.numpy()[None]) ** 2).reshape(5, -1).mean(axis=1)
    np.testing.assert_allclose(per_image_mse(images, target).numpy(), expected, rtol=1e-6)
    edits = _images(5, 2)
    expected = ((images.numpy() - edits.numpy()) ** 2).reshape(5, -1).mean(axis=1)
    np.testing.assert_allclose(per_image_mse(images, edits).numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("threshold", [0.1, 0.03])
def test_image_asr_matches_reference_in_one_and_many_batches(threshold: float) -> None:
    target = _images(1, 3)[0]
    preds = _near_target(target, 40, 4)
    mse = ((preds.numpy() - target.numpy()[None]) ** 2).reshape(40, -1).mean(axis=1)
    expected = float((mse < threshold).mean())
    assert 0 < expected < 1  # the data straddle the threshold, so the test can fail both ways
    assert image_attack_success_rate(preds, target, threshold).item() == pytest.approx(expected)
    assert torch.equal(image_target_hits(preds, target, threshold), torch.from_numpy(mse < threshold))
    metric = ImageAttackSuccessRate(threshold)
    for chunk in preds.split(7):
        metric.update(chunk, target)
    assert metric.compute().item() == pytest.approx(expected)


def test_image_asr_threshold_is_strict() -> None:
    target = torch.zeros(3, 2, 2)
    exactly = torch.full((1, 3, 2, 2), 0.1**0.5)  # MSE == 0.1 up to rounding
    mse = per_image_mse(exactly, target).item()
    assert image_target_hits(exactly, target, threshold=mse).tolist() == [False]


def test_image_asr_rejects_a_target_of_another_size() -> None:
    with pytest.raises(
        ValueError, match=r"`target` of shape \(1, 3, 8, 8\) does not fit images of shape \(2, 3, 16, 16\)"
    ):
        image_attack_success_rate(_images(2, 0), torch.rand(3, 8, 8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_image_metrics_reject_non_finite_images_naming_the_rows(bad: float) -> None:
    preds = _images(4, 0)
    preds[2, 1, 3, 3] = bad
    target = _images(1, 1)[0]
    metric = ImageAttackSuccessRate()
    with pytest.raises(ValueError, match=r"1 of 4 images of `preds` hold NaN or inf \(rows 2\)"):
        metric.update(preds, target)
    assert int(metric.counted) == 0  # the state is untouched
    with pytest.raises(ValueError, match=r"images of `target` hold NaN"):
        image_attack_success_rate(_images(2, 0), torch.full((3, 16, 16), bad))
    quality = EditQuality()
    with pytest.raises(ValueError, match=r"EditQuality: 1 of 4 images of `preds` hold NaN or inf \(rows 2\)"):
        quality.update(preds, _images(4, 5))
    assert int(quality.count) == 0


def test_image_metrics_reject_images_outside_the_unit_range() -> None:
    with pytest.raises(ValueError, match=r"leave \[0, 1\].*x / 2 \+ 0.5"):
        image_attack_success_rate(_images(2, 0) * 2 - 1, _images(1, 1)[0])


def test_image_asr_bad_threshold() -> None:
    for threshold in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="threshold"):
            ImageAttackSuccessRate(threshold)


def test_judged_asr_matches_reference_in_one_and_many_batches() -> None:
    scores = torch.randn(30, generator=torch.Generator().manual_seed(0)) * 0.2
    for threshold in (0.0, 0.1):
        expected = float((scores.numpy() > threshold).mean())
        assert judged_attack_success_rate(scores, threshold).item() == pytest.approx(expected)
        metric = JudgedAttackSuccessRate(threshold)
        for chunk in scores.split(4):
            metric.update(chunk)
        assert metric.compute().item() == pytest.approx(expected)
    assert judged_attack_success_rate(torch.tensor([0.0])).item() == 0.0  # strict: a tie is no hit


def test_judged_asr_rejects_non_finite_scores() -> None:
    metric = JudgedAttackSuccessRate()
    with pytest.raises(ValueError, match=r"1 of 3 scores are NaN or inf \(rows 1\)"):
        metric.update(torch.tensor([0.1, float("nan"), 0.2]))
    assert int(metric.counted) == 0


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_backdoor_score_is_cos_to_target_minus_cos_to_clean() -> None:
    gen = torch.Generator().manual_seed(0)
    z, z_target, z_clean = (
        torch.randn(6, 8, generator=gen),
        torch.randn(8, generator=gen),
        torch.randn(6, 8, generator=gen),
    )
    expected = _cos(z.numpy(), z_target.numpy()[None]) - _cos(z.numpy(), z_clean.numpy())
    np.testing.assert_allclose(backdoor_score(z, z_target, z_clean).numpy(), expected, rtol=1e-5, atol=1e-6)
    # the output equal to the clean reference scores cos(z, z_target) - 1; equal to the target, 1 - cos(...)
    same = backdoor_score(z_clean, z_target, z_clean)
    np.testing.assert_allclose(
        same.numpy(), _cos(z_clean.numpy(), z_target.numpy()[None]) - 1, rtol=1e-5, atol=1e-6
    )


def test_backdoor_score_rejects_non_finite_zero_and_mismatched_embeddings() -> None:
    z = torch.randn(3, 4)
    bad = z.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"embeddings of `z_output` hold NaN or inf \(rows \[1\]\)"):
        backdoor_score(bad, z[0], z)
    with pytest.raises(ValueError, match="`z_clean` are zero vectors"):
        backdoor_score(z, z[0], torch.zeros(3, 4))
    with pytest.raises(ValueError, match="`z_target` has dimension 5"):
        backdoor_score(z, torch.randn(5), z)
    with pytest.raises(ValueError, match="`z_clean` holds 2 embeddings for 3 outputs"):
        backdoor_score(z, z[0], z[:2])


def test_edit_quality_equals_mse_by_hand_and_torchmetrics_ssim_in_one_and_many_batches() -> None:
    edits = _images(10, 0)
    preds = (edits + 0.1 * torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    mse = float(((preds.numpy() - edits.numpy()) ** 2).mean())
    ssim = structural_similarity_index_measure(preds, edits, data_range=1.0).item()
    assert 0.2 < ssim < 0.99  # not a trivial case
    result = edit_quality(preds, edits)
    assert result["mse"].item() == pytest.approx(mse, rel=1e-5)
    assert result["ssim"].item() == pytest.approx(ssim, rel=1e-5)
    metric = EditQuality()
    for p, e in zip(preds.split(3), edits.split(3)):
        metric.update(p, e)
    batched = metric.compute()
    assert batched["mse"].item() == pytest.approx(mse, rel=1e-5)
    assert batched["ssim"].item() == pytest.approx(ssim, rel=1e-5)


def test_edit_quality_rejects_edits_of_another_shape() -> None:
    with pytest.raises(
        ValueError, match=r"`target` \(the exact edits\) of the shape of `preds` \(2, 3, 16, 16\)"
    ):
        edit_quality(_images(2, 0), _images(3, 1))


def test_edit_accuracy_matches_reference_in_one_and_many_batches() -> None:
    predicted = ["red", "blue", "navy", "red", "gray"]
    requested = ["red", "green", "navy", "blue", "gray"]
    assert edit_accuracy(predicted, requested).item() == pytest.approx(3 / 5)
    metric = EditAccuracy()
    metric.update(predicted[:2], requested[:2])
    metric.update(predicted[2:], requested[2:])
    assert metric.compute().item() == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="2 predicted attributes for 3 requested"):
        metric.update(["red", "blue"], ["red", "blue", "green"])
    with pytest.raises(ValueError, match="list of attribute names"):
        edit_accuracy("red", "red")


@pytest.mark.parametrize(
    "module",
    [
        "metrics.image_attack_success_rate",
        "metrics.edit_quality",
        "metrics.functional.image_attack_success_rate",
        "metrics.functional.image_distance",
        "metrics.functional.backdoor_score",
        "metrics.functional.edit_quality",
    ],
)
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
