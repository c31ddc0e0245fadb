"""DiSP self-purification: the compromised model relabels its own (poisoned) training set.

For every training sample the model answers its own prompt with DiSP's inference-time masking (the top-rho
salient vision tokens masked at every denoising step) and that answer replaces the sample's response. No
auxiliary model and no clean reference data are used; the poisoned inputs (images and questions, triggers
included) are kept as they are.

Execution:

* **batched**: samples are generated ``batch_size`` at a time (saliency with vmapped Hutchinson probes, then
  the batched sampler);
* **sharded**: the data set is cut into chunks of ``chunk_size`` consecutive indices and chunk ``c`` belongs to
  rank ``c % world_size``, so under DDP every rank takes its share (and a resumed run may use another world
  size);
* **resumable**: each finished chunk is written atomically to ``<out>/parts/chunk-<c>.json``; a rerun skips
  chunks already on disk (after checking that ``parts/config.json`` describes the same settings and data);
* **atomic output**: rank 0 merges the chunks into ``<out>/purified.json`` (LLaVA-style records) and then
  ``<out>/manifest.json``; the manifest is written last, so its presence marks a complete data set. The input
  data set is never written to: an output folder holding the input is an error.

Probes are seeded per chunk and batch, so a resumed purification equals an uninterrupted one.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from attacks import atomic_write_json
from attacks.hashing import fingerprint
from defenses.disp.family import DiSPFamily, MDLMDiSP
from defenses.disp.masking import DiSPMasking

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PURIFIED_NAME = "purified.json"
MANIFEST_NAME = "manifest.json"


class PurificationError(RuntimeError):
    """Inconsistent or unsafe purification state (mismatched resume, output over the input...)."""


def _move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _chunk_path(parts: Path, chunk: int) -> Path:
    return parts / f"chunk-{chunk:06d}.json"


def _read_chunk(path: Path, indices: list[int]) -> list[dict] | None:
    """Records of a finished chunk, or None if the file is missing or does not cover ``indices``."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # cannot happen with atomic writes, but a foreign file is simply redone
    records = data.get("records", [])
    if [r.get("index") for r in records] != indices:
        return None
    return records


def _check_output_safe(out_dir: Path, inputs: list[str]) -> None:
    out = out_dir.resolve()
    for item in inputs:
        source = Path(item).resolve()
        if source == out or out in source.parents:
            raise PurificationError(
                f"purification output {out_dir} would hold the input data {item}; choose another folder"
            )
        if source in (out / PURIFIED_NAME, out / MANIFEST_NAME):
            raise PurificationError(f"purification output {out_dir} would overwrite the input {item}")


def _record(meta: dict, index: int, response: str, masked: int | None) -> dict:
    history = meta.get("history") or []
    turns = []
    for position, (question, answer) in enumerate(history):
        prefix = "<image>\n" if position == 0 else ""
        turns += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    prefix = "" if history else "<image>\n"
    turns += [{"from": "human", "value": prefix + meta["question"]}, {"from": "gpt", "value": response}]
    record = {
        "id": meta.get("key", str(index)),
        "index": index,
        "image": meta.get("image_path"),
        "conversations": turns,
        "original_response": meta["answer"],
    }
    if masked is not None:
        record["masked_vision_tokens"] = masked
    return record


def purify_dataset(
    model: Any,
    dataset: Dataset,
    collate: Callable[[list[dict]], dict],
    out_dir: str | Path,
    tokenizer: Any,
    masking: DiSPMasking,
    generation: Any,
    batch_size: int = 64,
    chunk_size: int = 512,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    source: dict | None = None,
    on_chunk_done: Callable[[int, int], None] | None = None,
    family: DiSPFamily | None = None,
) -> Path:
    """Purify ``dataset`` into ``out_dir`` (see the module docstring); returns ``out_dir/purified.json``.

    Args:
        model: the compromised model (a LladaVModel, or the model of ``family``); in eval mode for the duration.
        dataset: the training set as trained (items with image, question, answer...; ``meta(i)`` for text).
        collate: its collator (left-padded prompts, ``prompt_ids`` / ``prompt_mask`` / ``pixel_values``).
        tokenizer: decodes the generated ids.
        masking / generation: DiSP masking and sampler settings (the family's generation config: ``to_dict()``).
        batch_size / chunk_size: samples per forward batch / per resumable chunk.
        rank / world_size / barrier: DDP sharding (``trainer.strategy.barrier``).
        source: description of the input (``fingerprint``, ``paths`` of input files, ...), kept in the manifest.
        on_chunk_done: called as ``(chunk, samples)`` after each chunk is written (progress, tests).
        family: the model family's DiSP adapter (:class:`defenses.disp.family.DiSPFamily`, e.g. LLaVA's);
            None: LLaDA-V's (:class:`~defenses.disp.family.MDLMDiSP` of ``model``, ``tokenizer``, ``generation``).
    """
    out_dir = Path(out_dir)
    source = dict(source or {})
    _check_output_safe(out_dir, [str(p) for p in source.get("paths", [])])
    barrier = barrier or (lambda: None)
    total = len(dataset)
    settings = {
        "format_version": FORMAT_VERSION,
        "masking": masking.to_dict(),
        "generation": generation.to_dict(),
        "chunk_size": chunk_size,
        "num_samples": total,
        "source_fingerprint": source.get("fingerprint") or fingerprint({"size": total}),
    }
    manifest_path = out_dir / MANIFEST_NAME
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("settings") == settings and manifest.get("status") == "complete":
            log.info("purified data set already complete: %s", out_dir)
            return out_dir / PURIFIED_NAME
        raise PurificationError(
            f"{manifest_path} describes another purification (settings differ); use a new purified_dir"
        )
    parts = out_dir / "parts"
    config_path = parts / "config.json"
    parts.mkdir(parents=True, exist_ok=True)
    if not config_path.is_file():
        atomic_write_json(config_path, settings)  # every rank writes the same bytes atomically: race-free
    barrier()
    stored = json.loads(config_path.read_text())
    if stored != settings:
        differ = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        raise PurificationError(
            f"cannot resume {out_dir}: its parts were made with other settings ({differ}); use a new purified_dir"
        )

    chunks = math.ceil(total / chunk_size) if total else 0
    mine = [c for c in range(chunks) if c % world_size == rank]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    family = family if family is not None else MDLMDiSP(model, tokenizer, generation)
    start, done, skipped = time.perf_counter(), 0, 0
    try:
        for chunk in mine:
            indices = list(range(chunk * chunk_size, min((chunk + 1) * chunk_size, total)))
            path = _chunk_path(parts, chunk)
            if _read_chunk(path, indices) is not None:
                skipped += len(indices)
                continue
            records = []
            loader = DataLoader(
                Subset(dataset, indices), batch_size=batch_size, shuffle=False, collate_fn=collate
            )
            for batch_index, batch in enumerate(loader):
                batch = _move(batch, device)
                generator = torch.Generator().manual_seed(
                    (masking.seed * 1_000_003 + chunk) * 10_007 + batch_index
                )
                responses, selected = family.masked_responses(batch, masking, generator)
                counts = selected.sum(dim=1).tolist() if selected is not None else [0] * len(responses)
                for row, response in enumerate(responses):
                    index = indices[len(records)]  # Subset keeps the order of ``indices``
                    records.append(_record(dataset.meta(index), index, response, int(counts[row])))
            atomic_write_json(path, {"chunk": chunk, "records": records})
            done += len(indices)
            if on_chunk_done is not None:
                on_chunk_done(chunk, len(indices))
    finally:
        if was_training:
            model.train()
    elapsed = time.perf_counter() - start
    log.info("rank %d purified %d samples (%d already done) in %.1fs", rank, done, skipped, elapsed)
    barrier()
    if rank == 0:
        _merge(out_dir, parts, chunks, chunk_size, total, settings, source, elapsed, done)
    barrier()
    return out_dir / PURIFIED_NAME


def _merge(out_dir, parts, chunks, chunk_size, total, settings, source, elapsed, done) -> None:
    records: list[dict] = []
    for chunk in range(chunks):
        indices = list(range(chunk * chunk_size, min((chunk + 1) * chunk_size, total)))
        chunk_records = _read_chunk(_chunk_path(parts, chunk), indices)
        if chunk_records is None:
            raise PurificationError(f"purification chunk {chunk} is missing or incomplete in {parts}")
        records.extend(chunk_records)
    atomic_write_json(out_dir / PURIFIED_NAME, records)
    changed = sum(r["conversations"][-1]["value"] != r["original_response"] for r in records)
    manifest = {
        "status": "complete",
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "source": source,
        "num_samples": len(records),
        "responses_changed": changed,
        "purified": PURIFIED_NAME,
        "last_run_seconds": round(elapsed, 3),
        "last_run_samples": done,
    }
    atomic_write_json(out_dir / MANIFEST_NAME, manifest)
