"""Atomic file writes for artifacts (manifests, patterns, results).

A reader never sees a half-written file: the data goes to a temporary file in the destination's
folder, is flushed and fsync'ed, and then replaces the destination with :func:`os.replace`, which is
atomic on POSIX and Windows when both paths are on the same file system. Files get the ordinary
mode of a new file (``0o666`` less the process umask, e.g. ``0644``), not the ``0600`` of a temp file.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_save_image",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "json_safe",
    "set_default_mode",
]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + fsync + ``os.replace``).

    The parent folder is created if missing. Returns the destination as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        set_default_mode(tmp_name)  # mkstemp creates 0600; artifacts are ordinary shared files
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # Never leave the temporary file behind, whatever went wrong.
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; see :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    """Serialise ``data`` as JSON (keys sorted, trailing newline) and write it atomically.

    Non-finite numbers become ``null`` with a reason (:func:`json_safe`): never the bare ``NaN`` /
    ``Infinity`` that ``json.dumps`` writes by default, which strict JSON readers reject and which would
    let a diverged metric pass for a number.
    """
    text = json.dumps(json_safe(data), indent=indent, sort_keys=True, ensure_ascii=False, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def json_safe(data: Any) -> Any:
    """A copy of ``data`` in which every NaN/inf float is ``None`` and the object holding it gains an
    ``invalid`` entry saying why, e.g. ``{"test/asr": nan}`` -> ``{"test/asr": None, "invalid":
    {"test/asr": "non-finite (nan)"}}`` (list items are named ``key[i]``).

    >>> json_safe({"ca": 0.5, "asr": float("nan"), "curve": [1.0, float("inf")]})
    {'ca': 0.5, 'asr': None, 'curve': [1.0, None], 'invalid': {'asr': 'non-finite (nan)', 'curve[1]': 'non-finite (inf)'}}

    A non-finite number outside any object (``data`` itself, or a top-level list) has nowhere to record
    its reason and raises ``ValueError``, as does an existing ``invalid`` entry that is not an object.
    """
    return _json_safe(data, None, "")


def _json_safe(value: Any, reasons: dict[str, str] | None, key: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        if reasons is None:
            raise ValueError(
                f"non-finite number {value} at {key or 'the top level'} of a JSON artifact, outside any "
                "object that could record why it is null"
            )
        reasons[key] = f"non-finite ({value})"
        return None
    if isinstance(value, dict):
        out, found = {}, {}
        for k, v in value.items():
            out[k] = _json_safe(v, found, str(k))
        if found:
            previous = out.get("invalid", {})
            if not isinstance(previous, dict):
                raise ValueError(f"cannot record non-finite values {sorted(found)}: 'invalid' is taken")
            out["invalid"] = {**previous, **found}
        return out
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, reasons, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def atomic_save_image(image: Any, path: str | os.PathLike) -> Path:
    """Save an image tensor (``C x H x W`` or a batch, values in [0, 1]) as a PNG atomically, through
    :func:`torchvision.utils.save_image` (a batch becomes a grid); see :func:`atomic_write_bytes`."""
    import io

    from torchvision.utils import save_image

    buffer = io.BytesIO()
    save_image(image, buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


@functools.cache
def process_umask() -> int:
    """The process umask, read once (``os.umask`` can only be read by setting it, so it is not re-read
    while other threads may create files)."""
    current = os.umask(0o022)
    os.umask(current)
    return current


def set_default_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open`` / ``mkdir`` would: ``0o666`` (files) or ``0o777``
    (folders) less the umask. For what ``tempfile`` created (``0600`` files, ``0700`` folders) and then
    renamed into place as an artifact."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~process_umask())


def _fsync_dir(folder: Path) -> None:
    # Persist the rename itself; not possible on every platform (e.g. Windows), where it is skipped.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
