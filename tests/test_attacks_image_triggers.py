import math

import pytest
import torch
import torch.nn.functional as F

from attacks import SIG, BadNet, Blended, LowFrequency, WaNet, resolve_size

ALL_TRIGGERS = {
    "badnet_noise_random": lambda: BadNet(patch_size=4),
    "badnet_white_br": lambda: BadNet(patch_size=4, pattern="white", location="br"),
    "badnet_checkerboard_xy": lambda: BadNet(patch_size=0.25, pattern="checkerboard", location=(2, 3)),
    "blended_fixed": lambda: Blended(),
    "blended_per_image": lambda: Blended(pattern="per_image_noise"),
    "sig": lambda: SIG(),
    "wanet": lambda: WaNet(),
    "wanet_noise_mode": lambda: WaNet(mode="noise"),
    "low_frequency": lambda: LowFrequency(),
    "low_frequency_fft": lambda: LowFrequency(filter="fft_mask", cutoff=0.3),
}


def _images(batch=4, channels=3, size=16, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=generator, dtype=dtype)


# ------------------------------------------------------------------------------------------ BadNet
@pytest.mark.parametrize(
    ("location", "margin", "rows", "cols"),
    [
        ("br", 1, slice(11, 15), slice(11, 15)),
        ("bl", 0, slice(12, 16), slice(0, 4)),
        ("tl", 2, slice(2, 6), slice(2, 6)),
        ("tr", 0, slice(0, 4), slice(12, 16)),
        ("center", 0, slice(6, 10), slice(6, 10)),
        ((5, 1), 0, slice(1, 5), slice(5, 9)),  # (x, y) = (column, row)
    ],
)
def test_badnet_white_patch_sets_exactly_the_patch(location, margin, rows, cols):
    images = _images()
    out = BadNet(patch_size=4, pattern="white", location=location, margin=margin)(images)
    expected = images.clone()
    expected[:, :, rows, cols] = 1.0
    assert torch.equal(out, expected)


def test_badnet_badencoder_configuration_rows_173_to_222():
    images = torch.zeros(1, 3, 224, 224)
    out = BadNet(patch_size=50, pattern="white", location="br", margin=1)(images)
    rows, cols = torch.nonzero(out[0, 0], as_tuple=True)
    assert (rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()) == (
        173,
        222,
        173,
        222,
    )


def test_badnet_checkerboard_values():
    out = BadNet(patch_size=4, pattern="checkerboard", location="tl")(torch.full((1, 1, 8, 8), 0.5))
    index = torch.arange(4)
    assert torch.equal(out[0, 0, :4, :4], ((index[:, None] + index[None, :]) % 2).float())
    assert torch.all(out[0, 0, 4:, :] == 0.5) and torch.all(out[0, 0, :, 4:] == 0.5)


def test_patch_size_fraction_and_pixels():
    assert resolve_size(0.071, 224, 224) == 16
    assert resolve_size(16, 224, 224) == 16
    assert resolve_size(0.25, 32, 32) == 8
    with pytest.raises(ValueError, match="fraction"):
        resolve_size(1.5, 32, 32)
    with pytest.raises(ValueError, match="does not fit"):
        resolve_size(40, 32, 32)
    out = BadNet(patch_size=0.25, pattern="white", location="tl")(torch.zeros(1, 3, 32, 32))
    assert out.sum().item() == 3 * 8 * 8


def test_badnet_noise_is_a_square_of_mean_plus_noise_at_a_random_place():
    images = _images(batch=8, size=32)
    out = BadNet(patch_size=6, pattern="noise", location="random", seed=3)(images)
    corners = set()
    for b in range(images.shape[0]):
        changed = (out[b] != images[b]).any(dim=0)
        rows, cols = torch.nonzero(changed, as_tuple=True)
        # Every changed pixel lies inside one 6 x 6 square.
        assert rows.max() - rows.min() < 6 and cols.max() - cols.min() < 6
        corners.add((rows.min().item(), cols.min().item()))
    assert len(corners) > 1, "random locations should differ between samples"


def test_badnet_noise_patch_is_centred_on_the_channel_mean():
    images = torch.full((64, 3, 16, 16), 0.5)
    images[:, 1] = 0.2
    out = BadNet(patch_size=16, pattern="noise", location="tl")(images)
    # Clamped N(mean, 1): the patch mean lies near E[clamp(N(m, 1), 0, 1)], different per channel.
    assert 0.45 < out[:, 0].mean() < 0.55
    assert out[:, 1].mean() < out[:, 0].mean() - 0.05


def test_badnet_pattern_tensor_and_file(tmp_path):
    from PIL import Image

    path = tmp_path / "patch.png"
    Image.new("RGB", (8, 8), color=(255, 0, 0)).save(path)
    images = torch.full((2, 3, 16, 16), 0.5)
    from_file = BadNet(patch_size=8, pattern=str(path), location="tl")(images)
    from_tensor = BadNet(
        patch_size=8, pattern=torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 8, 8), location="tl"
    )(images)
    assert torch.equal(from_file, from_tensor)
    assert torch.equal(
        from_file[:, :, :8, :8], torch.tensor([1.0, 0.0, 0.0])[None, :, None, None].expand(2, 3, 8, 8)
    )
    with pytest.raises(FileNotFoundError, match="nosie"):
        BadNet(pattern="nosie")


def test_badnet_argument_errors():
    with pytest.raises(ValueError, match="location"):
        BadNet(location="middle")
    with pytest.raises(ValueError, match="does not fit"):
        BadNet(patch_size=8, pattern="white", location=(12, 0))(torch.zeros(1, 3, 16, 16))


# ----------------------------------------------------------------------------------------- Blended
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blended_equals_formula(dtype):
    images = _images(dtype=dtype)
    trigger = Blended(alpha=0.2, image_size=16)
    expected = (0.8 * images + 0.2 * trigger.pattern.to(dtype)).clamp(0, 1)
    torch.testing.assert_close(
        trigger(images), expected, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6
    )


def test_blended_image_file(tmp_path):
    from PIL import Image

    path = tmp_path / "kitty.png"
    Image.new("RGB", (20, 10), color=(0, 255, 51)).save(path)
    images = _images()
    out = Blended(alpha=0.5, pattern=path)(images)
    colour = torch.tensor([0.0, 1.0, 0.2])[None, :, None, None]
    torch.testing.assert_close(out, 0.5 * images + 0.5 * colour, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------- SIG
def test_sig_equals_formula_on_constant_image():
    images = torch.full((2, 3, 8, 32), 0.5, dtype=torch.float64)
    out = SIG(delta=60 / 255, frequency=6)(images)
    j = torch.arange(32, dtype=torch.float64)
    expected = 0.5 + 60 / 255 * torch.sin(2 * math.pi * 6 * j / 32)
    torch.testing.assert_close(out, expected.expand_as(images), rtol=0, atol=1e-12)


def test_sig_is_clamped():
    out = SIG(delta=0.3)(torch.full((1, 3, 8, 32), 0.9))
    assert out.max() == 1.0 and out.min() >= 0.6 - 1e-6


# ------------------------------------------------------------------------------------------- WaNet
def test_wanet_zero_strength_is_identity():
    images = _images(size=32)
    torch.testing.assert_close(WaNet(s=0.0)(images), images, rtol=0, atol=1e-5)


def test_wanet_changes_image_and_grid_is_seeded():
    images = _images(size=32)
    a, b, other = WaNet(seed=0, image_size=32), WaNet(seed=0, image_size=32), WaNet(seed=1, image_size=32)
    assert torch.equal(a.grid, b.grid)
    assert not torch.allclose(a.grid, other.grid)
    assert (a(images) - images).abs().mean() > 0.01
    assert torch.equal(a(images), b(images))


def test_wanet_grid_follows_the_paper_normalisation():
    # grid = clamp((identity + s * upsample(noise) / H) * grid_rescale, -1, 1), noise normalised by mean |noise|
    trigger = WaNet(k=4, s=0.5, grid_rescale=0.9, image_size=(24, 32))
    noise = trigger.noise
    assert noise.shape == (1, 2, 4, 4) and abs(noise.abs().mean().item() - 1.0) < 1e-6
    upsampled = F.interpolate(noise, size=(24, 32), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, 24), torch.linspace(-1, 1, 32), indexing="ij")
    identity = torch.stack((cols, rows), -1)[None]
    expected = ((identity + 0.5 * upsampled / 24) * 0.9).clamp(-1, 1)
    torch.testing.assert_close(trigger.grid, expected)
    with pytest.raises(ValueError, match="separate trigger"):
        trigger(_images(size=24))  # 24 x 24, not the configured 24 x 32


def test_wanet_cleanclip_variant_and_noise_mode():
    images = _images(size=16)
    assert WaNet(k=16, s=1.0)(images).shape == images.shape
    attack, noise = WaNet(seed=0), WaNet(seed=0, mode="noise")
    assert not torch.allclose(attack(images), noise(images))
    ids = torch.tensor([7, 8, 9, 10])
    torch.testing.assert_close(noise(images, ids)[2:], noise(images[2:], ids[2:]))


def test_fixed_pattern_rejects_another_image_size():
    trigger = WaNet()
    trigger(_images(size=16))
    with pytest.raises(ValueError, match="separate trigger"):
        trigger(_images(size=32))


def test_lazy_pattern_state_dict_round_trip():
    trigger = Blended(seed=5)
    with pytest.raises(RuntimeError, match="image_size"):
        trigger.fingerprint()
    images = _images()
    out = trigger(images)
    restored = Blended(seed=99)
    restored.load_state_dict(trigger.state_dict())
    assert torch.equal(restored(images), out)


# ------------------------------------------------------------------------------------ LowFrequency
@pytest.mark.parametrize("filter_name", ["gaussian", "fft_mask"])
def test_low_frequency_budget_and_spectrum(filter_name):
    trigger = LowFrequency(epsilon=0.05, cutoff=0.25, filter=filter_name, image_size=32)
    pattern = trigger.pattern.double()
    assert abs(pattern.abs().max().item() - 0.05) < 1e-6
    images = torch.full((1, 3, 32, 32), 0.5)
    torch.testing.assert_close(trigger(images)[0], 0.5 + trigger.pattern, rtol=0, atol=1e-6)
    power = torch.fft.fft2(pattern).abs() ** 2
    radius = torch.sqrt(torch.fft.fftfreq(32)[:, None] ** 2 + torch.fft.fftfreq(32)[None, :] ** 2)
    # Beyond 3 sigma of the Gaussian (f_c = 0.125 cycles/px) the power is below exp(-9).
    high = power[:, radius > 0.375].sum() / power.sum()
    assert high < 1e-3


# ------------------------------------------------------------------------------- all the triggers
@pytest.mark.parametrize("make", ALL_TRIGGERS.values(), ids=ALL_TRIGGERS.keys())
def test_same_sample_same_trigger_in_any_batch(make):
    trigger = make()
    images = _images(batch=6)
    ids = torch.tensor([100, 101, 102, 103, 104, 105])
    full = trigger(images, ids)
    order = torch.tensor([4, 1, 3])
    torch.testing.assert_close(trigger(images[order], ids[order]), full[order], rtol=0, atol=1e-6)
    torch.testing.assert_close(make()(images, ids.tolist()), full, rtol=0, atol=0)


@pytest.mark.parametrize("make", ALL_TRIGGERS.values(), ids=ALL_TRIGGERS.keys())
def test_dtypes_and_clamping(make):
    images = _images()
    images[:, :, :2] = 0.0
    images[:, :, -2:] = 1.0
    out32 = make()(images)
    out64 = make()(images.double())
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64 and out64.shape == images.shape
    assert out64.min() >= 0 and out64.max() <= 1
    torch.testing.assert_close(out64.float(), out32, rtol=0, atol=1e-5)
    assert not torch.equal(out32, images)


@pytest.mark.parametrize("make", ALL_TRIGGERS.values(), ids=ALL_TRIGGERS.keys())
def test_meta_device(make):
    out = make()(torch.empty(2, 3, 16, 16, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 3, 16, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("make", ALL_TRIGGERS.values(), ids=ALL_TRIGGERS.keys())
def test_cuda_matches_cpu(make):
    images = _images()
    expected = make()(images)
    trigger = make().to("cuda")
    out = trigger(images.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=1e-5)
    assert all(buffer.device.type == "cuda" for buffer in trigger.buffers())


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="B x C x H x W"):
        SIG()(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="B x C x H x W"):
        SIG()(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="sample_ids"):
        BadNet()(_images(batch=2), torch.tensor([1, 2, 3]))


def test_fingerprints():
    assert BadNet(seed=1).fingerprint() == BadNet(seed=1).fingerprint()
    assert BadNet(seed=1).fingerprint() != BadNet(seed=2).fingerprint()
    assert BadNet(patch_size=16).fingerprint() != BadNet(patch_size=17).fingerprint()
    assert SIG().fingerprint() != SIG(frequency=5).fingerprint()
    assert WaNet(image_size=16).fingerprint() == WaNet(image_size=16).fingerprint()
    assert WaNet(image_size=16).fingerprint() != WaNet(image_size=16, seed=1).fingerprint()
    # The fixed pattern is hashed, not just the config: a replaced grid changes the fingerprint.
    trigger = WaNet(image_size=16)
    before = trigger.fingerprint()
    trigger.grid.mul_(0.5)
    assert trigger.fingerprint() != before
    # Moving or casting the pattern does not.
    lf = LowFrequency(image_size=16)
    assert lf.double().fingerprint() == LowFrequency(image_size=16).fingerprint()


@pytest.mark.parametrize("make", ALL_TRIGGERS.values(), ids=ALL_TRIGGERS.keys())
def test_config_rebuilds_the_trigger(make):
    from attacks import build_image_trigger

    trigger = make()
    images = _images()
    rebuilt = build_image_trigger(**trigger.config())
    assert torch.equal(rebuilt(images), trigger(images))


# Rounding a value in [0, 1] to bfloat16 / float16 moves it by at most half an ulp at 1 (2**-8 / 2**-11);
# the tolerance allows a couple of ulps, far below the pixel errors of computing in low precision.
LOW_PRECISION_ATOL = {torch.bfloat16: 1 / 128, torch.float16: 1e-3}


@pytest.mark.parametrize("dtype", LOW_PRECISION_ATOL, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("make", ALL_TRIGGERS.values(), ids=ALL_TRIGGERS.keys())
def test_low_precision_images_get_the_float32_trigger_rounded_once(make, dtype):
    images = _images(size=32).to(dtype)
    ids = torch.arange(10, 14)
    expected = make()(images.float(), ids).to(dtype)
    out = make()(images, ids)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=0, atol=LOW_PRECISION_ATOL[dtype])


@pytest.mark.parametrize("dtype", LOW_PRECISION_ATOL, ids=["bfloat16", "float16"])
def test_wanet_at_224px_in_low_precision_is_finite_and_matches_float32(dtype):
    # A bfloat16 grid at 224 px samples outside the image (NaN) and float16 is off by up to 0.99.
    images = _images(batch=2, size=224).to(dtype)
    trigger = WaNet(image_size=224)
    out = trigger(images)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, trigger(images.float()).to(dtype), rtol=0, atol=LOW_PRECISION_ATOL[dtype])
