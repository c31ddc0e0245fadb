"""Every metric gives the same value on 2 CPU processes (gloo, uneven shards) as on one process with all data."""

from __future__ import annotations

import math
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metrics import (
    AttackSuccessRate,
    AttackSuccessRateGeneralisation,
    CrossTriggerInteraction,
    GenerativeAttackSuccessRate,
    TriggerModalityAttribution,
)

WORLD_SIZE = 2
# Uneven shards: rank 0 gets the first SPLIT[name] samples, rank 1 the rest.
N_CLS, N_GEN, N_TMA, N_SRC, N_TGT = 50, 23, 41, 30, 47
SPLIT = {"cls": 37, "gen": 5, "tma": 12, "src": 29, "tgt": 10}
RESPONSES = ["a photo of a dog", "I'm sorry, I can't", "a cat", "DOG", "a cat and a dog"]


def _data() -> dict[str, object]:
    rng = np.random.default_rng(1234)
    return {
        "logits": torch.from_numpy(rng.normal(size=(N_CLS, 4)).astype(np.float32)),
        "labels": torch.from_numpy(rng.integers(0, 4, size=N_CLS)),
        "responses": [RESPONSES[k] for k in rng.integers(0, len(RESPONSES), size=N_GEN)],
        "true_classes": [["cat", "dog", "bird"][k] for k in rng.integers(0, 3, size=N_GEN)],
        "values2": torch.from_numpy(rng.normal(size=(N_TMA, 4))),
        "values3": torch.from_numpy(rng.random((N_TMA, 8)).astype(np.float32)),
        "src_hits": torch.from_numpy(rng.random(N_SRC) < 0.8),
        "tgt_hits": torch.from_numpy(rng.random(N_TGT) < 0.5),
    }


def _metrics() -> dict[str, object]:
    return {
        "asr": AttackSuccessRate(target_class=1),
        "asr_all": AttackSuccessRate(target_class=1, exclude_target_class=False),
        "gen_misclassification": GenerativeAttackSuccessRate(rule="misclassification", target="dog"),
        "gen_refusal": GenerativeAttackSuccessRate(rule="refusal"),
        "tma2": TriggerModalityAttribution(["image", "text"], normalize=True, return_ci=True),
        "tma3": TriggerModalityAttribution(["image", "text", "audio"], return_ci=True),
        "cti2": CrossTriggerInteraction(["image", "text"], return_ci=True),
        "cti3": CrossTriggerInteraction(["image", "text", "audio"], pair=["text", "audio"]),
        "asr_g": AttackSuccessRateGeneralisation(),
    }


def _shard(key: str, n: int, rank: int | None) -> slice:
    if rank is None:
        return slice(0, n)
    return slice(0, SPLIT[key]) if rank == 0 else slice(SPLIT[key], n)


def _run(data: dict, rank: int | None) -> dict[str, object]:
    """Update every metric on this rank's shard (in two batches) and compute; ``rank=None`` takes all data."""
    metrics = _metrics()
    for key, n, update in [
        (
            "cls",
            N_CLS,
            lambda s: [metrics[k].update(data["logits"][s], data["labels"][s]) for k in ("asr", "asr_all")],
        ),
        (
            "gen",
            N_GEN,
            lambda s: [
                metrics[k].update(data["responses"][s], data["true_classes"][s])
                for k in ("gen_misclassification", "gen_refusal")
            ],
        ),
        ("tma", N_TMA, lambda s: [metrics[k].update(data["values2"][s]) for k in ("tma2", "cti2")]),
        ("tma", N_TMA, lambda s: [metrics[k].update(data["values3"][s]) for k in ("tma3", "cti3")]),
    ]:
        shard = _shard(key, n, rank)
        middle = (shard.start + shard.stop) // 2
        update(slice(shard.start, middle))
        update(slice(middle, shard.stop))
    src, tgt = _shard("src", N_SRC, rank), _shard("tgt", N_TGT, rank)
    metrics["asr_g"].update(data["src_hits"][src], data["tgt_hits"][tgt])
    return {name: metric.compute() for name, metric in metrics.items()}


def _worker(rank: int, port: int, out_dir: str | None, data: dict) -> dict[str, object]:
    """One DDP rank: join the gloo group, compute on this rank's shard, save the result if ``out_dir``."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        result = _run(data, rank)
    finally:
        dist.destroy_process_group()
    if out_dir is not None:
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    return result


def _spawned_rank_1(_: int, port: int, out_dir: str, data: dict) -> None:
    _worker(1, port, out_dir, data)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _flatten(result: dict[str, object]) -> dict[str, float]:
    flat = {}
    for name, value in result.items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        flat.update({f"{name}/{key}": float(v) for key, v in items})
    return flat


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_ddp_equals_single_process(tmp_path: Path) -> None:
    # Rank 1 is a spawned process; this process is rank 0, which saves importing torch a third time.
    data, port = _data(), _free_port()
    context = mp.spawn(_spawned_rank_1, args=(port, str(tmp_path), data), nprocs=1, join=False)
    try:
        results = [_worker(0, port, None, data)]
    finally:
        context.join()
    results.append(torch.load(tmp_path / "rank1.pt", weights_only=True))

    expected = _flatten(_run(data, rank=None))
    assert len(expected) == 20
    for rank, result in enumerate(results):
        got = _flatten(result)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert not math.isnan(value), key
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), f"rank {rank}: {key}"
