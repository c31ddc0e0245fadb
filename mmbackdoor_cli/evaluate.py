"""Evaluate checkpoints on clean and triggered data: a markdown table on stdout and a JSON file.

    python evaluate.py --config configs/clip_shapes_badnet.yaml \
        --checkpoint clean=runs/clip_shapes_clean/latest_export \
        --checkpoint poisoned=runs/clip_shapes_badnet/latest_export \
        --output results.json [--split test] [-- --data.init_args.attack=blended ...]

The config gives the data, the trigger and the target; each checkpoint (an export folder or a Lightning
.ckpt) is loaded through ``--model.init_args.init_from``. Arguments after ``--`` are passed on to the
config as dotted overrides. The JSON records the config file, the overrides and every metric.

A checkpoint with non-finite (NaN/inf) weights is refused, naming it and its first bad tensors (a diverged
model would otherwise score ASR 0.000, like a perfect defense); ``--allow-non-finite`` evaluates it anyway
and flags it. A non-finite metric is printed as ``nan``/``inf`` (``-`` means not measured) and written to
the JSON as ``null`` with the reason under the row's ``invalid`` key.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

from attacks import atomic_write_json
from mmbackdoor_cli.cli import MMBackdoorCLI
from model_families.finite import assert_finite_state, non_finite_tensors

METRIC_COLUMNS = ("ca", "asr", "loss")


def parse_checkpoint(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    return (name, path) if sep else (Path(spec).parent.name or spec, spec)


def evaluate_checkpoint(
    config: str,
    checkpoint: str,
    split: str = "test",
    overrides: list[str] | None = None,
    root: str = "runs/eval",
    allow_non_finite: bool = False,
) -> dict[str, float]:
    """Metrics of one checkpoint (`{split}/ca`, `{split}/asr`, ...) under `config` (+ `overrides`).

    Non-finite weights raise :class:`~model_families.finite.NonFiniteError`; with `allow_non_finite` the
    model is evaluated and the result lists them under ``non_finite_weights``.
    """
    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if not Path(config).is_file():
        raise FileNotFoundError(f"config not found: {config}")
    args = [
        "--config",
        config,
        f"--model.init_args.init_from={checkpoint}",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={root}",
        "--data.init_args.poison_rate=0",
        "--data.init_args.poison_count=null",
        *(overrides or []),
    ]
    cli = MMBackdoorCLI(args=args, run=False)
    state = cli.model.state_dict()
    bad = non_finite_tensors(state) if allow_non_finite else []
    if not allow_non_finite:
        assert_finite_state(
            state,
            where=f"checkpoint {checkpoint}",
            hint="not evaluated; --allow-non-finite evaluates it, flagged",
        )
    run = cli.trainer.test if split == "test" else cli.trainer.validate
    results = run(cli.model, datamodule=cli.datamodule, verbose=False)
    metrics = {k: float(v) for k, v in results[0].items()}
    module_metrics = getattr(cli.model, "metrics", None)
    if module_metrics is not None and f"{split}_asr" in module_metrics:
        metrics["asr_variant"] = module_metrics[f"{split}_asr"].variant
    if bad:
        metrics["non_finite_weights"] = bad
    return metrics


def markdown_table(rows: dict[str, dict], split: str) -> str:
    keys = [k for k in METRIC_COLUMNS if any(f"{split}/{k}" in r for r in rows.values())]
    extra = sorted(
        {k for r in rows.values() for k in r if k.startswith(f"{split}/") and k.split("/", 1)[1] not in keys}
    )
    header = ["model", *[k.upper() for k in keys], *extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in rows.items():
        cells = [
            name,
            *[format_metric(r.get(f"{split}/{k}")) for k in keys],
            *[format_metric(r.get(k)) for k in extra],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    variants = {r.get("asr_variant") for r in rows.values()} - {None}
    if variants:
        lines.append(
            f"\nASR variant: {', '.join(sorted(variants))} (exclude-target: images of the target class are not counted)"
        )
    if any(isinstance(v, float) and not math.isfinite(v) for r in rows.values() for v in r.values()):
        lines.append(
            "\nnan/inf: the metric is non-finite (null in the JSON, reason under `invalid`); -: not measured"
        )
    for name, r in rows.items():
        if r.get("non_finite_weights"):
            lines.append(
                f"\nWARNING: {name} has non-finite weights: {', '.join(r['non_finite_weights'][:5])}"
            )
    return "\n".join(lines)


def format_metric(value: float | None, digits: int = 4) -> str:
    """A table cell: ``-`` for a metric that was not measured (None), ``nan``/``inf``/``-inf`` for a
    non-finite one (never hidden as ``-``), else the value with ``digits`` decimals."""
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", required=True, help="experiment YAML (data, trigger, target, model class)"
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="NAME=PATH or PATH of an export folder / .ckpt; repeat to compare models",
    )
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="evaluate checkpoints with NaN/inf weights (refused by default); the result flags them",
    )
    parser.add_argument(
        "--output", default=None, help="JSON file to write (default: runs/eval/<config>-<time>.json)"
    )
    args = parser.parse_args(argv)
    rows = {}
    for spec in args.checkpoint:
        name, path = parse_checkpoint(spec)
        rows[name] = evaluate_checkpoint(
            args.config, path, args.split, overrides, allow_non_finite=args.allow_non_finite
        )
        rows[name]["checkpoint"] = path
    if rank_zero_only.rank != 0:  # DDP evaluation: every rank has the synced metrics; rank 0 reports
        return rows
    table = markdown_table(rows, args.split)
    print(table)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = Path(args.output or f"runs/eval/{Path(args.config).stem}-{stamp}.json")
    atomic_write_json(
        output,
        {
            "config": args.config,
            "overrides": overrides,
            "split": args.split,
            "results": rows,
            "created_at": stamp,
        },
    )
    print(f"\nresults written to {output}")
    return rows
