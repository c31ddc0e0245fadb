#!/usr/bin/env python
"""Attack x defense table of one world (``--world shapes``, the embedded world, or ``fmnist``): CA and ASR of each poisoned model before and after
CleanCLIP, PAR and InverTune, whether target identification found the true target, and the ASR of the
inverted trigger on the poisoned model.

    python scripts/defense_table.py [--world shapes|fmnist] [--attacks badnet blended sig wanet badclip] \\
        [--defenses cleanclip par invertune] [--root runs/defense_table] [--threads 2] [--logger wandb]

For world ``W`` and each attack ``A`` the poisoned model is ``runs/clip_W_A/latest_export`` (made by
``configs/clip_W_A.yaml``; the fmnist attacks are badnet, blended, sig and badclip; ``badclip``'s optimised patch is the config's ``attack_kwargs.patch``
folder, which ``scripts/attack_table.py`` makes from the clean model). Each defense runs through
``train.py``'s CLI in this process with ``configs/<defense>_clip_W.yaml``; its data block gets the attack's trigger settings, which the
defender datamodule uses only to *report* ASR. Every model (``none`` = the poisoned one) is then scored
by ``evaluate.py``'s :func:`evaluate_checkpoint` with the attack's own config on the test split, so all
numbers come from the same evaluation code. "InverTune clean→target" is the tuned model's rate of clean
non-target test images predicted as the target: the floor under its ASR (a model that confuses circles
with stars shows that confusion on triggered images too). Prints a markdown table and writes JSON
(``<root>/table.json``; default root ``runs/defense_table``, ``runs/defense_table_fmnist`` for fmnist) with every metric, the InverTune reports and the wall times. With ``--logger wandb``
each defense run is its own W&B run named ``<attack>/<defense>``, all in the group
``defense_table-<date>-<time>`` (or ``$MMBACKDOOR_WANDB_GROUP``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attacks.io import atomic_write_json  # noqa: E402
from attacks.optimized_patch import load_patch_artifact  # noqa: E402
from mmbackdoor_cli.cli import main as cli_main  # noqa: E402
from mmbackdoor_cli.evaluate import evaluate_checkpoint, format_metric  # noqa: E402
from mmbackdoor_cli.pipeline import LOGGERS, invocation_group, logger_overrides  # noqa: E402

ATTACKS = ("badnet", "blended", "sig", "wanet", "badclip")
WORLD_ATTACKS = {"shapes": ATTACKS, "fmnist": ("badnet", "blended", "sig", "badclip")}
WORLD_TITLES = {
    "shapes": "Defenses on the embedded world (tiny-rn-shapes, test split)",
    "fmnist": "Defenses on the Fashion-MNIST world (tiny-rn-shapes, test split)",
}
DEFENSES = ("cleanclip", "par", "invertune")
DEFENSE_NAMES = {"none": "none", "cleanclip": "CleanCLIP", "par": "PAR", "invertune": "InverTune"}
REPORT_KEYS = ("attack", "attack_kwargs", "target_class", "poison_seed", "target_templates", "world_seed")
"""Data keys copied from the attack config into the defender's: the real trigger, for reporting only."""


def attack_data_overrides(attack_config: Path) -> list[str]:
    """``--data.init_args.K=V`` for the trigger/target keys of an attack config (reporting only)."""
    config = yaml.safe_load(attack_config.read_text())
    data = config.get("data", {}).get("init_args", {})
    if data.get("attack") is None or data.get("target_class") is None:
        raise ValueError(f"{attack_config}: data.init_args needs 'attack' and 'target_class'")
    return [f"--data.init_args.{key}={_cli_value(data[key])}" for key in REPORT_KEYS if key in data]


def _cli_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def run_defense(
    config: Path, victim: Path, run_root: Path, overrides: list[str], logger: str = "false"
) -> tuple[Path, object, float]:
    """Fit one defense through the train.py CLI; returns (export folder, LightningModule, seconds).

    With ``logger="wandb"`` the run is a W&B run named ``<run_root's parent>/<run_root>`` (e.g.
    ``badnet/cleanclip``) in this invocation's group."""
    start = time.perf_counter()
    if logger == "wandb":
        name = [f"--trainer.logger.init_args.name={run_root.parent.name}/{run_root.name}"]
    else:
        name = []
    cli = cli_main(
        [
            "fit",
            "--config",
            str(config),
            f"--model.init_args.victim={victim}",
            *logger_overrides(logger),
            *name,
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={run_root}",
            *overrides,
        ]
    )
    export = getattr(cli.trainer, "mmbackdoor_export", None)
    if export is None:
        raise RuntimeError(f"{config}: the run wrote no export (see {run_root})")
    return Path(export), cli.model, time.perf_counter() - start


def score(attack_config: Path, checkpoint: Path, eval_root: Path) -> dict[str, float]:
    metrics = evaluate_checkpoint(
        str(attack_config),
        str(checkpoint),
        "test",
        ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"],
        root=str(eval_root),
    )
    return {
        "ca": metrics["test/ca"],
        "asr": metrics["test/asr"],
        "clean_target_rate": metrics.get("test/clean_target_rate"),
    }


def fmt(value: float | None) -> str:
    return format_metric(value, digits=3)  # nan stays nan: "-" is only for what was not measured


def markdown(results: dict, defenses: list[str]) -> str:
    columns = ["none", *defenses]
    header = ["attack"]
    for d in columns:
        header += [f"{DEFENSE_NAMES[d]} CA", f"{DEFENSE_NAMES[d]} ASR"]
    with_invertune = "invertune" in defenses
    if with_invertune:
        header += ["InverTune clean→target", "identified target (true)", "margin", "inverted-trigger ASR"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for attack, row in results.items():
        cells = [attack]
        for d in columns:
            cells += [fmt(row["scores"].get(d, {}).get("ca")), fmt(row["scores"].get(d, {}).get("asr"))]
        if with_invertune and "invertune" in row:
            info = row["invertune"]
            mark = "yes" if info["target_found"] else "no"
            cells += [
                fmt(row["scores"].get("invertune", {}).get("clean_target_rate")),
                f"{info['identified_target']} ({info['true_target']}): {mark}",
                fmt(info.get("margin")),
                fmt(info["inverted_asr"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def removed(asr_after: float, ca_drop: float) -> bool:
    """The issue's removal criterion: ASR <= 0.05 after the defense, CA dropping by at most 0.05."""
    return asr_after <= 0.05 and ca_drop <= 0.05


def acceptance(results: dict) -> dict:
    """The issue's acceptance counts over the attacks (of one world)."""
    rows = [r for r in results.values() if "invertune" in r and "none" in r["scores"]]
    found = sum(r["invertune"]["target_found"] for r in rows)
    removed_count = sum(
        r["scores"]["none"]["asr"] >= 0.90
        and removed(
            r["scores"]["invertune"]["asr"], r["scores"]["none"]["ca"] - r["scores"]["invertune"]["ca"]
        )
        for r in rows
    )
    reproduced = sum(r["invertune"]["inverted_asr"] >= 0.80 for r in rows)
    return {
        "attacks": len(rows),
        "target_found": found,
        "asr_removed_ca_kept": removed_count,
        "inverted_trigger_asr_ge_0.80": reproduced,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", default="shapes", choices=sorted(WORLD_ATTACKS))
    parser.add_argument("--attacks", nargs="+", default=None, help="default: the world's attack list")
    parser.add_argument("--defenses", nargs="+", default=list(DEFENSES), choices=DEFENSES)
    parser.add_argument("--models", default="runs", help="folder holding clip_<world>_<attack>/latest_export")
    parser.add_argument("--configs", default="configs")
    parser.add_argument(
        "--root",
        default=None,
        help="where defense runs and table.json go (default: runs/defense_table[_<world>])",
    )
    parser.add_argument("--output", default=None, help="JSON file (default: <root>/table.json)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--logger", default="false", choices=LOGGERS, help="W&B (offline unless configured) or none"
    )
    parser.add_argument(
        "--extra",
        nargs="*",
        default=[],
        metavar="DEFENSE:--key=value",
        help="extra CLI overrides for one defense, e.g. invertune:--model.init_args.iterations=50",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    world = args.world
    attacks = args.attacks or list(WORLD_ATTACKS[world])
    default_root = "runs/defense_table" if world == "shapes" else f"runs/defense_table_{world}"
    configs, root = Path(args.configs), Path(args.root or default_root)
    extra: dict[str, list[str]] = {}
    for item in args.extra:
        defense, sep, override = item.partition(":")
        if not sep or defense not in DEFENSES:
            raise ValueError(f"--extra expects DEFENSE:--key=value with DEFENSE in {DEFENSES}, got {item!r}")
        extra.setdefault(defense, []).append(override)

    # fail before any work when an input is missing
    jobs = []
    for attack in attacks:
        attack_config = configs / f"clip_{world}_{attack}.yaml"
        victim = Path(args.models) / f"clip_{world}_{attack}" / "latest_export"
        for path, what in ((attack_config, "attack config"), (victim, "poisoned model")):
            if not path.exists():
                raise FileNotFoundError(
                    f"{what} not found: {path} (train it with configs/clip_{world}_{attack}.yaml, or "
                    f"python scripts/attack_table.py --world {world})"
                )
        for defense in args.defenses:
            if not (configs / f"{defense}_clip_{world}.yaml").is_file():
                raise FileNotFoundError(
                    f"defense config not found: {configs / f'{defense}_clip_{world}.yaml'}"
                )
        data = yaml.safe_load(attack_config.read_text()).get("data", {}).get("init_args", {})
        if data.get("attack") == "patch_optimized":
            load_patch_artifact(data.get("attack_kwargs", {}).get("patch", ""))  # names a missing patch
        jobs.append((attack, attack_config, victim.resolve()))

    invocation_group("defense_table")
    started = time.perf_counter()
    results: dict[str, dict] = {}
    for attack, attack_config, victim in jobs:
        overrides = attack_data_overrides(attack_config)
        true_target = yaml.safe_load(attack_config.read_text())["data"]["init_args"]["target_class"]
        row: dict = {"victim": str(victim), "scores": {}, "seconds": {}, "exports": {}}
        t0 = time.perf_counter()
        row["scores"]["none"] = score(attack_config, victim, root / "eval")
        row["seconds"]["eval_none"] = time.perf_counter() - t0
        for defense in args.defenses:
            run_root = root / attack / defense
            export, module, seconds = run_defense(
                configs / f"{defense}_clip_{world}.yaml",
                victim,
                run_root,
                overrides + extra.get(defense, []),
                args.logger,
            )
            row["seconds"][defense] = seconds
            row["exports"][defense] = str(export)
            t0 = time.perf_counter()
            row["scores"][defense] = score(attack_config, export, root / "eval")
            row["seconds"][f"eval_{defense}"] = time.perf_counter() - t0
            if defense == "invertune":
                report = module.report()
                inversion = report["inversion"]
                row["invertune"] = {
                    "identified_target": inversion["target"],
                    "true_target": true_target,
                    "target_found": inversion["target"] == true_target,
                    "ranking": inversion.get("ranking"),
                    "margin": inversion.get("margin"),
                    "inverted_asr": inversion["inverted_asr"],
                    "report": report,
                }
            del module
        results[attack] = row
        print(f"[{attack}] done after {time.perf_counter() - started:.0f} s: {row['scores']}", flush=True)

    total = time.perf_counter() - started
    table = markdown(results, args.defenses)
    summary = acceptance(results)
    print(f"\n## {WORLD_TITLES[world]}\n\n" + table)
    print(f"\nacceptance counts: {summary}")
    print(f"total wall time: {total / 60:.1f} min ({args.threads} threads)")
    output = Path(args.output or root / "table.json")
    atomic_write_json(
        output,
        {
            "world": world,
            "command": " ".join(["python", "scripts/defense_table.py", *(argv or sys.argv[1:])]),
            "results": results,
            "table": table,
            "acceptance": summary,
            "total_seconds": total,
            "threads": args.threads,
        },
    )
    print(f"results written to {output}")
    return {"results": results, "acceptance": summary, "total_seconds": total}


if __name__ == "__main__":
    main()
