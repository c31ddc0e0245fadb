"""The warp trigger estimate: its geometry, its displacement formula and a toy warp backdoor it recovers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from callbacks.trigger_inversion import TriggerInversion
from defenses.invertune import inverted_trigger_asr
from defenses.invertune.warp_inversion import InvertedWarp, invert_warp
from tests.conftest import ToyLinearBackdoor

TARGET = 2
# clean images hold a soft vertical band at column 10; the backdoor wants it at 13
BAND, LEFT, RIGHT = 10, 7, 13


class ToyWarpModel(ToyLinearBackdoor):
    """Class 2 ("target") lights up when column 13 is brighter than column 7 (by 0.1 or more): on clean
    images the band at column 10 lights both alike; a rightward warp of the band opens the backdoor."""

    def backdoor_feature(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :, RIGHT].mean(dim=(1, 2)) - x[:, :, :, LEFT].mean(dim=(1, 2))


def lined_images(n: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    base = 0.1 + 0.3 * torch.rand(n, 3, 1, 1, generator=generator)
    images = (base + 0.05 * torch.rand(n, 3, 32, 32, generator=generator)).clamp(0, 1)
    band = torch.exp(-((torch.arange(32.0) - BAND) ** 2) / (2 * 2.0**2))  # sigma 2 px
    return (images + 0.6 * band).clamp(0, 1)


def test_a_zero_field_is_the_identity_and_a_constant_field_a_translation() -> None:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    warp = InvertedWarp((16, 16), init_std=0.0)
    torch.testing.assert_close(warp(x), x)
    with torch.no_grad():  # x-displacement of one pixel: x'(i, j) = x(i, j + 1), border-padded
        warp.control[:, 0] = 2 / 15
    out = warp(x)
    torch.testing.assert_close(out[..., :-1], x[..., 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[..., -1], x[..., -1], atol=1e-5, rtol=0)


def test_displacement_is_the_mean_absolute_flow_in_pixels() -> None:
    warp = InvertedWarp((16, 24), grid=3, init_std=0.0)
    with torch.no_grad():
        warp.control[:, 0] = 0.1  # x: 0.1 * (24 - 1) / 2 = 1.15 px everywhere
        warp.control[:, 1] = -0.2  # y: 0.2 * (16 - 1) / 2 = 1.5 px everywhere
    assert warp.displacement_px().item() == pytest.approx((1.15 + 1.5) / 2, rel=1e-5)


def test_inverted_warp_opens_a_toy_warp_backdoor() -> None:
    model, text, images = ToyWarpModel(), torch.eye(4), lined_images()
    identity = InvertedWarp((32, 32), init_std=0.0)
    before = inverted_trigger_asr(model, images, identity, TARGET, text, nn.Identity())
    warp = invert_warp(model, images.split(16), TARGET, text, nn.Identity(), (32, 32), epochs=15, lr=0.02)
    after = inverted_trigger_asr(model, images, warp, TARGET, text, nn.Identity())
    assert before == 0.0 and after >= 0.9
    assert warp.history[-1]["align"] < warp.history[0]["align"]
    # the field moves content rightwards at column 13 (negative x-flow: it samples from the left)
    assert warp.flow()[0, :, RIGHT, 0].mean() < 0
    assert not warp.control.requires_grad and all(p.requires_grad for p in model.parameters())


def test_warp_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match="control grid must be >= 2, got 1"):
        InvertedWarp((8, 8), grid=1)
    with pytest.raises(ValueError, match=r"fitted for \(8, 8\) images, got \(16, 16\)"):
        InvertedWarp((8, 8))(torch.rand(1, 3, 16, 16))
    model, text = ToyWarpModel(), torch.eye(4)
    with pytest.raises(ValueError, match="warp epochs must be >= 1, got 0"):
        invert_warp(model, [torch.rand(2, 3, 8, 8)], TARGET, text, nn.Identity(), (8, 8), epochs=0)
    with pytest.raises(ValueError, match="the clean non-target set is empty"):
        invert_warp(model, [], TARGET, text, nn.Identity(), (8, 8), epochs=1)
    with pytest.raises(ValueError, match=r"displacement weight must be >= 0, got -0\.1"):
        invert_warp(
            model, [torch.rand(2, 3, 8, 8)], TARGET, text, nn.Identity(), (8, 8), displacement_weight=-0.1
        )
    with pytest.raises(ValueError, match=r"warp_epochs must be >= 0 \(0: no warp estimate\), got -1"):
        TriggerInversion(warp_epochs=-1)
    with pytest.raises(ValueError, match=r"learning rate must be > 0, got 0\.0"):
        invert_warp(model, [torch.rand(2, 3, 8, 8)], TARGET, text, nn.Identity(), (8, 8), lr=0.0)
    # the callback checks its warp keys when it is built, not only once the warp is fitted
    with pytest.raises(ValueError, match=r"warp_grid must be >= 2 \(control points per side\), got 1"):
        TriggerInversion(warp_grid=1)
    with pytest.raises(ValueError, match=r"warp_lr must be > 0, got -0\.01"):
        TriggerInversion(warp_lr=-0.01)
    with pytest.raises(ValueError, match=r"warp_displacement_weight must be >= 0, got -1"):
        TriggerInversion(warp_displacement_weight=-1)
