"""Reading and checking LLaVA-format record files (a JSON list or JSON lines of conversations); see
:mod:`datamodules.llava_json` for the format."""

from __future__ import annotations

import json
from pathlib import Path

from model_families.mdlm.tokenizer import IMAGE_TOKEN

__all__ = ["load_llava_records"]


def load_llava_records(path: str | Path) -> list[dict]:
    """The records of a LLaVA-format JSON file (a list) or JSON-lines file, checked for the expected shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LLaVA data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    for position, record in enumerate(records):
        _check_record(path, position, record)
    return records


def _check_record(path: Path, position: int, record) -> None:
    where = f"{path} record {position}" + (f" (id {record.get('id')!r})" if isinstance(record, dict) else "")
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        raise ValueError(f"{where}: 'conversations' must be a list of at least one human and one gpt turn")
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise ValueError(
                f"{where}: turn {index} must be an object with 'from' and a string 'value', got {turn!r}"
            )
        expected = "human" if index % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise ValueError(
                f"{where}: turn {index} is from {turn['from']!r}, expected {expected!r} (turns alternate)"
            )
    if len(turns) % 2:
        raise ValueError(f"{where}: the conversation ends with a human turn that has no gpt answer")
    if not isinstance(record.get("image"), str) or not record["image"]:
        raise ValueError(f"{where}: no 'image' path (text-only samples are not supported)")
    later = [i for i, t in enumerate(turns) if i > 0 and IMAGE_TOKEN in t["value"]]
    if later:
        raise ValueError(
            f"{where}: {IMAGE_TOKEN} appears in turn(s) {later}; only the first human turn may hold it"
        )
