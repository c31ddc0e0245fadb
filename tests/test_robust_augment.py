"""The clean-model robustness augmentation: seeded, identity when off, perturbations of the documented form."""

from __future__ import annotations

import pytest
import torch

from model_families.clip.robust_augment import RobustnessAugment


def _images(n: int = 8, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.25


def test_same_seed_same_output_and_off_is_identity() -> None:
    images = _images()
    aug = RobustnessAugment(noise_p=0.5, patch_p=0.5, blend_p=0.5)
    first = aug(images, torch.Generator().manual_seed(3))
    again = aug(images, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert not torch.equal(first, images)
    off = RobustnessAugment(noise_p=0.0, patch_p=0.0, blend_p=0.0)
    assert torch.equal(off(images, torch.Generator().manual_seed(3)), images)


def test_patch_changes_one_square_of_the_configured_size() -> None:
    images = _images()
    aug = RobustnessAugment(noise_p=0.0, patch_p=1.0, blend_p=0.0, patch_size=(3, 5))
    out = aug(images, torch.Generator().manual_seed(0))
    for before, after in zip(images, out):
        changed = (before != after).any(dim=0)
        rows = changed.any(dim=1).nonzero().flatten()
        cols = changed.any(dim=0).nonzero().flatten()
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert height == width and 3 <= height <= 5
        # a uniform-noise fill can repeat a pixel value by chance, so allow a few unchanged pixels
        assert int(changed.sum()) >= height * width - 2
        assert bool(changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].float().mean() > 0.9)


def test_blend_stays_within_alpha_of_the_image() -> None:
    images = _images()
    aug = RobustnessAugment(noise_p=0.0, patch_p=0.0, blend_p=1.0, blend_alpha=0.1)
    out = aug(images, torch.Generator().manual_seed(0))
    # (1 - a) x + a n with n in [0, 1] differs from x by at most a * max(x, 1 - x) <= 0.1
    assert float((out - images).abs().max()) <= 0.1 + 1e-6
    assert float((out - images).abs().mean()) > 0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"noise_p": 1.5}, "noise_p"),
        ({"patch_size": [4, 2]}, "patch_size"),
        ({"blur": 0.1}, "unknown keys"),
    ],
)
def test_bad_config_is_a_clear_error(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RobustnessAugment.from_dict(config)
