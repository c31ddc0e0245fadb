"""Tests of the LLaDA-V family: config, tokenizer, prompt, diffusion loss, sampler and the bidirectional model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import SiglipVisionConfig, SiglipVisionModel

from model_families.mdlm.config import LladaVConfig
from model_families.mdlm.diffusion import (
    add_gumbel_noise,
    forward_mask,
    generate,
    masked_diffusion_loss,
    masked_diffusion_loss_from_logits,
    num_transfer_tokens,
)
from model_families.mdlm.inference import GenerationConfig, generate_ids, suppressed_token_ids
from model_families.mdlm.modeling import LladaVModel
from model_families.mdlm.prompt import (
    PromptFormatter,
    build_sft_example,
    decode_response,
    tokenize_with_image,
)
from model_families.mdlm.tokenizer import (
    DEFAULT_WORDS,
    SPECIAL_TOKENS,
    build_embedded_tokenizer,
    load_embedded_tokenizer,
    load_tokenizer,
    special_token_ids,
)

MASK = 7  # <|mdm_mask|> in the embedded tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_embedded_tokenizer()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    torch.manual_seed(0)
    config = LladaVConfig.tiny(tokenizer)
    return LladaVModel(config).eval()


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_special_ids_and_round_trip(tmp_path, tokenizer):
    ids = special_token_ids(tokenizer)
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert ids["mask"] == MASK and tokenizer.mask_token_id == MASK
    assert ids["eos"] == tokenizer.eos_token_id and ids["pad"] == tokenizer.pad_token_id

    built = build_embedded_tokenizer(DEFAULT_WORDS)
    assert built.get_vocab() == tokenizer.get_vocab(), "shipped embedded_tokenizer/ is stale: regenerate it"
    built.save_pretrained(str(tmp_path))
    reloaded = load_tokenizer(tmp_path)
    text = "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat colour is the Circle?<|eot_id|><|mdm_mask|>"
    encoded = built(text, add_special_tokens=False)["input_ids"]
    assert reloaded(text, add_special_tokens=False)["input_ids"] == encoded
    assert built.convert_ids_to_tokens(encoded)[:6] == [
        "<|start_header_id|>",
        "user",
        "<|end_header_id|>",
        "<image>",
        "what",
        "colour",
    ]
    assert encoded[-1] == MASK
    assert reloaded.decode(encoded[4:10]) == "what colour is the circle?"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- prompt
def test_prompt_formatter_round_trip_and_template():
    formatter = PromptFormatter(system_prompt="be brief")
    assert PromptFormatter.from_dict(formatter.to_dict()) == formatter
    assert PromptFormatter().format_prompt("what?") == (
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nwhat?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert formatter.format_prompt("q", with_image=False).startswith(
        "<|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|><|start_header_id|>user"
    )
    with pytest.raises(KeyError, match="bogus"):
        PromptFormatter.from_dict({"bogus": 1})


def test_build_sft_example(tokenizer):
    ids = special_token_ids(tokenizer)
    example = build_sft_example(tokenizer, "what shape is it?", "a red circle", max_len=32)
    tokens = example.input_ids.tolist()
    assert len(tokens) == 32 and tokens.count(ids["image"]) == 1
    prompt_len = example.prompt_length
    assert tokens[prompt_len - 3 : prompt_len] == [
        ids["start_header"],
        tokenizer.convert_tokens_to_ids("assistant"),
        ids["end_header"],
    ]
    assert tokenizer.decode(tokens[prompt_len : prompt_len + 3]) == "a red circle"
    assert tokens[prompt_len + 3] == ids["eot"] and set(tokens[prompt_len + 4 :]) == {ids["eos"]}
    assert not example.response_mask[:prompt_len].any() and example.response_mask[prompt_len:].all()
    assert decode_response(tokenizer, tokens[prompt_len:], [ids["eot"], ids["eos"]]) == "a red circle"
    with pytest.raises(ValueError, match="max_len=8"):
        build_sft_example(tokenizer, "what shape is it?", "a red circle", max_len=8)
    assert tokenize_with_image(tokenizer, "<image>\nred", image_token_index=-200) == [
        -200,
        tokenizer.convert_tokens_to_ids("red"),
    ]


# ---------------------------------------------------------------------------------------------- loss
def _direct_loss(logits, targets, masked, p, response_mask):
    batch, length = targets.shape
    total = 0.0
    for b in range(batch):
        response_len = int(response_mask[b].sum())
        for i in range(length):
            if masked[b, i]:
                ce = -torch.log_softmax(logits[b, i].double(), dim=-1)[targets[b, i]]
                total += float(ce) / (float(p[b]) * response_len)
    return total / batch


def test_loss_matches_direct_formula_on_fixed_masks():
    gen = torch.Generator().manual_seed(1)
    batch, length, vocab = 3, 9, 11
    logits = torch.randn(batch, length, vocab, generator=gen)
    targets = torch.randint(0, vocab, (batch, length), generator=gen)
    response_mask = torch.zeros(batch, length, dtype=torch.bool)
    response_mask[0, 4:] = True
    response_mask[1, 2:] = True
    response_mask[2, 7:] = True
    masked = response_mask & (torch.rand(batch, length, generator=gen) < 0.5)
    masked[2] = False  # a sequence with nothing masked contributes 0 but still counts in 1/B
    p = torch.tensor([0.3, 0.7, 0.05])
    loss = masked_diffusion_loss_from_logits(logits, targets, masked, p, response_mask)
    assert loss.item() == pytest.approx(_direct_loss(logits, targets, masked, p, response_mask), rel=1e-5)


def test_forward_mask_and_loss_with_model_function():
    input_ids = torch.randint(10, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    response_mask = torch.zeros(4, 16, dtype=torch.bool)
    response_mask[:, 6:] = True
    noise = forward_mask(input_ids, response_mask, MASK, generator=torch.Generator().manual_seed(3), eps=1e-3)
    assert not noise.masked[:, :6].any() and (noise.noisy_ids[:, :6] == input_ids[:, :6]).all()
    assert (noise.noisy_ids[noise.masked] == MASK).all()
    assert (noise.noisy_ids[~noise.masked] == input_ids[~noise.masked]).all()
    assert ((noise.p >= 1e-3) & (noise.p <= 1.0)).all()

    table = torch.randn(60, 13, generator=torch.Generator().manual_seed(5))

    def logits_fn(ids):
        return F.pad(table[ids], (0, 47))

    loss = masked_diffusion_loss(
        logits_fn, input_ids, response_mask, MASK, generator=torch.Generator().manual_seed(3)
    )
    expected = _direct_loss(logits_fn(noise.noisy_ids), input_ids, noise.masked, noise.p, response_mask)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------- sampler
def test_num_transfer_tokens_remainder_first():
    counts = num_transfer_tokens(torch.ones(2, 10, dtype=torch.bool), steps=4)
    assert counts.tolist() == [[3, 3, 2, 2], [3, 3, 2, 2]]


class ScriptedModel:
    """Predicts token 100 + position with confidence score[position]; records the input at every call."""

    def __init__(self, scores: torch.Tensor, vocab: int = 200):
        self.scores, self.vocab, self.calls = scores, vocab, []

    def __call__(self, x, **kwargs):
        self.calls.append((x.clone(), kwargs))
        batch, length = x.shape
        logits = torch.zeros(batch, length, self.vocab)
        logits[:, torch.arange(length), 100 + torch.arange(length)] = self.scores[:length]
        return logits


def test_generate_commits_per_block_schedule():
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    # Confidence grows along the sequence, so the later (out-of-block) positions would win without the -inf rule.
    scores = torch.linspace(1.0, 5.0, 3 + 8)
    model = ScriptedModel(scores)
    out = generate(model, prompt, mask_id=MASK, gen_length=8, block_length=4, steps=6)
    assert (out[:, :3] == prompt).all()
    assert out[:, 3:].tolist() == [list(range(103, 111))] * 2
    states = [x for x, _ in model.calls] + [out]
    committed = [(states[s] == MASK).sum(1) - (states[s + 1] == MASK).sum(1) for s in range(6)]
    assert [c.tolist() for c in committed] == [[2, 2], [1, 1], [1, 1], [2, 2], [1, 1], [1, 1]]
    newly = [
        ((states[s] == MASK) & (states[s + 1] != MASK))[0].nonzero().flatten().tolist() for s in range(6)
    ]
    # Within a block the most confident (latest) positions go first; block 2 waits for block 1.
    assert newly == [[5, 6], [4], [3], [9, 10], [8], [7]]


def test_generate_uneven_steps_and_validation():
    model = ScriptedModel(torch.zeros(20))
    out = generate(model, torch.tensor([[1]]), mask_id=MASK, gen_length=5, block_length=5, steps=3)
    states = [x for x, _ in model.calls] + [out]
    assert [int((states[s] == MASK).sum() - (states[s + 1] == MASK).sum()) for s in range(3)] == [2, 2, 1]
    with pytest.raises(ValueError, match="not divisible by block_length"):
        generate(model, torch.tensor([[1]]), mask_id=MASK, gen_length=6, block_length=4, steps=4)
    with pytest.raises(ValueError, match="not divisible by the number of blocks"):
        generate(model, torch.tensor([[1]]), mask_id=MASK, gen_length=8, block_length=4, steps=3)
    with pytest.raises(ValueError, match="remasking"):
        generate(
            model, torch.tensor([[1]]), mask_id=MASK, gen_length=4, block_length=4, steps=4, remasking="top"
        )


def test_generate_cfg_and_passthrough_kwargs():
    vocab = 50

    def model_fn(x, marker=None):
        assert marker == "vision-override"
        logits = torch.zeros(*x.shape, vocab)
        conditional = (x[:, :2] != MASK).all(dim=1)
        # c = (1, 2) and u = (0, 3) for tokens (10, 20): c alone picks 20, u + 2 (c - u) = (2, 1) picks 10.
        logits[..., 10] = torch.where(conditional, 1.0, 0.0)[:, None]
        logits[..., 20] = torch.where(conditional, 2.0, 3.0)[:, None]
        return logits

    prompt = torch.tensor([[1, 2]])
    plain = generate(
        model_fn, prompt, mask_id=MASK, gen_length=2, block_length=2, steps=2, marker="vision-override"
    )
    assert plain[0, 2:].tolist() == [20, 20]
    guided = generate(
        model_fn,
        prompt,
        mask_id=MASK,
        gen_length=2,
        block_length=2,
        steps=2,
        cfg_scale=1.0,
        marker="vision-override",
    )
    assert guided[0, 2:].tolist() == [10, 10]


def test_generate_random_sampling_is_seeded():
    table = torch.randn(200, 40, generator=torch.Generator().manual_seed(0))

    def model_fn(x):
        return table[x]

    prompt = torch.tensor([[11, 12, 13]])
    kwargs = {"mask_id": MASK, "gen_length": 8, "block_length": 4, "steps": 8, "temperature": 1.0}
    a = generate(model_fn, prompt, generator=torch.Generator().manual_seed(4), remasking="random", **kwargs)
    b = generate(model_fn, prompt, generator=torch.Generator().manual_seed(4), remasking="random", **kwargs)
    assert torch.equal(a, b) and (a != MASK).all()
    noisy = add_gumbel_noise(torch.zeros(3, 4), 1.0, torch.Generator().manual_seed(0))
    assert noisy.dtype == torch.float64


def test_batched_generation_equals_per_sample(tiny):
    gen = torch.Generator().manual_seed(2)
    prompts = torch.randint(20, 150, (3, 6), generator=gen)
    prompts[:, 0] = tiny.config.image_token_index
    images = torch.rand(3, 3, 32, 32, generator=gen)
    kwargs = {"mask_id": MASK, "gen_length": 8, "block_length": 4, "steps": 4}
    batched = generate(tiny, prompts, pixel_values=images, **kwargs)
    for row in range(3):
        single = generate(tiny, prompts[row : row + 1], pixel_values=images[row : row + 1], **kwargs)
        assert torch.equal(single, batched[row : row + 1])

    # Left padding: a padded prompt decodes like the unpadded one.
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), prompts[:1]], dim=1)
    mask = torch.ones_like(padded)
    mask[:, :2] = 0
    left = generate(tiny, padded, attention_mask=mask, pixel_values=images[:1], **kwargs)
    assert torch.equal(left[:, 2:], batched[:1])


# ---------------------------------------------------------------------------------------------- model
def test_attention_is_bidirectional(tiny):
    ids = torch.randint(20, 150, (1, 7), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = 151 if ids[0, -1] != 151 else 152
    with torch.no_grad():
        first = tiny(ids).logits[0, 0]
        second = tiny(changed).logits[0, 0]
    assert (first - second).abs().max() > 1e-4, "a later token must change an earlier position's logits"

    eager = LladaVModel(LladaVConfig.tiny(attn_implementation="eager")).eval()
    eager.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        assert torch.allclose(eager(ids).logits, tiny(ids).logits, atol=1e-5)


def test_vision_splice_positions_and_overrides(tiny):
    config = tiny.config
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(20, 150, (2, 5), generator=gen)
    ids[0, 1] = ids[1, 3] = config.image_token_index
    images = torch.rand(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        out = tiny(ids, pixel_values=images)
        full = tiny(ids, pixel_values=images, full_sequence=True)
    n = config.num_vision_tokens
    assert n == 64 and out.logits.shape == (2, 5, config.text["vocab_size"])
    assert full.logits.shape[1] == 5 - 1 + n
    assert out.vision_positions[0].tolist() == list(range(1, 1 + n))
    assert out.vision_positions[1].tolist() == list(range(3, 3 + n))
    assert out.token_positions.tolist() == [[0, 1, 65, 66, 67], [0, 1, 2, 3, 67]]
    assert torch.allclose(
        full.logits.gather(1, out.token_positions[..., None].expand_as(out.logits)), out.logits, atol=1e-6
    )

    # Override with the model's own embeddings reproduces the forward; gradients reach the override.
    vision = tiny.encode_images(images).detach().requires_grad_(True)
    overridden = tiny(ids, vision_token_override=vision)
    assert torch.allclose(overridden.logits, out.logits, atol=1e-5)
    overridden.logits[:, -1].logsumexp(-1).sum().backward()
    assert vision.grad is not None and vision.grad.abs().sum() > 0

    # Masking = overriding with the mask token's embedding.
    chosen = torch.zeros(2, n, dtype=torch.bool)
    chosen[:, ::3] = True
    with torch.no_grad():
        masked = tiny(ids, pixel_values=images, vision_token_mask=chosen).logits
        manual = vision.detach().clone()
        manual[chosen] = tiny.mask_token_embedding()
        assert torch.allclose(masked, tiny(ids, vision_token_override=manual).logits, atol=1e-5)

        # Dropping = cutting the tokens out of the sequence.
        dropped = tiny(ids[:1], pixel_values=images[:1], vision_token_drop=chosen[:1]).logits
        embedded = tiny.embed_inputs(ids[:1], pixel_values=images[:1])
        keep = torch.ones(embedded.inputs_embeds.shape[1], dtype=torch.bool)
        keep[embedded.vision_positions[0][chosen[0]]] = False
        cut = tiny(inputs_embeds=embedded.inputs_embeds[:, keep]).logits
        text_positions = [0, 2, 3, 4]
        cut_positions = [int(keep[: embedded.token_positions[0, i]].sum()) for i in text_positions]
        assert torch.allclose(dropped[0, text_positions], cut[0, cut_positions], atol=1e-5)


def test_image_newline_and_errors(tiny):
    config = LladaVConfig.tiny(use_image_newline=True)
    model = LladaVModel(config).eval()
    ids = torch.tensor([[config.image_token_index, 30, 31]])
    with torch.no_grad():
        out = model(ids, pixel_values=torch.rand(1, 3, 32, 32), full_sequence=True)
    assert out.logits.shape[1] == 2 + 64 + 8
    assert out.vision_positions[0, 7:10].tolist() == [7, 9, 10]  # position 8 is the first row's newline
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny(ids)
    with pytest.raises(ValueError, match="exactly one image placeholder"):
        tiny(torch.tensor([[30, 31]]), pixel_values=torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        tiny(ids, pixel_values=torch.rand(1, 3, 16, 16))


def test_vision_features_are_penultimate_layer(tiny):
    full = SiglipVisionModel(SiglipVisionConfig(**tiny.config.vision, vision_use_head=False)).eval()
    full_core = getattr(full, "vision_model", full)
    missing, unexpected = full_core.load_state_dict(tiny.vision_tower.vision_model.state_dict(), strict=False)
    assert not unexpected and all(".layers.1." in name for name in missing)
    pixels = tiny.normalize_images(torch.rand(2, 3, 32, 32))
    with torch.no_grad():
        hidden = full(pixel_values=pixels, output_hidden_states=True).hidden_states
        assert torch.allclose(tiny.vision_tower(pixels), hidden[-2], atol=1e-6)


def test_config_json_round_trip():
    for config in (LladaVConfig.tiny(), LladaVConfig.released()):
        assert LladaVConfig.from_json_dict(config.to_json_dict()) == config
    released = LladaVConfig.released().to_json_dict()
    assert released["mm_projector_type"] == "mlp2x_gelu" and released["mm_hidden_size"] == 1152
    assert (released["hidden_size"], released["num_hidden_layers"], released["vocab_size"]) == (
        4096,
        32,
        126464,
    )
    assert (released["rope_theta"], released["rms_norm_eps"], released["tie_word_embeddings"]) == (
        500000.0,
        1e-5,
        False,
    )
    # A released-style file without our vision_config falls back to SigLIP so400m / 384.
    del released["vision_config"]
    rebuilt = LladaVConfig.from_json_dict(released)
    assert (rebuilt.num_vision_tokens, rebuilt.vision_layers_kept) == (729, 26)
    with pytest.raises(ValueError, match="mm_projector_type"):
        LladaVConfig.tiny(mm_projector_type="linear")


def test_loss_backpropagates_through_model(tiny):
    example_ids = torch.randint(20, 150, (2, 12), generator=torch.Generator().manual_seed(0))
    example_ids[:, 0] = tiny.config.image_token_index
    response_mask = torch.zeros(2, 12, dtype=torch.bool)
    response_mask[:, 6:] = True
    images = torch.rand(2, 3, 32, 32)
    tiny.zero_grad()
    loss = masked_diffusion_loss(
        tiny,
        example_ids,
        response_mask,
        MASK,
        generator=torch.Generator().manual_seed(0),
        pixel_values=images,
    )
    loss.backward()
    assert torch.isfinite(loss) and tiny.mm_projector[0].weight.grad.abs().sum() > 0
    tiny.zero_grad()


# ----------------------------------------------------------------- generation: forbidden ids, seeded streams
def _llada_reference_generate(
    model_fn, prompt, steps, gen_length, block_length, temperature, remasking, mask_id, generator
):
    """LLaDA's ``generate.py`` algorithm written out step by step (its draws, order and dtypes: per step a
    float64 Gumbel draw of the logits' shape when temperature > 0, then a float32 (B, L) draw for
    ``random``), with ``generator`` in place of the global RNG and no suppressed ids."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt
    blocks = gen_length // block_length
    per_block = steps // blocks
    for b in range(blocks):
        lo, hi = prompt.shape[1] + b * block_length, prompt.shape[1] + (b + 1) * block_length
        count = (x[:, lo:hi] == mask_id).sum(dim=1, keepdim=True)
        schedule = torch.zeros(x.shape[0], per_block, dtype=torch.int64) + count // per_block
        for row in range(x.shape[0]):
            schedule[row, : int(count[row] % per_block)] += 1
        for i in range(per_block):
            masked = x == mask_id
            logits = model_fn(x)
            noisy = logits
            if temperature > 0:
                gumbel = torch.rand(logits.shape, generator=generator, dtype=torch.float64)
                noisy = logits.to(torch.float64).exp() / (-torch.log(gumbel)) ** temperature
            x0 = noisy.argmax(dim=-1)
            if remasking == "low_confidence":
                p = F.softmax(logits.to(torch.float64), dim=-1)
                x0_p = p.gather(-1, x0[..., None])[..., 0]
            else:
                x0_p = torch.rand((x0.shape[0], x0.shape[1]), generator=generator)
            x0_p[:, hi:] = -float("inf")
            x0 = torch.where(masked, x0, x)
            confidence = torch.where(masked, x0_p, -float("inf"))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for row in range(confidence.shape[0]):
                transfer[row, confidence[row].topk(int(schedule[row, i])).indices] = True
            x[transfer] = x0[transfer]
    return x


def _mixing_model(vocab=40, seed=0):
    """Logits that depend on the token, its position and the whole sequence; the mask id never wins."""
    gen = torch.Generator().manual_seed(seed)
    table, pos = torch.randn(200, vocab, generator=gen), torch.randn(64, vocab, generator=gen)
    table[:, MASK] = -30.0

    def model_fn(x, **kwargs):
        emb = table[x]
        return emb + pos[: x.shape[1]] + emb.mean(dim=1, keepdim=True)

    return model_fn


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_generate_equals_llada_reference_with_an_equally_seeded_generator(temperature, remasking):
    model_fn = _mixing_model()
    prompt = torch.tensor([[11, 12, 13], [21, 22, 23]])
    kwargs = {
        "steps": 6,
        "gen_length": 8,
        "block_length": 4,
        "temperature": temperature,
        "remasking": remasking,
    }
    for seed in range(3):
        ours = generate(
            model_fn, prompt, mask_id=MASK, generator=torch.Generator().manual_seed(seed), **kwargs
        )
        reference = _llada_reference_generate(
            model_fn, prompt, mask_id=MASK, generator=torch.Generator().manual_seed(seed), **kwargs
        )
        assert torch.equal(ours, reference), (seed, ours, reference)


def test_random_remasking_confidences_are_the_float32_stream():
    # Greedy x0 (no Gumbel draw), so the first step's commits are the top-k of one float32 (B, L) draw.
    model = ScriptedModel(torch.zeros(20))
    prompt = torch.tensor([[1, 2], [3, 4]])
    generate(
        model, prompt, mask_id=MASK, gen_length=6, block_length=6, steps=3, remasking="random",
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    after_first = model.calls[1][0]
    confidence = torch.rand((2, 8), generator=torch.Generator().manual_seed(5))  # float32, as LLaDA
    confidence[:, :2] = -float("inf")
    expected = torch.zeros(2, 8, dtype=torch.bool)
    expected.scatter_(1, confidence.topk(2, dim=1).indices, True)
    assert torch.equal(after_first != MASK, expected | (torch.arange(8) < 2))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_never_commits_suppressed_or_mask_ids(temperature):
    vocab = 30

    def model_fn(x, **kwargs):
        # The mask id and id 9 are the argmax everywhere; 12 is the best allowed id.
        logits = torch.zeros(*x.shape, vocab)
        logits[..., MASK], logits[..., 9], logits[..., 12] = 5.0, 4.0, 3.0
        return logits

    prompt = torch.tensor([[1, 2, 3]])
    out = generate(
        model_fn, prompt, mask_id=MASK, gen_length=8, block_length=4, steps=8, temperature=temperature,
        suppress_ids=(9, -200, 10_000), generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    response = out[0, 3:]
    assert not torch.isin(response, torch.tensor([MASK, 9])).any()
    if temperature == 0:
        assert response.tolist() == [12] * 8


def test_suppressed_ids_keep_the_ids_that_end_a_response(tokenizer):
    tiny_config = LladaVConfig.tiny(tokenizer)
    ids = special_token_ids(tokenizer)
    assert set(suppressed_token_ids(tiny_config)) == {
        ids[name] for name in ("mask", "image", "pad", "bos", "start_header", "end_header")
    }
    released = LladaVConfig.released()
    # LLaDA pads with EOS (pad id = eos id): EOS must stay allowed, or responses could never end.
    assert released.pad_token_id == released.eos_token_id
    assert not {released.eos_token_id, released.eot_token_id} & set(suppressed_token_ids(released))
    assert released.mask_token_id in suppressed_token_ids(released)


def test_sampling_never_writes_a_special_id_into_a_response(tiny, tokenizer):
    # The tiny image placeholder is an ordinary vocabulary id: written into a response, the next step found
    # two placeholders and raised. Near-uniform sampling makes every id likely.
    gen = torch.Generator().manual_seed(3)
    prompts = torch.randint(20, 150, (4, 6), generator=gen)
    prompts[:, 0] = tiny.config.image_token_index
    images = torch.rand(4, 3, 32, 32, generator=gen)
    forbidden = torch.tensor(suppressed_token_ids(tiny.config))
    ends = torch.tensor([tiny.config.eos_token_id, tiny.config.eot_token_id])
    seen_ends = False
    for remasking in ("low_confidence", "random"):
        config = GenerationConfig(
            gen_length=8, block_length=4, steps=4, temperature=20.0, remasking=remasking
        )
        for seed in range(12):
            ids = generate_ids(tiny, prompts, images, config, generator=torch.Generator().manual_seed(seed))
            assert not torch.isin(ids, forbidden).any(), (seed, ids)
            seen_ends |= bool(torch.isin(ids, ends).any())
    assert seen_ends, "EOS / eot were never sampled: they must stay allowed"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generation_takes_a_cpu_generator_and_matches_cpu():
    # Purification seeds a CPU generator whatever the model's device; the draws are made on the generator's
    # device and moved, so the CUDA run samples the CPU run's tokens.
    gen = torch.Generator().manual_seed(0)
    table, pos = torch.randn(200, 40, generator=gen), torch.randn(64, 40, generator=gen)

    def model_fn(x, **kwargs):
        return table.to(x.device)[x] + pos.to(x.device)[: x.shape[1]]

    prompt = torch.tensor([[11, 12, 13]])
    kwargs = {"mask_id": MASK, "gen_length": 8, "block_length": 4, "steps": 8, "temperature": 1.0}
    kwargs["remasking"] = "random"
    cpu = generate(model_fn, prompt, generator=torch.Generator().manual_seed(4), **kwargs)
    cuda = generate(model_fn, prompt.cuda(), generator=torch.Generator().manual_seed(4), **kwargs)
    assert torch.equal(cuda.cpu(), cpu)
