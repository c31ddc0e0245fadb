"""Clear command-line errors: the project's own message instead of jsonargparse's chained traceback.

A ValueError raised by a model's or datamodule's constructor reaches the user wrapped by jsonargparse
("Does not validate against any of the Union subtypes", the whole resolved namespace, 60-80 lines).
`project_error` digs the project's exception out of the chain; `MMBackdoorCLI` re-raises it with a short
traceback (Python API) and `train.py` prints it as one `error:` line and exits 2. `--debug` on the command
line or `MMBACKDOOR_DEBUG=1` keeps the full chain.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

DEBUG_ENV = "MMBACKDOOR_DEBUG"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# raised on purpose by the project's validation code; anything else keeps its traceback
CLEAN_ERRORS = (ValueError, FileNotFoundError, FileExistsError)
_NOT_PROJECT = {".venv", "venv", "site-packages", "dist-packages"}


def debug_enabled() -> bool:
    """True when `MMBACKDOOR_DEBUG` asks for full tracebacks (any value but empty, 0, false, no)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _innermost(exc: BaseException):
    """The traceback entry of the frame that raised `exc` (None without a traceback)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb


def _project_path(tb) -> Path | None:
    """The raising frame's file relative to the project, or None outside it."""
    try:
        return Path(tb.tb_frame.f_code.co_filename).resolve().relative_to(PROJECT_ROOT)
    except ValueError:
        return None


def raised_in_project(exc: BaseException) -> bool:
    """Whether the innermost frame of `exc`'s traceback is project code (not a dependency)."""
    tb = _innermost(exc)
    rel = None if tb is None else _project_path(tb)
    return rel is not None and not _NOT_PROJECT.intersection(rel.parts)


def project_error(exc: BaseException) -> BaseException | None:
    """The outermost exception in `exc`'s chain (`__cause__`/`__context__`) that project code raised on
    purpose (a `CLEAN_ERRORS` type whose raise is in the project), or None.

    Outermost, not innermost: jsonargparse's wrappers are skipped (they are raised in site-packages), while
    a project error that re-words another project error (adding the file, say) wins over the one it wraps.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, CLEAN_ERRORS) and raised_in_project(exc):
            return exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


def error_location(exc: BaseException) -> str:
    """`path:line` (relative to the project) where `exc` was raised."""
    tb = _innermost(exc)
    if tb is None:
        return "?"
    path = _project_path(tb) or Path(tb.tb_frame.f_code.co_filename).resolve()
    return f"{path}:{tb.tb_lineno}"


def format_error(exc: BaseException) -> str:
    """The short report train.py prints: the message, then where it came from and how to see more."""
    return (
        f"error: {exc}\n"
        f"({type(exc).__name__} raised at {error_location(exc)}; "
        f"--debug or {DEBUG_ENV}=1 shows the full traceback)"
    )


def config_paths(args: list[str]) -> list[str]:
    """The files given with `--config X`, `--config=X`, `-c X` in a LightningCLI argument list."""
    paths = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            paths.append(args[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def check_config_files(args: list[str]) -> None:
    """Every `--config` file exists and holds at least one key (jsonargparse's own messages for these are
    `File does not exist` after a 60-line usage, and `Unexpected config: ` for an empty file)."""
    for value in config_paths(args):
        path = Path(value)
        if not path.is_file():
            if any(c in value for c in ":{\n"):
                continue  # an inline YAML string, which jsonargparse also accepts
            where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
            raise FileNotFoundError(f"config file not found: {value}{where}")
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            continue  # not YAML: jsonargparse reports the parse error with its position
        if content is None:
            raise ValueError(
                f"config file {value} is empty (no keys, only whitespace or comments): "
                "give it at least model/data/trainer keys, e.g. start from a file in configs/"
            )
