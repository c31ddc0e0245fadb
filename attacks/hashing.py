"""Fingerprints of trigger and target configurations for poison manifests, and file digests for the
provenance of loaded models."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["file_sha256", "fingerprint"]


def fingerprint(config: Mapping[str, Any], tensors: Mapping[str, Tensor] | None = None) -> str:
    """``sha256:<hex>`` over the JSON of ``config`` (keys sorted) and each tensor's name, shape and
    float32 values, so the fingerprint does not change when a pattern is moved to another device or
    cast to another floating dtype."""
    digest = hashlib.sha256()
    digest.update(json.dumps(dict(config), sort_keys=True, default=str).encode("utf-8"))
    for name in sorted(tensors or {}):
        tensor = tensors[name]
        if tensor.device.type == "meta":
            raise ValueError(
                f"cannot fingerprint tensor {name!r}: it is on the 'meta' device and has no values"
            )
        values = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(values.shape)}".encode())
        digest.update(values.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of the bytes of ``path`` (what ``sha256sum`` prints), read in chunks so large weight
    files never sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
