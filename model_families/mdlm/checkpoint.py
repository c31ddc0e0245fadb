"""Snapshots in the released LLaDA-V safetensors layout.

A snapshot directory holds ``config.json`` (:meth:`LladaVConfig.to_json_dict`), sharded weights
``model-0000X-of-0000N.safetensors`` with ``model.safetensors.index.json`` (a single ``model.safetensors`` is also
read), and optionally the tokenizer files and ``prompt_format.json`` (:class:`PromptFormatter`).

Parameter names (released LLaDA-V, LLaVA-NeXT style) and their modules here::

    model.embed_tokens / model.layers.N.* / model.norm    <-> language_model.*   (LLaMA names)
    lm_head.weight                                        <-> lm_head.weight
    model.vision_tower.vision_tower.vision_model.*        <-> vision_tower.vision_model.*
    model.mm_projector.{0,2}.{weight,bias}                <-> mm_projector.{0,2}.*
    model.image_newline                                   <-> image_newline

The original LLaDA checkpoint's OLMo-style LM names (``model.transformer.wte``, ``blocks.N.{q,k,v}_proj``,
``attn_out``, ``ff_proj`` (SwiGLU gate), ``up_proj``, ``ff_out`` (down), ``attn_norm``, ``ff_norm``, ``ln_f``,
``model.transformer.ff_out`` (head)) are renamed on load; LLaDA's rotary embedding uses the same half-split
rotation as transformers' LLaMA, so no q/k permutation is needed.

Only safetensors and JSON are read (never a pickle); a truncated or garbage weight file, an invalid
index or config, and weights that do not fit the recorded architecture are errors naming the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from attacks.io import set_default_mode
from model_families.finite import assert_finite_state
from model_families.loading import read_json_file
from model_families.mdlm.config import LladaVConfig
from model_families.mdlm.modeling import LladaVModel
from model_families.mdlm.prompt import PromptFormatter

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_WEIGHTS_NAME = "model.safetensors"
PROMPT_FORMAT_NAME = "prompt_format.json"
# Keys some LLaMA-era checkpoints store that carry no learned state.
DEFAULT_IGNORED = (r".*rotary_emb\.inv_freq$",)

_OLMO_BLOCK = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ff_norm": "post_attention_layernorm",
}
_OLMO_TOP = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}
_OLMO_BLOCK_RE = re.compile(r"^model\.transformer\.blocks\.(\d+)\.(\w+)\.(weight|bias)$")


class SnapshotError(ValueError):
    """Snapshot weights do not match the model: lists missing, unexpected and mis-shaped parameters."""


# ---------------------------------------------------------------------------------------------- names
def to_released_name(name: str) -> str:
    """Module parameter name -> released LLaDA-V name."""
    if name.startswith("language_model."):
        return "model." + name[len("language_model.") :]
    if name.startswith(("vision_tower.", "mm_projector.")) or name == "image_newline":
        prefix = "model.vision_tower." if name.startswith("vision_tower.") else "model."
        return prefix + name
    if name.startswith("lm_head."):
        return name
    raise KeyError(f"no released name for parameter {name!r}")


def from_released_name(name: str) -> str | None:
    """Released LLaDA-V (or OLMo-style LLaDA) name -> module parameter name; None when unknown."""
    name = olmo_to_llama_name(name)
    if name.startswith("model.vision_tower.vision_tower."):
        return name[len("model.vision_tower.") :]
    if name.startswith(("model.mm_projector.",)) or name == "model.image_newline":
        return name[len("model.") :]
    if name.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
        return "language_model." + name[len("model.") :]
    if name.startswith("lm_head."):
        return name
    return None


def olmo_to_llama_name(name: str) -> str:
    """Rename an OLMo-style LLaDA parameter to its LLaMA name; other names are returned unchanged."""
    if name in _OLMO_TOP:
        return _OLMO_TOP[name]
    match = _OLMO_BLOCK_RE.match(name)
    if match and match.group(2) in _OLMO_BLOCK:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_OLMO_BLOCK[part]}.{kind}"
    return name


def released_state_dict(model: LladaVModel) -> dict[str, torch.Tensor]:
    """The model's parameters under released LLaDA-V names."""
    return {to_released_name(name): tensor for name, tensor in model.state_dict().items()}


def _map_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size],
    ignored: Iterable[str] = DEFAULT_IGNORED,
) -> dict[str, torch.Tensor]:
    """Rename to module names and check names and shapes against ``expected``; raise listing every problem."""
    patterns = [re.compile(p) for p in ignored]
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for name, tensor in state_dict.items():
        if any(p.match(name) for p in patterns):
            continue
        target = from_released_name(name)
        if target is None or target not in expected:
            unexpected.append(name)
        elif target in mapped:
            unexpected.append(f"{name} (duplicate of {target})")
        else:
            mapped[target] = tensor
    missing = [to_released_name(n) for n in expected if n not in mapped]
    shapes = [
        f"{to_released_name(n)}: {tuple(t.shape)} != expected {tuple(expected[n])}"
        for n, t in mapped.items()
        if t.shape != expected[n]
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if names:
                shown = ", ".join(names[:40]) + (f", ... ({len(names) - 40} more)" if len(names) > 40 else "")
                parts.append(f"{len(names)} {label}: {shown}")
        raise SnapshotError("weights do not match the model; " + "; ".join(parts))
    return mapped


def load_released_state_dict(
    model: LladaVModel, state_dict: Mapping[str, torch.Tensor], only_language_model: bool = False
) -> None:
    """Copy a released-layout (or OLMo-named LLaDA) state dict into ``model`` in place.

    With ``only_language_model`` only the LM and head are expected (e.g. initialising from LLaDA-8B-Instruct);
    anything else in ``state_dict`` is then unexpected. Mismatches raise :class:`SnapshotError`.
    """
    expected = {
        n: t.shape
        for n, t in model.state_dict().items()
        if not only_language_model or n.startswith(("language_model.", "lm_head."))
    }
    mapped = _map_state_dict(state_dict, expected)
    with torch.no_grad():
        params = model.state_dict()
        for name, tensor in mapped.items():
            params[name].copy_(tensor)


# ---------------------------------------------------------------------------------------------- saving
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r}; expected bytes or e.g. '5GB', '200MB'")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(match.group(1)) * units[(match.group(2) or "B").lower()])


def _shards(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_snapshot(
    model: LladaVModel,
    path: str | Path,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    tokenizer=None,
    prompt_formatter: PromptFormatter | None = None,
) -> Path:
    """Write ``model`` as a released-layout snapshot at ``path`` (a new directory).

    Written into a temporary sibling directory and renamed into place, so a snapshot is either complete or
    absent; an existing ``path`` raises ``FileExistsError`` (snapshots are never overwritten).
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"snapshot already exists, refusing to overwrite: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors = {
            name: (t.detach().to(dtype) if dtype is not None else t.detach()).contiguous().cpu()
            for name, t in released_state_dict(model).items()
        }
        assert_finite_state(tensors, where=f"snapshot {path}")
        shards = _shards(tensors, _parse_size(max_shard_size))
        weight_map: dict[str, str] = {}
        for index, shard in enumerate(shards, start=1):
            file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / file_name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file_name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index_json, indent=2, sort_keys=True) + "\n")
        config = model.config.to_json_dict()
        config["torch_dtype"] = str(dtype or model.dtype).removeprefix("torch.")
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if prompt_formatter is not None:
            (tmp / PROMPT_FORMAT_NAME).write_text(json.dumps(prompt_formatter.to_dict(), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for file in tmp.rglob("*"):  # safetensors writes 0600; a snapshot holds ordinary shared files
            set_default_mode(file)
        set_default_mode(tmp)
        if path.exists():
            raise FileExistsError(f"snapshot appeared while writing, refusing to overwrite: {path}")
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------- loading
@contextmanager
def _open_weights(file: Path) -> Iterator:
    """``safe_open(file)``; a truncated or garbage file (at open or while reading) raises ``ValueError``
    naming it."""
    from safetensors import SafetensorError

    try:
        with safe_open(str(file), framework="pt") as handle:
            yield handle
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{file} is not a valid safetensors file (truncated or corrupt?): {error}") from None


def snapshot_weight_files(path: str | Path) -> dict[str, list[str]]:
    """Map of weight file -> tensor names of a snapshot; missing files raise ``FileNotFoundError`` naming them."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"snapshot directory not found: {path}")
    index_path = path / INDEX_NAME
    if index_path.is_file():
        weight_map = read_json_file(index_path, ("weight_map",), what="safetensors index")["weight_map"]
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index_path}: 'weight_map' must map tensor names to file names")
        files: dict[str, list[str]] = {}
        for name, file_name in weight_map.items():
            files.setdefault(file_name, []).append(name)
    elif (path / SINGLE_WEIGHTS_NAME).is_file():
        with _open_weights(path / SINGLE_WEIGHTS_NAME) as handle:
            files = {SINGLE_WEIGHTS_NAME: list(handle.keys())}
    else:
        raise FileNotFoundError(f"no {INDEX_NAME} or {SINGLE_WEIGHTS_NAME} in {path}")
    absent = sorted(str(path / f) for f in files if not (path / f).is_file())
    if absent:
        raise FileNotFoundError(f"snapshot weight files missing: {absent}")
    return files


def read_snapshot_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a snapshot under their stored names; a shard lacking an indexed tensor raises."""
    path = Path(path)
    state: dict[str, torch.Tensor] = {}
    for file_name, names in snapshot_weight_files(path).items():
        with _open_weights(path / file_name) as handle:
            stored = set(handle.keys())
            lacking = sorted(set(names) - stored)
            if lacking:
                raise SnapshotError(f"{path / file_name} lacks tensors listed in the index: {lacking[:40]}")
            for name in stored:
                tensor = handle.get_tensor(name)
                state[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return state


def _materialize_buffers(model: LladaVModel, device: torch.device | str) -> None:
    """Recreate the non-persistent buffers left on the meta device (rotary frequencies, SigLIP position ids)."""
    lm = model.language_model
    if any(b.is_meta for b in lm.rotary_emb.buffers()):
        with torch.device(device):
            lm.rotary_emb = LlamaRotaryEmbedding(config=lm.config)
    embeddings = model.vision_tower.vision_model.embeddings
    if embeddings.position_ids.is_meta:
        positions = torch.arange(embeddings.position_ids.shape[-1], device=device).expand(1, -1)
        embeddings.register_buffer("position_ids", positions, persistent=False)
    left = [name for name, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"buffers left on the meta device after loading: {left}")


def load_snapshot(
    path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> LladaVModel:
    """Build a :class:`LladaVModel` from a snapshot (released LLaDA-V layout, LLaMA or OLMo LM names).

    The model is built on the meta device and the stored tensors are assigned, so no random initialisation
    runs (an 8B snapshot loads with one copy in memory). ``dtype`` defaults to the config's ``torch_dtype``.
    Missing files raise ``FileNotFoundError``; missing / unexpected / mis-shaped parameters raise
    :class:`SnapshotError` listing them.
    """
    path = Path(path)
    config = LladaVConfig.load(path / CONFIG_NAME)
    dtype = dtype or getattr(torch, config.torch_dtype)
    state = read_snapshot_state_dict(path, dtype=dtype)
    with torch.device("meta"):
        model = LladaVModel(config)
    expected = {name: t.shape for name, t in model.state_dict().items()}
    try:
        mapped = _map_state_dict(state, expected)
    except SnapshotError as error:
        raise SnapshotError(
            f"{path}: {error} (the architecture is recorded in {path / CONFIG_NAME})"
        ) from None
    mapped = {name: t.to(device) for name, t in mapped.items()}
    model.load_state_dict(mapped, strict=True, assign=True)
    _materialize_buffers(model, device)
    return model.eval()


def load_prompt_formatter(path: str | Path) -> PromptFormatter:
    """The prompt format saved with a snapshot; raises ``FileNotFoundError`` naming the file if absent."""
    file = Path(path) / PROMPT_FORMAT_NAME
    if not file.is_file():
        raise FileNotFoundError(f"prompt format not found: {file}")
    return PromptFormatter.from_dict(json.loads(file.read_text()))
