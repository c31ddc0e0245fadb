"""Fast masked-diffusion generation: the image encoded once per generation, prefix / dual KV caches."""

from __future__ import annotations

import pytest
import torch

from model_families.mdlm.config import LladaVConfig
from model_families.mdlm.diffusion import generate
from model_families.mdlm.inference import GenerationConfig, generate_ids, suppressed_token_ids
from model_families.mdlm.modeling import LladaVModel
from model_families.mdlm.tokenizer import load_embedded_tokenizer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LladaVModel(LladaVConfig.tiny(load_embedded_tokenizer())).eval()


def _batch(model, batch=3, prompt_len=6, seed=2):
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(20, 150, (batch, prompt_len), generator=gen)
    prompts[:, 1] = model.config.image_token_index
    images = torch.rand(batch, 3, 32, 32, generator=gen)
    return prompts, images


def _selection(model, batch, every=3):
    chosen = torch.zeros(batch, model.config.num_vision_tokens, dtype=torch.bool)
    chosen[:, ::every] = True
    return chosen


def _todays_path(model, prompts, images, config, generator=None, prompt_mask=None, **model_kwargs):
    """The sampler with ``pixel_values`` at every step (the vision tower re-run each time), as before."""
    unconditional = None
    if config.cfg_scale > 0:
        unconditional = dict(model_kwargs, pixel_values=images)
        unconditional["vision_token_mask"] = torch.ones(
            prompts.shape[0], model.config.num_vision_tokens, dtype=torch.bool
        )
    out = generate(
        model, prompts, model.config.mask_token_id, gen_length=config.gen_length,
        block_length=config.block_length, steps=config.steps, temperature=config.temperature,
        remasking=config.remasking, cfg_scale=config.cfg_scale, generator=generator,
        attention_mask=prompt_mask, cfg_keep_ids=(model.config.image_token_index,),
        unconditional_kwargs=unconditional, suppress_ids=suppressed_token_ids(model.config),
        pixel_values=images, **model_kwargs,
    )  # fmt: skip
    return out[:, prompts.shape[1] :]


# ------------------------------------------------------------------------------------- image encoded once
@pytest.mark.parametrize("intervention", [None, "vision_token_mask", "vision_token_drop"])
@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 0.0},
        {"temperature": 1.0, "remasking": "random"},
        {"temperature": 0.0, "cfg_scale": 1.5},
    ],
    ids=["greedy", "sampled", "cfg"],
)
def test_image_encoded_once_gives_the_tokens_of_encoding_at_every_step(tiny, intervention, settings):
    prompts, images = _batch(tiny)
    config = GenerationConfig(gen_length=8, block_length=4, steps=4, **settings)
    extra = {} if intervention is None else {intervention: _selection(tiny, 3)}
    calls = []
    hook = tiny.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        fast = generate_ids(
            tiny, prompts, images, config, generator=torch.Generator().manual_seed(7), **extra
        )
    finally:
        hook.remove()
    assert len(calls) == 1, f"the vision tower ran {len(calls)} times for one generation"
    reference = _todays_path(tiny, prompts, images, config, torch.Generator().manual_seed(7), **extra)
    assert torch.equal(fast, reference)


def test_image_count_mismatch_names_both_counts(tiny):
    prompts, images = _batch(tiny)
    with pytest.raises(ValueError, match="2 images for 3 prompts"):
        generate_ids(tiny, prompts, images[:2], GenerationConfig())
