"""Seeded randomness that does not depend on batch composition or device.

Per-sample random parts of a trigger (a BadNet noise patch, a random patch location, per-image blend
noise) must be the same for a sample whatever batch it lands in. They are drawn from a counter-based
generator: every value is a hash of ``(seed, stream, sample_id, element_index)``, computed with
integer tensor ops on the batch's own device, so a batch needs no per-sample ``torch.Generator`` and
the values are identical on CPU and CUDA.

The hash is the PCG hash of Jarzynski & Olano, "Hash Functions for GPU Rendering" (JCGT 2020),
evaluated on 32-bit values held in int64 tensors (no overflow: every product stays below 2**63).
"""

from __future__ import annotations

import hashlib
import math
import random

import torch
from torch import Tensor

__all__ = ["derive_seed", "sample_normal", "sample_rng", "sample_uniform"]

_MASK32 = 0xFFFFFFFF
# Elements hashed at once; bounds the int64 temporaries to a few tens of MiB.
_CHUNK_ELEMENTS = 1 << 22


def derive_seed(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` (e.g. ``(seed, "position", sample_id)``) with SHA-256.

    Stable across processes and Python versions, unlike :func:`hash`.
    """
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_rng(*parts: object) -> random.Random:
    """A :class:`random.Random` seeded with :func:`derive_seed` of ``parts``."""
    return random.Random(derive_seed(*parts))


def _pcg_hash(x: Tensor) -> Tensor:
    state = (x * 747796405 + 2891336453) & _MASK32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _MASK32
    return (word >> 22) ^ word


def _sample_keys(seed: int, stream: str, sample_ids: Tensor) -> Tensor:
    base = derive_seed(seed, stream) & _MASK32
    ids = sample_ids.to(torch.int64)
    keys = _pcg_hash((ids & _MASK32) ^ base)
    return _pcg_hash(keys ^ ((ids >> 32) & _MASK32))


def _hash_bits(seed: int, stream: str, sample_ids: Tensor, numel: int) -> Tensor:
    """``len(sample_ids) x numel`` int64 tensor of 32-bit hashes on ``sample_ids.device``."""
    keys = _sample_keys(seed, stream, sample_ids)
    counters = _pcg_hash(torch.arange(numel, device=sample_ids.device, dtype=torch.int64))
    rows = max(1, _CHUNK_ELEMENTS // max(numel, 1))
    chunks = []
    for start in range(0, keys.shape[0], rows):
        key = keys[start : start + rows, None]
        chunks.append(_pcg_hash(_pcg_hash(counters[None, :] ^ key) + key))
    if not chunks:
        return torch.empty(0, numel, dtype=torch.int64, device=sample_ids.device)
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0]


def sample_uniform(
    seed: int,
    stream: str,
    sample_ids: Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """U[0, 1) values of shape ``(len(sample_ids), *shape)``; row ``i`` depends only on
    ``(seed, stream, sample_ids[i])``. 24 bits of resolution (values are multiples of 2**-24)."""
    numel = math.prod(shape)
    bits = _hash_bits(seed, stream, sample_ids, numel)
    values = (bits >> 8).to(dtype) * (2.0**-24)
    return values.reshape(sample_ids.shape[0], *shape)


def sample_normal(
    seed: int,
    stream: str,
    sample_ids: Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """N(0, 1) values of shape ``(len(sample_ids), *shape)`` by the Box-Muller transform
    z = sqrt(-2 ln u1) cos(2 pi u2) of two independent :func:`sample_uniform` draws."""
    u1 = sample_uniform(seed, f"{stream}/u1", sample_ids, shape, dtype)
    u2 = sample_uniform(seed, f"{stream}/u2", sample_ids, shape, dtype)
    u1 = u1 + 2.0**-25  # (0, 1): keeps log() finite
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
