"""Shared helpers of the multi-stage scripts (DiSP pipeline, modality-collapse and domain-shift studies): run a config
through train.py's CLI in-process, reuse a cached export, measure an export."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mmbackdoor_cli.cli import MMBackdoorCLI  # noqa: E402
from mmbackdoor_cli.evaluate import format_metric  # noqa: E402
from mmbackdoor_cli.pipeline import TrainedRun, logger_overrides, train  # noqa: E402

QUIET = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def run_fit(config: str, root: Path, *overrides: str, logger: str = "false") -> tuple[TrainedRun, float]:
    """``python train.py --config config --trainer.default_root_dir=root *overrides`` in this process;
    ``logger="wandb"`` makes it a W&B run named ``<root's name>/version_N``."""
    start = time.perf_counter()
    run = train(config, f"--trainer.default_root_dir={root}", *QUIET, *logger_overrides(logger), *overrides)
    return run, time.perf_counter() - start


def cached(
    config: str, root: Path, given: str | None, retrain: bool, logger: str, *overrides: str
) -> tuple[Path, float]:
    """``given``, else ``<root>/latest_export`` when it exists (and not ``retrain``), else a fresh run; the
    export and the seconds taken."""
    if given is not None:
        if not Path(given).exists():
            raise FileNotFoundError(f"{config}: the given export {given} does not exist")
        return Path(given), 0.0
    if (root / "latest_export").exists() and not retrain:
        return (root / "latest_export").resolve(), 0.0
    run, seconds = run_fit(config, root, *overrides, logger=logger)
    return run.export, seconds


def measure(
    config: str, export: str | Path, root: Path, *overrides: str, split: str = "test"
) -> tuple[dict, float]:
    """Test (or val) metrics of ``export`` under ``config``'s data, trigger and target (+ ``overrides``)."""
    start = time.perf_counter()
    args = [
        "--config",
        config,
        f"--model.init_args.init_from={export}",
        f"--trainer.default_root_dir={root}",
        "--trainer.logger=false",
        *QUIET,
        *overrides,
    ]
    cli = MMBackdoorCLI(args=args, run=False)
    run = cli.trainer.test if split == "test" else cli.trainer.validate
    results = run(cli.model, datamodule=cli.datamodule, verbose=False)
    metrics = {}
    for part in results:
        metrics.update({k.split("/", 1)[1]: float(v) for k, v in part.items()})
    return metrics, time.perf_counter() - start


def generation_override(config: str, key: str = "generation", **settings) -> str:
    """``--model.init_args.<key>={...}``: the config's own ``model.init_args.generation`` (the sampler every
    stage uses) with ``settings`` (e.g. ``cache="prefix"``) on top, so a script changes one setting without
    repeating the others."""
    import yaml

    base = yaml.safe_load(Path(config).read_text())["model"]["init_args"].get("generation") or {}
    merged = {**base, **settings}
    return f"--model.init_args.{key}={{" + ", ".join(f"{k}: {v}" for k, v in merged.items()) + "}"


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name (from ``cpuinfo``; ``platform.processor()`` where that file is missing). The
    embedded DiSP table depends on it: the same code and packages give other numbers on an Intel Xeon than on
    an AMD EPYC (``docs/disp.md``, Results)."""
    import platform

    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, str]:
    """The versions a result depends on (Python, platform, CPU model and the numerical packages), for results
    JSON."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_model()}
    for name in ("torch", "transformers", "lightning", "numpy", "peft", "safetensors"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def fmt(value) -> str:
    return format_metric(value, digits=3)  # nan stays nan: "-" is only for what was not measured


def markdown(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with ``columns`` = [(key, header), ...]."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.get(k) if isinstance(row.get(k), str) else fmt(row.get(k)) for k, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(results: dict, out: Path, output: str | None) -> Path:
    """Write ``results`` to ``output`` (default ``<out>/results-<time>.json``) and say where."""
    import datetime as dt

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(output or out / f"results-{stamp}.json")
    dump(path, results)
    print(f"results written to {path}")
    return path


def dump(path: Path, data) -> None:
    from attacks import atomic_write_json

    atomic_write_json(path, json.loads(json.dumps(data, default=str)))
