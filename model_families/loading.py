"""Read model files without trusting them: weights-only checkpoints, checked safetensors and JSON, and the
provenance (resolved path, sha256) of what was read.

Every family loads its inputs through these functions, so a file that would need full unpickling (and
could run code while loading) is refused, and a broken file is an error that names it, never a bare
``OSError`` / ``SafetensorError`` / ``KeyError`` from deep inside a library.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from attacks.hashing import file_sha256

__all__ = [
    "UnsafeCheckpointError",
    "WeightsMismatchError",
    "input_provenance",
    "inputs_provenance",
    "load_safetensors_file",
    "load_torch_file",
    "read_json_file",
    "shape_mismatches",
]


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds Python objects beyond tensors and plain containers: loading it would need full
    unpickling, which can run arbitrary code, so it is refused."""


class WeightsMismatchError(ValueError):
    """Stored weights do not fit the model they are loaded into: lists the mis-shaped (both shapes),
    missing and unexpected parameters."""


def load_torch_file(path: str | os.PathLike, *, key: str | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors, numbers, strings and containers only.

    A file that needs full unpickling raises :class:`UnsafeCheckpointError` naming the file (and the
    config ``key`` it came from) and the Python object it tried to build; a file that is not a PyTorch
    checkpoint at all (truncated, garbage) raises ``ValueError`` naming it.
    """
    where = f"{path}" + (f" ({key})" if key else "")
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {where}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = str(error).splitlines()
        if not any("Weights only load failed" in line for line in lines):
            raise ValueError(f"{where} is not a valid PyTorch checkpoint: {error}") from None
        reason = next((line.strip() for line in lines if "WeightsUnpickler" in line), lines[0])
        # keep what it tried to build ("Unsupported global: GLOBAL os.system"), not torch's advice to allowlist it
        reason = reason.removeprefix("WeightsUnpickler error: ").split(" was not an allowed global")[0]
        raise UnsafeCheckpointError(
            f"{where}: refusing to load: the file stores Python objects beyond tensors and plain containers "
            f"and would need full unpickling, which can run arbitrary code ({reason}). Only weights-only "
            "checkpoints are loaded; if you trust the file, re-save its state_dict (tensors only, or "
            "safetensors) in a separate, trusted environment."
        ) from None
    except Exception as error:  # torch raises RuntimeError, KeyError, EOFError... for a broken file
        raise ValueError(
            f"{where} is not a valid PyTorch checkpoint (truncated or another format?): "
            f"{type(error).__name__}: {error}"
        ) from None


def load_safetensors_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file on the CPU; a truncated or garbage file raises
    ``ValueError`` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt?): {error}") from None


def read_json_file(path: str | os.PathLike, required: Iterable[str] = (), *, what: str = "JSON file") -> dict:
    """The JSON object in ``path``; a missing file, invalid JSON, a non-object or a missing ``required``
    key raises an error naming the file (and the key)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({what}): {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object ({what}), got {type(data).__name__}")
    for name in required:
        if name not in data:
            raise ValueError(f"{path}: missing key {name!r} ({what})")
    return data


def shape_mismatches(expected: dict[str, torch.Size | tuple], found: dict[str, torch.Tensor]) -> list[str]:
    """``"name: file (a, b) vs model (c, d)"`` for every tensor present in both with different shapes."""
    return [
        f"{name}: file {tuple(found[name].shape)} vs model {tuple(expected[name])}"
        for name in expected
        if name in found and tuple(found[name].shape) != tuple(expected[name])
    ]


def input_provenance(path: str | os.PathLike) -> dict:
    """Where an input model came from, so a later run can tell what it was even when ``path`` is a moving
    link (``runs/x/latest_export``): ``{"path": as written, "resolved": os.path.realpath, "sha256": ...}``.

    ``sha256`` is the hex digest of the file (a checkpoint) or, for a folder, of its single
    ``*.safetensors`` file; a folder of several shards gets ``"files": {name: sha256}`` and a ``sha256`` over
    the ``"<sha256>  <name>"`` lines of its shards in name order (what ``sha256sum`` prints).
    """
    resolved = Path(os.path.realpath(path))
    record: dict[str, Any] = {"path": str(path), "resolved": str(resolved)}
    if resolved.is_file():
        record["sha256"] = file_sha256(resolved)
        return record
    shards = sorted(p for p in resolved.glob("*.safetensors") if p.is_file())
    if not shards:
        raise FileNotFoundError(f"{path}: no weights to record (no *.safetensors file in {resolved})")
    files = {p.name: file_sha256(p) for p in shards}
    if len(files) == 1:
        record["sha256"] = next(iter(files.values()))
    else:
        lines = "".join(f"{digest}  {name}\n" for name, digest in files.items())
        record["sha256"] = hashlib.sha256(lines.encode()).hexdigest()
        record["files"] = files
    return record


def inputs_provenance(inputs: dict[str, str | os.PathLike | None]) -> dict[str, dict]:
    """:func:`input_provenance` of each given input, by config key (``{"model.init_from": ...}``); ``None``
    values (no such input) are left out. Called when the inputs are loaded, before a link can move."""
    return {key: input_provenance(path) for key, path in inputs.items() if path is not None}
