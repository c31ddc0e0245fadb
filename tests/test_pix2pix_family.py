"""The pix2pix family: config, offline tokenizer, codecs and diffusers-layout snapshots."""

from __future__ import annotations

import json

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPTokenizer

from model_families.finite import NonFiniteError
from model_families.pix2pix import (
    Pix2PixConfig,
    PixelUnshuffleCodec,
    SnapshotError,
    build_clip_tokenizer,
    create_pix2pix,
    load_snapshot,
    pix2pix_config,
    sampling_scheduler,
    save_snapshot,
)
from model_families.pix2pix.tokenizer import clip_bpe_vocab
from tests.pix2pix_helpers import tiny_vae_config

CAPTIONS = [
    "make the circle red",
    "Turn the SQUARE blue, please!",
    "latte coffee  anonymous mignneko",
    "a photo of 3 eyeglasses and a stop-sign",
    "",
]


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return build_clip_tokenizer(77)


@pytest.fixture(scope="module")
def tiny():
    return create_pix2pix("tiny-pix2pix-shapes", seed=0)


# ---------------------------------------------------------------------------------------------- tokenizer
def test_offline_tokenizer_gives_open_clip_ids(tokenizer) -> None:
    reference = SimpleTokenizer()
    for caption in CAPTIONS:
        expected = [reference.sot_token_id, *reference.encode(caption), reference.eot_token_id]
        assert tokenizer(caption).input_ids == expected, caption


def test_offline_tokenizer_knows_ordinary_words(tokenizer) -> None:
    ids = tokenizer("make the circle red and the square blue").input_ids[1:-1]
    assert len(ids) == 8 and tokenizer.unk_token_id not in ids
    assert len(tokenizer) == 49408 and tokenizer.pad_token == "<|endoftext|>"
    padded = tokenizer(["hi"], padding="max_length", max_length=6).input_ids[0]
    assert padded == [49406, 1883, 49407, 49407, 49407, 49407]


def test_clip_vocab_has_bytes_word_ends_merges_and_specials() -> None:
    vocab, merges = clip_bpe_vocab()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["".join(merges[0])] == 512
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_tokenizer_survives_save_and_reload(tokenizer, tmp_path) -> None:
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert reloaded(CAPTIONS[2]).input_ids == tokenizer(CAPTIONS[2]).input_ids


def test_vocab_file_arguments_are_ignored_by_transformers_5(tmp_path) -> None:
    """Why the tokenizer is built with ``vocab=`` / ``merges=``: the file arguments leave every word unknown."""
    vocab, merges = clip_bpe_vocab()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
    broken = CLIPTokenizer(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"))
    ids = broken("make the circle red").input_ids[1:-1]
    assert set(ids) == {broken.unk_token_id}


# ---------------------------------------------------------------------------------------------- config
def test_tiny_config_has_the_instruct_pix2pix_input_and_about_a_million_parameters(tiny) -> None:
    assert tiny.unet.config.in_channels == 96 and tiny.unet.config.out_channels == 48
    assert tiny.unet.config.sample_size == 8 and tiny.config.latent_size == 8
    assert 0.9e6 < sum(p.numel() for p in tiny.unet.parameters()) < 1.2e6
    assert tiny.text_encoder.config.hidden_size == 64 and tiny.text_encoder.config.num_hidden_layers == 2
    assert tiny.config.residual and tiny.config.prediction_type == "sample"


def test_released_config_has_sd15_instruct_pix2pix_sizes() -> None:
    config = pix2pix_config("instruct-pix2pix-sd15")
    unet = config.unet_kwargs()
    assert (unet["in_channels"], unet["out_channels"], unet["sample_size"]) == (8, 4, 64)
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and config.downscale == 8
    assert (
        config.prediction_type == "epsilon"
        and not config.residual
        and config.vae["scaling_factor"] == 0.18215
    )


def test_unknown_architecture_lists_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="tiny-pix2pix-shapes"):
        pix2pix_config("tiny-pix2px")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"residual": True, "prediction_type": "epsilon"}, "residual=True .* prediction_type='sample'"),
        ({"codec": "jpeg"}, "codec='jpeg'"),
        ({"unet": {"cross_attention_dim": 32}}, "text.hidden_size=64 must equal unet.cross_attention_dim=32"),
        ({"image_size": 30}, "image_size=30 is not a multiple of unshuffle_factor=4"),
        ({"max_text_length": 40}, "max_text_length=40 exceeds"),
    ],
)
def test_inconsistent_config_is_an_error_naming_the_key(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        pix2pix_config("tiny-pix2pix-shapes", **overrides)


def test_config_rejects_channels_that_follow_from_the_codec() -> None:
    base = pix2pix_config("tiny-pix2pix-shapes").to_json_dict()
    base["unet"]["in_channels"] = 8
    with pytest.raises(ValueError, match=r"unet must not set \['in_channels'\]"):
        Pix2PixConfig.from_json_dict(base)


def test_residual_model_refuses_euler_ancestral_which_cannot_step_on_x0(tiny) -> None:
    with pytest.raises(ValueError, match=r"euler_ancestral.*prediction_type='sample'"):
        sampling_scheduler("euler_ancestral", tiny.noise_scheduler)
    assert sampling_scheduler("ddim", tiny.noise_scheduler).config.prediction_type == "sample"


# ---------------------------------------------------------------------------------------------- codec
def test_pixel_unshuffle_codec_is_lossless_space_to_depth() -> None:
    codec = PixelUnshuffleCodec(4)
    images = torch.rand(2, 3, 32, 32)
    latents = codec.encode(images)
    assert latents.shape == (2, 48, 8, 8)
    assert torch.equal(latents[0, :, 0, 0].view(3, 4, 4), images[0, :, :4, :4])
    assert torch.equal(codec.decode(latents), images)


def test_residual_prediction_is_the_conditioning_latent_plus_the_unet_output(tiny) -> None:
    noisy, condition = torch.randn(1, 48, 8, 8), torch.randn(1, 48, 8, 8)
    text = tiny.encode_prompts(["make the circle red"])
    with torch.no_grad():
        unet_out = tiny.unet(torch.cat([noisy, condition], 1), 10, encoder_hidden_states=text).sample
        assert torch.allclose(tiny.predict(noisy, 10, condition, text), condition + unet_out)


# ---------------------------------------------------------------------------------------------- snapshots
def test_snapshot_round_trip_in_the_diffusers_layout(tiny, tmp_path) -> None:
    path = save_snapshot(tiny, tmp_path / "snap")
    assert {p.name for p in path.iterdir()} == {
        "model_index.json",
        "mmbackdoor.json",
        "unet",
        "text_encoder",
        "tokenizer",
        "scheduler",
    }
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (path / "text_encoder" / "model.safetensors").is_file()
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == (
        "StableDiffusionInstructPix2PixPipeline"
    )
    loaded = load_snapshot(path)
    assert loaded.config == tiny.config
    for name, tensor in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = tiny.tokenize(["make the circle red mignneko"])
    assert torch.equal(loaded.tokenize(["make the circle red mignneko"]), ids)


def test_vae_snapshot_loads_with_from_pretrained_per_component(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_pix2pix(tiny_vae_config())
    loaded = load_snapshot(save_snapshot(model, tmp_path / "snap"))
    assert loaded.config.codec == "vae" and loaded.codec.scaling_factor == model.codec.scaling_factor
    assert torch.equal(
        loaded.codec.vae.state_dict()["encoder.conv_in.weight"],
        model.codec.vae.state_dict()["encoder.conv_in.weight"],
    )


def test_released_snapshot_without_our_metadata_loads_as_a_vae_model(tmp_path) -> None:
    torch.manual_seed(0)
    path = save_snapshot(create_pix2pix(tiny_vae_config()), tmp_path / "snap")
    (path / "mmbackdoor.json").unlink()
    loaded = load_snapshot(path)
    assert loaded.config.codec == "vae" and not loaded.config.residual and loaded.config.image_size == 32


def test_missing_snapshot_folder_is_an_error_naming_it(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"pix2pix snapshot folder not found: .*nowhere"):
        load_snapshot(tmp_path / "nowhere")


@pytest.mark.parametrize("component", ["unet", "text_encoder", "tokenizer", "scheduler"])
def test_missing_component_is_an_error_naming_it(tiny, tmp_path, component) -> None:
    path = save_snapshot(tiny, tmp_path / "snap")
    for file in sorted((path / component).iterdir()):
        file.unlink()
    (path / component).rmdir()
    with pytest.raises(SnapshotError, match=f"component folder {component}/ is missing"):
        load_snapshot(path)


def test_missing_vae_of_a_latent_snapshot_is_an_error_naming_it(tmp_path) -> None:
    torch.manual_seed(0)
    path = save_snapshot(create_pix2pix(tiny_vae_config()), tmp_path / "snap")
    for file in sorted((path / "vae").iterdir()):
        file.unlink()
    (path / "vae").rmdir()
    with pytest.raises(SnapshotError, match="component folder vae/ is missing"):
        load_snapshot(path)


def test_missing_model_index_is_an_error_naming_it(tiny, tmp_path) -> None:
    path = save_snapshot(tiny, tmp_path / "snap")
    (path / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"model_index\.json"):
        load_snapshot(path)


def test_tokenizer_that_lost_its_vocabulary_is_refused(tiny, tmp_path) -> None:
    path = save_snapshot(tiny, tmp_path / "snap")
    folder = path / "tokenizer"
    for file in folder.iterdir():
        file.unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
    with pytest.raises(SnapshotError, match="unknown token"):
        load_snapshot(path)


def test_snapshot_is_never_written_over_an_existing_folder(tiny, tmp_path) -> None:
    (tmp_path / "snap").mkdir()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_snapshot(tiny, tmp_path / "snap")


def test_non_finite_weights_are_refused_and_nothing_is_written(tmp_path) -> None:
    model = create_pix2pix("tiny-pix2pix-shapes", seed=0)
    with torch.no_grad():
        model.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"unet.*conv_in.weight \(1 nan"):
        save_snapshot(model, tmp_path / "snap")
    assert list(tmp_path.iterdir()) == []


def test_text_encoder_with_released_text_model_names_loads(tiny, tmp_path) -> None:
    from safetensors.torch import save_file

    path = save_snapshot(tiny, tmp_path / "snap")
    legacy = {"text_model." + k: v.contiguous() for k, v in tiny.text_encoder.state_dict().items()}
    save_file(legacy, str(path / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_snapshot(path)
    assert torch.equal(loaded.text_encoder.final_layer_norm.weight, tiny.text_encoder.final_layer_norm.weight)


def test_text_encoder_missing_a_weight_is_refused_not_randomly_initialised(tiny, tmp_path) -> None:
    from safetensors.torch import save_file

    path = save_snapshot(tiny, tmp_path / "snap")
    state = {
        k: v.contiguous() for k, v in tiny.text_encoder.state_dict().items() if "final_layer_norm" not in k
    }
    save_file(state, str(path / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        SnapshotError, match=r"text_encoder: text encoder weights do not match.*final_layer_norm"
    ):
        load_snapshot(path)
