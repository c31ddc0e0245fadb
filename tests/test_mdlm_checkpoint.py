"""Snapshots of the LLaDA-V family in the released safetensors layout."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model_families.mdlm.checkpoint import (
    INDEX_NAME,
    SnapshotError,
    load_prompt_formatter,
    load_released_state_dict,
    load_snapshot,
    released_state_dict,
    save_snapshot,
)
from model_families.mdlm.config import LladaVConfig
from model_families.mdlm.modeling import LladaVModel
from model_families.mdlm.prompt import PromptFormatter
from model_families.mdlm.tokenizer import load_embedded_tokenizer, load_tokenizer

RELEASED_NAME = re.compile(
    r"^(lm_head\.weight|model\.embed_tokens\.weight|model\.norm\.weight|model\.image_newline"
    r"|model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|input_layernorm|post_attention_layernorm)\.weight"
    r"|model\.mm_projector\.[02]\.(weight|bias)"
    r"|model\.vision_tower\.vision_tower\.vision_model\.(embeddings|encoder\.layers\.\d+|post_layernorm)\..+)$"
)
LLAMA_TO_OLMO = {
    "self_attn.q_proj": "q_proj",
    "self_attn.k_proj": "k_proj",
    "self_attn.v_proj": "v_proj",
    "self_attn.o_proj": "attn_out",
    "mlp.gate_proj": "ff_proj",
    "mlp.up_proj": "up_proj",
    "mlp.down_proj": "ff_out",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ff_norm",
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LladaVModel(LladaVConfig.tiny(use_image_newline=True)).eval()


@pytest.fixture
def snapshot(tmp_path, model):
    return save_snapshot(model, tmp_path / "snap", max_shard_size="100KB")


def _assert_same(a: LladaVModel, b: LladaVModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _to_olmo(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "model.transformer.wte.weight"
    if name == "model.norm.weight":
        return "model.transformer.ln_f.weight"
    if name == "lm_head.weight":
        return "model.transformer.ff_out.weight"
    match = re.match(r"model\.layers\.(\d+)\.(.+)\.weight$", name)
    if match:
        return f"model.transformer.blocks.{match.group(1)}.{LLAMA_TO_OLMO[match.group(2)]}.weight"
    return name


def test_round_trip_in_released_layout(tmp_path, model):
    tokenizer = load_embedded_tokenizer()
    formatter = PromptFormatter(system_prompt="answer briefly")
    path = save_snapshot(
        model, tmp_path / "snap", max_shard_size="100KB", tokenizer=tokenizer, prompt_formatter=formatter
    )
    index = json.loads((path / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all(RELEASED_NAME.match(name) for name in index["weight_map"]), index["weight_map"]
    stored = set()
    for shard in shards:
        with safe_open(str(path / shard), framework="pt") as handle:
            stored |= set(handle.keys())
    assert stored == set(index["weight_map"]) == set(released_state_dict(model))
    assert [p.name for p in tmp_path.iterdir()] == ["snap"]  # no temporary directory left behind

    loaded = load_snapshot(path)
    _assert_same(model, loaded)
    assert loaded.config == model.config
    assert load_prompt_formatter(path) == formatter
    assert load_tokenizer(path).get_vocab() == tokenizer.get_vocab()
    ids = torch.tensor([[model.config.image_token_index, 30, 31, 7]])
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(ids, pixel_values=images).logits, loaded(ids, pixel_values=images).logits)

    with pytest.raises(FileExistsError, match="snap"):
        save_snapshot(model, path)
    half = load_snapshot(path, dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16


def test_olmo_named_language_model_loads(tmp_path, model):
    state = {_to_olmo(name): tensor.contiguous() for name, tensor in released_state_dict(model).items()}
    assert "model.transformer.blocks.1.ff_proj.weight" in state and "model.transformer.ff_out.weight" in state
    path = tmp_path / "olmo"
    path.mkdir()
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(model.config.to_json_dict()))
    _assert_same(model, load_snapshot(path))

    fresh = LladaVModel(model.config)
    lm_only = {k: v for k, v in state.items() if k.startswith(("model.transformer.",))}
    load_released_state_dict(fresh, lm_only, only_language_model=True)
    assert torch.equal(
        fresh.language_model.layers[1].mlp.gate_proj.weight,
        model.language_model.layers[1].mlp.gate_proj.weight,
    )
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    with pytest.raises(SnapshotError, match=re.escape("model.mm_projector.0.weight")):
        load_released_state_dict(fresh, state, only_language_model=True)


def test_missing_shard_and_config_raise_with_names(snapshot):
    shard = sorted(snapshot.glob("model-*-of-*.safetensors"))[1]  # the count depends on the vocabulary size
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(shard.name)):
        load_snapshot(snapshot)
    (snapshot / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape("config.json")):
        load_snapshot(snapshot)


def test_unexpected_missing_and_misshaped_keys_raise_with_names(snapshot):
    index_path = snapshot / INDEX_NAME
    index = json.loads(index_path.read_text())
    extra_file = "model-extra.safetensors"
    save_file(
        {"model.vision_tower.vision_tower.vision_model.head.probe": torch.zeros(1, 1, 32)},
        str(snapshot / extra_file),
    )
    index["weight_map"]["model.vision_tower.vision_tower.vision_model.head.probe"] = extra_file
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        SnapshotError, match=r"1 unexpected: model\.vision_tower\.vision_tower\.vision_model\.head\.probe"
    ):
        load_snapshot(snapshot)

    del index["weight_map"]["model.vision_tower.vision_tower.vision_model.head.probe"]
    (snapshot / extra_file).unlink()
    dropped, reshaped = "model.layers.1.mlp.up_proj.weight", "model.norm.weight"
    for name, replace in ((dropped, None), (reshaped, torch.zeros(3))):
        shard = index["weight_map"][name]
        with safe_open(str(snapshot / shard), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        if replace is None:
            del tensors[name], index["weight_map"][name]
        else:
            tensors[name] = replace
        save_file(tensors, str(snapshot / shard))
    index_path.write_text(json.dumps(index))
    with pytest.raises(SnapshotError) as error:
        load_snapshot(snapshot)
    assert f"1 missing: {dropped}" in str(error.value)
    assert f"1 wrong shape: {reshaped}: (3,) != expected (64,)" in str(error.value)


def test_released_parameter_names_and_shapes():
    with torch.device("meta"), pytest.warns(UserWarning, match="anyres"):
        model = LladaVModel(LladaVConfig.released())
    names = {name: tuple(t.shape) for name, t in released_state_dict(model).items()}
    assert all(RELEASED_NAME.match(name) for name in names)
    tower = "model.vision_tower.vision_tower.vision_model."
    assert (
        f"{tower}encoder.layers.25.mlp.fc2.weight" in names
        and f"{tower}encoder.layers.26.mlp.fc2.weight" not in names
    )
    assert names[f"{tower}embeddings.position_embedding.weight"] == (729, 1152)
    assert names["model.mm_projector.0.weight"] == (4096, 1152) and names["model.image_newline"] == (4096,)
    assert names["model.layers.31.mlp.gate_proj.weight"] == (12288, 4096)
    assert names["lm_head.weight"] == (126464, 4096) and names["model.embed_tokens.weight"] == (126464, 4096)
    assert not any("rotary" in name or "head.probe" in name for name in names)
