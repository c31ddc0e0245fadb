"""DiSP's side of the instruction datamodule: what purification reads from it and what it gives back.

The datamodule knows nothing of DiSP: it serves its training set as trained (``training_set``), describes it
(``dataset_info``, ``source_fingerprint``, ``input_paths``) and takes relabelled responses
(``replace_responses``). This module turns that into the purifier's input and reads a purified set
(``purified.json`` + ``manifest.json`` of :func:`defenses.disp.purify.purify_dataset`) back into responses,
checking that it was made from the same training set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from defenses.disp.purify import MANIFEST_NAME, PURIFIED_NAME

__all__ = ["purification_dataset", "purification_source", "read_purified_responses", "use_purified"]


def purification_dataset(datamodule: Any) -> Any:
    """The poisoned training set as the model is fine-tuned on it, image triggers applied per item (the
    purifier loads it with ``datamodule.collator``)."""
    if not hasattr(datamodule, "training_set"):
        raise TypeError(
            f"DiSP needs an instruction datamodule (training_set/replace_responses), got {type(datamodule).__name__}"
        )
    return datamodule.training_set(apply_image_trigger=True)


def purification_source(datamodule: Any, model: str | None = None) -> dict:
    """Description of the purifier's input, kept in the purified set's manifest (``fingerprint`` is checked
    when the set is read back; ``paths`` are never written over)."""
    return {
        "dataset": datamodule.dataset_info(),
        "fingerprint": datamodule.source_fingerprint(),
        "paths": datamodule.input_paths() if hasattr(datamodule, "input_paths") else [],
        "model": str(model),
    }


def read_purified_responses(
    path: str | Path, num_samples: int, fingerprint: str | None = None
) -> tuple[Path, dict[int, str]]:
    """``(file, {index: response})`` of a purified set (a folder holding ``purified.json``, or the file).

    Raises ``FileNotFoundError`` for a missing set, ``ValueError`` for invalid JSON, a malformed record, a
    set that lacks some of the ``num_samples`` training indices, or (when its manifest records one) a
    fingerprint other than ``fingerprint``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / PURIFIED_NAME
    if not path.is_file():
        raise FileNotFoundError(f"purified data set not found: {path}")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"purified data set {path} is not valid JSON: {error}") from None
    manifest_path = path.parent / MANIFEST_NAME
    if manifest_path.is_file() and fingerprint is not None:
        expected = json.loads(manifest_path.read_text()).get("source", {}).get("fingerprint")
        if expected is not None and expected != fingerprint:
            raise ValueError(
                f"purified data set {path} was made from another training set "
                f"(fingerprint {expected} != {fingerprint})"
            )
    responses = {}
    for record in records:
        try:
            responses[int(record["index"])] = str(record["conversations"][-1]["value"])
        except (KeyError, IndexError, TypeError, ValueError):
            raise ValueError(f"purified data set {path}: malformed record {str(record)[:200]}") from None
    missing = sorted(set(range(num_samples)) - set(responses))
    if missing:
        raise ValueError(
            f"purified data set {path} lacks {len(missing)} samples, e.g. indices {missing[:10]}"
        )
    return path, responses


def use_purified(datamodule: Any, path: str | Path) -> None:
    """Train ``datamodule`` on the responses of a purified set instead of its answers (checks it matches)."""
    file, responses = read_purified_responses(
        path, len(datamodule.train_source), datamodule.source_fingerprint()
    )
    datamodule.replace_responses(responses, str(file))
