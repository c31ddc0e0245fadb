"""The LLaVA family: registered sizes, the offline tokenizer, the chat template, llava-hf snapshots, batched
generation, and the errors of bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from datamodules.instruct_data import InstructCollator
from model_families.instruct_text import INSTRUCT_TEXT_FAMILIES, default_instruct_text
from model_families.llava import (
    LlavaChatTemplate,
    LlavaGeneration,
    LlavaInstructText,
    SnapshotError,
    build_tiny,
    check_image_tokens,
    generate_answers,
    llava_config,
    load_snapshot,
    num_image_tokens,
    save_snapshot,
)
from model_families.llava.config import CLIP_MEAN, CLIP_STD
from model_families.llava.modeling import (
    IGNORE_INDEX,
    expand_image_tokens,
    normalize_images,
    position_ids,
    response_labels,
)
from model_families.llava.tokenizer import (
    EMBEDDED_TOKENIZER_DIR,
    build_embedded_tokenizer,
    load_embedded_tokenizer,
)

ITEMS = [
    {"question": "what shape is in the image?", "answer": "circle", "key": "a"},
    {"question": "describe the image.", "answer": "a large red star on a black background.", "key": "b"},
    {
        "question": "what colour is the shape?",
        "answer": "red",
        "key": "c",
        "history": [("what shape is in the image?", "circle")],
    },
]


def _batch(text, response_length=16, seed=0):
    images = torch.rand(len(ITEMS), 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    items = [{**item, "image": images[i], "index": i} for i, item in enumerate(ITEMS)]
    return InstructCollator(text, response_length)(items)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_tiny()


# ----------------------------------------------------------------------------------------------- sizes
def test_released_llava15_7b_sizes_match_llava_hf():
    config = llava_config("llava-1.5-7b")
    vision, text = config.vision_config, config.text_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (
        336,
        14,
        1024,
        24,
    )
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size, text.intermediate_size) == (
        4096,
        32,
        32064,
        11008,
    )
    assert config.image_token_index == 32000 and config.image_seq_length == 576 == num_image_tokens(config)
    assert config.vision_feature_select_strategy == "default" and config.vision_feature_layer == -2


def test_tiny_size_is_the_tiny_lladav_scale_and_counts_its_image_tokens(tiny):
    config = tiny.model.config
    assert config.vision_config.image_size == 32 and config.text_config.hidden_size == 64
    assert config.image_seq_length == (32 // 8) ** 2 == 16  # CLIP 'default' drops the CLS feature
    siglip = build_tiny(overrides={"vision_tower": "siglip"}).model.config
    assert siglip.vision_feature_select_strategy == "full" and siglip.image_seq_length == 16
    with pytest.raises(ValueError, match="unknown LLaVA architecture 'llava-13b'"):
        llava_config("llava-13b")


def test_tiny_siglip_tower_uses_siglip_image_statistics_and_its_snapshot_keeps_them(tiny, tmp_path):
    assert (tiny.image_mean, tiny.image_std) == (CLIP_MEAN, CLIP_STD)  # the CLIP tower: LLaVA-1.5's
    siglip = build_tiny(overrides={"vision_tower": "siglip"})
    assert siglip.image_mean == (0.5, 0.5, 0.5) == siglip.image_std  # [0, 1] -> [-1, 1], as the tiny LLaDA-V
    stored = json.loads((save_snapshot(siglip, tmp_path / "snap") / "preprocessor_config.json").read_text())
    assert stored["image_mean"] == [0.5, 0.5, 0.5] == stored["image_std"]
    loaded = load_snapshot(tmp_path / "snap")
    assert (loaded.image_mean, loaded.image_std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_image_token_count_that_does_not_match_the_vision_tower_is_refused():
    config = llava_config("llava-1.5-7b")
    config.image_seq_length = 577
    with pytest.raises(
        ValueError, match=r"image_seq_length=577 image tokens, but the vision tower .* gives 576"
    ):
        check_image_tokens(config, "my.yaml")
    ids = torch.tensor([[5, 4, 4, 6], [5, 4, 6, 7]])  # row 0 holds two image tokens, the tower gives 16
    with pytest.raises(ValueError, match="row 0 of the batch holds 2 image tokens"):
        expand_image_tokens(ids, 4, 16)


# ----------------------------------------------------------------------------------------------- tokenizer
def test_embedded_tokenizer_has_llama_special_ids_and_no_unknown_world_words():
    tokenizer = load_embedded_tokenizer()
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in ("<unk>", "<s>", "</s>", "<pad>", "<image>")] == [0, 1, 2, 3, 4]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 3)
    ids = tokenizer(
        "<s>USER: <image>\nwhat shape is in the image? ASSISTANT: banana</s>", add_special_tokens=False
    )
    tokens = tokenizer.convert_ids_to_tokens(ids.input_ids)
    assert tokens == ["<s>", "user", ":", "<image>", "what", "shape", "is", "in", "the", "image", "?",
                      "assistant", ":", "banana", "</s>"]  # fmt: skip
    assert tokenizer.unk_token_id not in ids.input_ids
    # the shipped files are what the builder makes (regenerate with python -m model_families.llava.tokenizer)
    assert build_embedded_tokenizer().get_vocab() == vocab
    assert (EMBEDDED_TOKENIZER_DIR / "tokenizer.json").is_file()


# ----------------------------------------------------------------------------------------------- chat template
def test_chat_template_is_llava15s_and_is_registered_as_the_llava_instruct_text():
    template = LlavaChatTemplate()
    assert template.prompt_text("what shape?") == "<s>USER: <image>\nwhat shape? ASSISTANT:"
    assert template.prompt_text("and colour?", [("what shape?", "circle")]) == (
        "<s>USER: <image>\nwhat shape? ASSISTANT: circle</s>USER: and colour? ASSISTANT:"
    )
    assert template.response_text("a {x} star") == " a {x} star</s>"  # braces in text stay as they are
    assert INSTRUCT_TEXT_FAMILIES["llava"] == "model_families.llava.instruct_text"
    text = default_instruct_text("llava")
    assert isinstance(text, LlavaInstructText)
    assert (text.image_token_index, text.eos_id, text.eot_id, text.pad_id) == (4, 2, 2, 3)


def test_chat_template_without_an_image_slot_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"holds 0 image slots '<image>'; it needs exactly one"):
        LlavaChatTemplate(prompt="USER: {question} ASSISTANT:")
    (tmp_path / "prompt_format.json").write_text(json.dumps({"prompt": "USER: {question} ASSISTANT:"}))
    with pytest.raises(ValueError, match=r"prompt_format\.json: chat template prompt .* holds 0 image slots"):
        LlavaChatTemplate.load(tmp_path)
    with pytest.raises(ValueError, match=r"response ' ok' lacks the {answer} slot"):
        LlavaChatTemplate(response=" ok")


def test_tokenizer_without_a_pad_token_is_refused_for_batched_generation():
    tokenizer = build_embedded_tokenizer()
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="my-tokenizer has no pad_token: batched generation left-pads"):
        LlavaInstructText.from_tokenizer(tokenizer, LlavaChatTemplate(), "my-tokenizer")


def test_collated_batch_has_one_image_slot_and_response_only_labels():
    text = default_instruct_text("llava")
    batch = _batch(text)
    assert ((batch["prompt_ids"] == 4).sum(dim=1) == 1).all()
    ids, mask, response = expand_image_tokens(
        batch["input_ids"], 4, 16, batch["attention_mask"], batch["response_mask"]
    )
    assert ids.shape[1] == batch["input_ids"].shape[1] + 15 and ((ids == 4).sum(dim=1) == 16).all()
    labels = response_labels(ids, response, batch["response_tokens"])
    tokenizer = load_embedded_tokenizer()
    kept = [tokenizer.decode([t for t in row if t != IGNORE_INDEX]) for row in labels.tolist()]
    assert kept == ["circle </s>", "a large red star on a black background. </s>", "red </s>"]
    positions = position_ids(mask)
    assert positions[0, -1] == mask[0].sum() - 1 and positions[0, 0] == 0


def test_images_must_match_the_vision_tower_size():
    with pytest.raises(ValueError, match=r"set data.image_size=32"):
        normalize_images(torch.rand(2, 3, 64, 64), (0.5,) * 3, (0.5,) * 3, 32, torch.float32)


# ----------------------------------------------------------------------------------------------- snapshots
def _logits(model, batch):
    ids, mask = expand_image_tokens(batch["input_ids"], 4, 16, batch["attention_mask"])
    pixels = normalize_images(batch["pixel_values"], (0.5,) * 3, (0.5,) * 3, 32, torch.float32)
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits


def test_llava_hf_snapshot_round_trip_gives_identical_logits(tiny, tmp_path):
    path = save_snapshot(tiny, tmp_path / "snap", meta={"family": "llava"})
    names = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "prompt_format.json",
    } <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    assert json.loads((path / "config.json").read_text())["model_type"] == "llava"
    loaded = load_snapshot(path)
    batch = _batch(default_instruct_text("llava"))
    assert torch.equal(_logits(tiny.model, batch), _logits(loaded.model, batch))
    assert loaded.template == tiny.template and loaded.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_snapshot(tiny, path)


def test_snapshot_with_a_missing_folder_or_component_is_refused(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"LLaVA snapshot folder not found: .*nowhere"):
        load_snapshot(tmp_path / "nowhere")
    path = save_snapshot(tiny, tmp_path / "snap")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(SnapshotError, match=r"no \*\.safetensors weights \(found \['pytorch_model.bin'\]"):
        load_snapshot(path)
    path = save_snapshot(tiny, tmp_path / "snap2")
    (path / "tokenizer.json").unlink()
    (path / "tokenizer_config.json").unlink()
    with pytest.raises(SnapshotError, match="tokenizer component missing"):
        load_snapshot(path)
    path = save_snapshot(tiny, tmp_path / "snap3")
    (path / "preprocessor_config.json").unlink()
    with pytest.raises(SnapshotError, match=r"preprocessor_config.json missing"):
        load_snapshot(path)
    path = save_snapshot(tiny, tmp_path / "snap4")
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3  # weights for 2 layers
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SnapshotError, match=r"weights do not match its config.json .*missing_keys"):
        load_snapshot(path)


def test_snapshot_refuses_non_finite_weights(tmp_path):
    broken = build_tiny()
    with torch.no_grad():
        broken.model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"refusing non-finite weights.*lm_head.weight"):
        save_snapshot(broken, tmp_path / "snap")
    assert not (tmp_path / "snap").exists()


# ----------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_batched_left_padded_generation_equals_one_sample_at_a_time(tiny, mode):
    text = default_instruct_text("llava")
    batch = _batch(text)
    pixels = normalize_images(batch["pixel_values"], (0.5,) * 3, (0.5,) * 3, 32, torch.float32)
    settings = LlavaGeneration(mode=mode, max_new_tokens=6, num_beams=3)
    args = (settings, 4, 16, text.eos_id, text.pad_id)
    model = tiny.model.eval()
    batched = generate_answers(
        model, tiny.tokenizer, batch["prompt_ids"], batch["prompt_mask"], pixels, *args
    )
    single = []
    for row in range(len(ITEMS)):
        width = int(batch["prompt_mask"][row].sum())
        ids, mask = batch["prompt_ids"][row : row + 1, -width:], batch["prompt_mask"][row : row + 1, -width:]
        single += generate_answers(model, tiny.tokenizer, ids, mask, pixels[row : row + 1], *args)
    assert batched == single and len(batched) == 3 and all(isinstance(a, str) for a in batched)


def test_sampling_is_reproducible_from_its_seed_and_varies_with_it(tiny):
    text = default_instruct_text("llava")
    batch = _batch(text)
    pixels = normalize_images(batch["pixel_values"], (0.5,) * 3, (0.5,) * 3, 32, torch.float32)

    def sample(seed):
        settings = LlavaGeneration(mode="sample", max_new_tokens=8, temperature=2.0, seed=seed)
        return generate_answers(tiny.model.eval(), tiny.tokenizer, batch["prompt_ids"], batch["prompt_mask"],
                                pixels, settings, 4, 16, text.eos_id, text.pad_id)  # fmt: skip

    state = torch.random.get_rng_state()
    assert sample(0) == sample(0) != sample(1)
    assert torch.equal(state, torch.random.get_rng_state())  # the training RNG did not move
    with pytest.raises(ValueError, match=r"model.generation.mode='nucleus'"):
        LlavaGeneration(mode="nucleus")
    with pytest.raises(ValueError, match=r"unknown keys \['beams'\]"):
        LlavaGeneration.from_dict({"beams": 3})
    right_padded = torch.flip(batch["prompt_mask"], dims=[1])
    with pytest.raises(ValueError, match="prompts must be left-padded"):
        generate_answers(tiny.model, tiny.tokenizer, batch["prompt_ids"], right_padded, pixels,
                         LlavaGeneration(), 4, 16, text.eos_id, text.pad_id)  # fmt: skip
