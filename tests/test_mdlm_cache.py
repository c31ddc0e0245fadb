"""Fast masked-diffusion generation: the image encoded once per generation, prefix / dual KV caches."""

from __future__ import annotations

import json

import pytest
import torch

from datamodules.mdlm_shapes import ShapesInstructDataModule
from defenses.disp.masking import DiSPMasking, masked_generate_ids
from defenses.disp.purified_set import purification_dataset
from defenses.disp.purify import purify_dataset
from model_families.mdlm.config import LladaVConfig
from model_families.mdlm.diffusion import generate
from model_families.mdlm.inference import (
    GenerationConfig,
    decode_responses,
    generate_ids,
    suppressed_token_ids,
)
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


# ------------------------------------------------------------------------------------- KV caches
@pytest.fixture(scope="module")
def sharp(tiny):
    """The tiny model with large LM weights: peaked attention and logits, so that a stale cached K/V changes
    the generated tokens (at the default init, the tiny model's outputs barely depend on the context)."""
    model = LladaVModel(tiny.config).eval()
    model.load_state_dict(tiny.state_dict())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in [*model.language_model.named_parameters(), ("lm_head", model.lm_head.weight)]:
            if param.dim() == 2:
                scale = 1.0 if "embed" in name else param.shape[1] ** -0.5
                param.copy_(3.0 * scale * torch.randn(param.shape, generator=gen))
    return model


class _Pinned:
    """Forward pre-hooks on every LM layer: ``record`` keeps each layer's input hidden states; ``pin(positions)``
    replaces those positions' inputs by the recorded ones, so their K/V at every layer are the recorded
    forward's while every other position is computed afresh."""

    def __init__(self, model):
        self.recorded, self.positions, self.mode = {}, None, "off"
        self.handles = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, layer in enumerate(model.language_model.layers)
        ]

    def _hook(self, index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.mode == "record":
                self.recorded[index] = hidden.clone()
                return None
            if self.mode == "pin":
                hidden = hidden.clone()
                hidden[:, self.positions] = self.recorded[index][:, self.positions]
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}
            return None

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _reference_cached_generate(
    model, prompts, images, config, cache, generator=None, prompt_mask=None, **interventions
):
    """Fast-dLLM's prefix / dual cache the slow, obvious way: every step runs the whole sequence; at a block's
    first step each layer's inputs are recorded, at its later steps the cached positions (prefix: everything
    before the block; dual: everything but the block) are pinned to them at every layer, so their K/V are the
    block's first step's. Only the block is scored: Gumbel draw (B, block, V), ``random`` draw (B, block)."""
    mask_id = model.config.mask_token_id
    batch, prompt_len = prompts.shape
    gen_length, block_length = config.gen_length, config.block_length
    x = torch.cat([prompts, torch.full((batch, gen_length), mask_id)], dim=1)
    attention = None if prompt_mask is None else torch.cat([prompt_mask, torch.ones(batch, gen_length)], 1)
    forbidden = torch.tensor(suppressed_token_ids(model.config))
    blocks = gen_length // block_length
    per_block = config.steps // blocks
    pins = _Pinned(model)
    try:
        for b in range(blocks):
            start = prompt_len + b * block_length
            end = start + block_length
            count = int((x[:, start:end] == mask_id).sum(1).max())
            schedule = [count // per_block + (i < count % per_block) for i in range(per_block)]
            for i in range(per_block):
                pins.mode = "record" if i == 0 else "pin"
                with torch.no_grad():
                    out = model(
                        x, pixel_values=images, attention_mask=attention, full_sequence=True, **interventions
                    )
                offset = out.logits.shape[1] - x.shape[1]
                seq = torch.arange(out.logits.shape[1])
                block_seq = (seq >= start + offset) & (seq < end + offset)
                pins.positions = ~block_seq if cache == "dual" else seq < start + offset
                logits = out.logits[:, start + offset : end + offset].double()
                scores = logits.clone()
                if config.temperature > 0:
                    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64)
                    scores = logits.exp() / (-torch.log(u)) ** config.temperature
                scores[..., forbidden] = -torch.inf
                x0 = scores.argmax(-1)
                if config.remasking == "low_confidence":
                    confidence = logits.softmax(-1).gather(-1, x0[..., None])[..., 0]
                else:
                    confidence = torch.rand(x0.shape, generator=generator).double()
                masked = x[:, start:end] == mask_id
                confidence = torch.where(masked, confidence, -torch.inf)
                for row in range(batch):
                    chosen = confidence[row].topk(schedule[i]).indices
                    x[row, start + chosen] = x0[row, chosen]
    finally:
        pins.remove()
    return x[:, prompt_len:]


def test_unknown_cache_is_an_error_naming_the_key_and_the_allowed_values():
    with pytest.raises(ValueError, match=r"cache='full'.*\('none', 'prefix', 'dual'\)"):
        GenerationConfig(cache="full")
    with pytest.raises(ValueError, match=r"cache='full'.*\('none', 'prefix', 'dual'\)"):
        GenerationConfig.from_dict({"cache": "full"})
    with pytest.raises(ValueError, match="cache='full'"):
        generate(
            lambda x: x, torch.tensor([[1]]), mask_id=7, gen_length=4, block_length=4, steps=4, cache="full"
        )
    with pytest.raises(ValueError, match="block_logits"):
        generate(
            lambda x: x, torch.tensor([[1]]), mask_id=7, gen_length=4, block_length=4, steps=4, cache="dual"
        )


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_block_logits_reuse_the_first_steps_kv_and_differ_from_the_exact_forward(sharp, cache):
    prompts, images = _batch(sharp)
    mask_id = sharp.config.mask_token_id
    start, end = prompts.shape[1], prompts.shape[1] + 4
    first = torch.cat([prompts, torch.full((3, 8), mask_id)], dim=1)
    later = first.clone()
    later[:, start : start + 2] = torch.tensor([40, 41])
    vision = sharp.encode_images(images)
    with torch.no_grad():
        logits0, state = sharp.block_logits(first, start, end, cache, vision_token_override=vision)
        exact0 = sharp(first, vision_token_override=vision).logits[:, start:end]
        cached = sharp.block_logits(later, start, end, cache, state, vision_token_override=vision)[0]
        exact = sharp(later, vision_token_override=vision).logits[:, start:end]
        pins = _Pinned(sharp)
        try:
            pins.mode = "record"
            full = sharp(first, vision_token_override=vision, full_sequence=True).logits
            offset = full.shape[1] - first.shape[1]
            seq = torch.arange(full.shape[1])
            in_block = (seq >= start + offset) & (seq < end + offset)
            pins.mode, pins.positions = "pin", (~in_block if cache == "dual" else seq < start + offset)
            reference = sharp(later, vision_token_override=vision).logits[:, start:end]
        finally:
            pins.remove()
    assert torch.equal(logits0, exact0), "a block's first step is the exact forward"
    assert torch.allclose(cached, reference, atol=1e-4, rtol=1e-5)
    assert (cached - exact).abs().max() > 1e-2, "the later step must see the first step's (stale) K/V"
    assert state.cache.length == (start + offset if cache == "prefix" else full.shape[1] - 4)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize(
    "settings",
    [{}, {"temperature": 1.0}, {"temperature": 0.5, "remasking": "random"}],
    ids=["greedy", "sampled", "random"],
)
def test_cached_generation_equals_the_slow_reference(sharp, cache, settings):
    prompts, images = _batch(sharp)
    config = GenerationConfig(gen_length=16, block_length=8, steps=16, cache=cache, **settings)
    fast = generate_ids(sharp, prompts, images, config, generator=torch.Generator().manual_seed(3))
    slow = _reference_cached_generate(
        sharp, prompts, images, config, cache, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(fast, slow)
    exact = generate_ids(sharp, prompts, images, GenerationConfig(gen_length=16, block_length=8, steps=16))
    if not settings:
        assert not torch.equal(fast, exact), "the sharp model must make the approximation visible"


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("intervention", ["vision_token_mask", "vision_token_drop"])
def test_cached_generation_applies_vision_interventions(sharp, cache, intervention):
    prompts, images = _batch(sharp)
    chosen = {intervention: _selection(sharp, 3, every=2)}
    config = GenerationConfig(gen_length=16, block_length=8, steps=16, cache=cache)
    fast = generate_ids(sharp, prompts, images, config, **chosen)
    assert torch.equal(fast, _reference_cached_generate(sharp, prompts, images, config, cache, **chosen))
    assert not torch.equal(fast, generate_ids(sharp, prompts, images, config))


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_generation_of_a_padded_batch_equals_each_prompt_alone(sharp, cache):
    prompts, images = _batch(sharp)
    short = torch.cat([prompts[1:2, :2], prompts[1:2, 4:]], dim=1)
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), short], dim=1)
    batch = torch.cat([prompts[:1], padded], dim=0)
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    config = GenerationConfig(gen_length=16, block_length=8, steps=16, cache=cache)
    together = generate_ids(sharp, batch, images[:2], config, prompt_mask=mask)
    assert torch.equal(together[:1], generate_ids(sharp, prompts[:1], images[:1], config))
    assert torch.equal(together[1:], generate_ids(sharp, short, images[1:2], config))


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_one_step_per_block_every_cache_equals_none(sharp, cache, cfg_scale):
    prompts, images = _batch(sharp)
    chosen = _selection(sharp, 3)
    for gen_length, block_length in ((16, 4), (8, 8)):
        steps = gen_length // block_length
        none = GenerationConfig(gen_length, block_length, steps, cfg_scale=cfg_scale)
        cached = GenerationConfig(gen_length, block_length, steps, cfg_scale=cfg_scale, cache=cache)
        for extra in ({}, {"vision_token_mask": chosen}):
            assert torch.equal(
                generate_ids(sharp, prompts, images, cached, **extra),
                generate_ids(sharp, prompts, images, none, **extra),
            )


def test_purification_generates_with_the_configured_cache(tmp_path, sharp, monkeypatch):
    dm = ShapesInstructDataModule(train_size=2, val_size=2, test_size=2, response_length=8)
    dm.setup("fit")
    generation = GenerationConfig.from_dict({"gen_length": 8, "block_length": 4, "steps": 8, "cache": "dual"})
    masking = DiSPMasking(rho=0.25, selection="random")
    calls = []
    original = sharp.block_logits
    monkeypatch.setattr(sharp, "block_logits", lambda *a, **k: calls.append(a[3]) or original(*a, **k))
    path = purify_dataset(
        sharp, purification_dataset(dm), dm.collator, tmp_path / "purified", load_embedded_tokenizer(),
        masking, generation, batch_size=4, chunk_size=4,
    )  # fmt: skip
    assert calls and set(calls) == {"dual"}, "purification must generate through the dual cache"
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["settings"]["generation"]["cache"] == "dual"
    # the same responses as the masked generation with the cache, batch by batch (one batch here)
    batch = dm.collator([purification_dataset(dm)[i] for i in range(4)])
    ids, _ = masked_generate_ids(
        sharp, batch["prompt_ids"], batch["pixel_values"], generation, masking, batch["prompt_mask"],
        torch.Generator().manual_seed(0),
    )  # fmt: skip
    tokenizer = load_embedded_tokenizer()
    stops = [sharp.config.eot_token_id, sharp.config.eos_token_id]
    expected = decode_responses(tokenizer, ids, stops)
    assert [r["conversations"][-1]["value"] for r in json.loads(path.read_text())] == expected


# ------------------------------------------------------------------------------------- threshold decoding
class _FixedConfidence:
    """Predicts token 100 + position with logit score[position] (others 0); counts its calls."""

    def __init__(self, scores, vocab=200):
        self.scores, self.vocab, self.calls = scores, vocab, []

    def __call__(self, x, **kwargs):
        self.calls.append(x.clone())
        logits = torch.zeros(*x.shape, self.vocab)
        logits[:, torch.arange(x.shape[1]), 100 + torch.arange(x.shape[1])] = self.scores[: x.shape[1]]
        return logits


def test_threshold_commits_every_confident_token_at_once_and_ends_the_block_early():
    # softmax of logit 12 among 200 ids: 0.9989 > 0.9; logit 1: 0.013. Positions 3..10 form two blocks of 4.
    scores = torch.tensor([0.0, 0, 0, 12, 1, 12, 12, 1, 2, 3, 4])
    model = _FixedConfidence(scores)
    out = generate(
        model, torch.tensor([[1, 2, 3]]), mask_id=7, gen_length=8, block_length=4, steps=8, threshold=0.9
    )
    assert out[0, 3:].tolist() == list(range(103, 111))
    newly = [
        ((a == 7) & (b != 7))[0].nonzero().flatten().tolist()
        for a, b in zip(model.calls, [*model.calls[1:], out])
    ]
    # block 1: the three confident tokens together, then the last one; block 2: one at a time (best first)
    assert newly == [[3, 5, 6], [4], [10], [9], [8], [7]]


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_threshold_one_commits_one_token_per_step_like_steps_equal_gen_length(sharp, cache):
    prompts, images = _batch(sharp)
    threshold = GenerationConfig(gen_length=16, block_length=8, steps=2, cache=cache, threshold=1.0)
    one_per_step = GenerationConfig(gen_length=16, block_length=8, steps=16, cache=cache)
    assert torch.equal(
        generate_ids(sharp, prompts, images, threshold), generate_ids(sharp, prompts, images, one_per_step)
    )


def test_threshold_settings_are_checked():
    with pytest.raises(ValueError, match=r"threshold=1\.5"):
        GenerationConfig(threshold=1.5)
    with pytest.raises(ValueError, match="threshold needs remasking='low_confidence'"):
        GenerationConfig(threshold=0.9, remasking="random")
