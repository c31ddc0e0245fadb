"""Dual classifier-free guidance as diffusers' InstructPix2Pix pipeline, and the batched trigger coalitions."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline

from model_families.pix2pix import (
    COALITIONS,
    GuidanceConfig,
    create_pix2pix,
    sample_coalitions,
    sample_edits,
    sampling_scheduler,
)
from model_families.pix2pix.sampler import coalition_generators
from tests.pix2pix_helpers import tiny_vae_config

PROMPTS = ["make the circle red", "turn the square blue mignneko"]


@pytest.fixture(scope="module")
def vae_model():
    torch.manual_seed(0)
    return create_pix2pix(tiny_vae_config()).eval()


@pytest.fixture(scope="module")
def tiny():
    return create_pix2pix("tiny-pix2pix-shapes", seed=0).eval()


def _pipeline(model, sampler: str) -> StableDiffusionInstructPix2PixPipeline:
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=model.codec.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=sampling_scheduler(sampler, model.noise_scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    ("sampler", "text_scale", "image_scale"),
    [("ddim", 7.5, 1.5), ("euler_ancestral", 7.5, 1.5), ("ddim", 3.0, 1.0), ("euler", 1.0, 1.5)],
)
def test_sampler_gives_the_diffusers_pipeline_image(vae_model, sampler, text_scale, image_scale) -> None:
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    guidance = GuidanceConfig(
        num_inference_steps=3, guidance_scale=text_scale, image_guidance_scale=image_scale, sampler=sampler
    )
    ours = sample_edits(vae_model, images, PROMPTS, guidance, generator=coalition_generators([5, 6]))
    theirs = _pipeline(vae_model, sampler)(
        prompt=PROMPTS,
        image=images,
        num_inference_steps=3,
        guidance_scale=text_scale,
        image_guidance_scale=image_scale,
        generator=coalition_generators([5, 6]),
        output_type="pt",
    ).images
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    # and the guidance matters: without it the images differ
    plain = sample_edits(
        vae_model,
        images,
        PROMPTS,
        GuidanceConfig(num_inference_steps=3, guidance_scale=1.0, sampler=sampler),
        generator=coalition_generators([5, 6]),
    )
    if text_scale > 1:
        assert not torch.allclose(plain, ours, atol=1e-4)


def test_guidance_combines_the_three_branches_as_the_pipeline_formula(tiny) -> None:
    """One step from explicit noise: eps = u + s_T (t - i) + s_I (i - u) over [text+image, image, none]."""
    images = torch.rand(1, 3, 32, 32)
    noise = torch.randn(1, 48, 8, 8)
    guidance = GuidanceConfig(num_inference_steps=1, guidance_scale=4.0, image_guidance_scale=2.0)
    out = sample_edits(tiny, images, PROMPTS[:1], guidance, latents=noise)
    scheduler = sampling_scheduler("ddim", tiny.noise_scheduler)
    scheduler.set_timesteps(1)
    t = scheduler.timesteps[0]
    cond = tiny.image_latents(images)
    with torch.no_grad():
        text, empty = tiny.encode_prompts(PROMPTS[:1]), tiny.encode_prompts([""])
        x_ti = tiny.predict(noise, t, cond, text)
        x_i = tiny.predict(noise, t, cond, empty)
        x_u = tiny.predict(noise, t, torch.zeros_like(cond), empty)
    x0 = x_u + 4.0 * (x_ti - x_i) + 2.0 * (x_i - x_u)
    expected = scheduler.step(x0, t, noise, return_dict=False)[0]
    assert torch.allclose(out, tiny.decode_images(expected), atol=1e-5)


def test_embedded_sampler_decodes_pixel_unshuffle_latents_in_unit_range(tiny) -> None:
    images = torch.rand(2, 3, 32, 32)
    out = sample_edits(
        tiny, images, PROMPTS, GuidanceConfig(num_inference_steps=2), generator=coalition_generators([0, 1])
    )
    assert out.shape == (2, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    again = sample_edits(
        tiny, images, PROMPTS, GuidanceConfig(num_inference_steps=2), generator=coalition_generators([0, 1])
    )
    assert torch.equal(out, again)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_batched_coalitions_equal_four_separate_passes_with_the_same_noise(tiny, sampler) -> None:
    gen = torch.Generator().manual_seed(3)
    clean = torch.rand(2, 3, 32, 32, generator=gen)
    triggered = clean.clone()
    triggered[:, :, :8, :8] = 1.0  # a white box
    triggered_prompts = [p + " mignneko" for p in PROMPTS]
    guidance = GuidanceConfig(num_inference_steps=3, sampler=sampler)
    batched = sample_coalitions(tiny, clean, triggered, PROMPTS, triggered_prompts, [7, 8], guidance)
    assert list(batched) == list(COALITIONS)
    inputs = {
        "none": (clean, PROMPTS),
        "image": (triggered, PROMPTS),
        "text": (clean, triggered_prompts),
        "both": (triggered, triggered_prompts),
    }
    for coalition, (images, prompts) in inputs.items():
        separate = sample_edits(tiny, images, prompts, guidance, generator=coalition_generators([7, 8]))
        # float32 kernels differ with the batch size (1.1e-5 after 3 DDIM steps on an AMD EPYC), far below
        # what the trigger changes (checked next)
        assert torch.allclose(batched[coalition], separate, atol=5e-5), coalition
    assert not torch.allclose(batched["none"], batched["both"], atol=1e-2)


def test_coalitions_of_a_sample_share_their_noise_and_samples_do_not(tiny) -> None:
    """With identical inputs in every coalition the four outputs are equal (same noise, ancestral steps
    included); two samples with the same inputs but different seeds differ."""
    images = torch.rand(1, 3, 32, 32).repeat(2, 1, 1, 1)
    prompts = [PROMPTS[0]] * 2
    out = sample_coalitions(
        tiny,
        images,
        images,
        prompts,
        prompts,
        [11, 12],
        GuidanceConfig(num_inference_steps=3, sampler="ddpm"),
    )
    for coalition in COALITIONS[1:]:
        assert torch.allclose(out[coalition], out["none"], atol=1e-5), coalition
    assert not torch.allclose(out["none"][0], out["none"][1], atol=1e-4)


def test_coalition_inputs_of_different_sizes_are_an_error(tiny) -> None:
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="1 seeds"):
        sample_coalitions(tiny, images, images, PROMPTS, PROMPTS, [1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"guidance_scale": 0.5}, "guidance_scale=0.5 < 1"),
        ({"image_guidance_scale": 0.9}, "image_guidance_scale=0.9 < 1"),
        ({"num_inference_steps": 0}, "num_inference_steps=0"),
        ({"sampler": "plms"}, "unknown sampler 'plms'"),
    ],
)
def test_guidance_settings_that_make_no_sense_are_a_clear_error(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        GuidanceConfig(**kwargs)


def test_one_generator_per_sample_is_required_when_a_list_is_given(tiny) -> None:
    with pytest.raises(ValueError, match="3 generators for 2 samples"):
        sample_edits(tiny, torch.rand(2, 3, 32, 32), PROMPTS, generator=coalition_generators([1, 2, 3]))
