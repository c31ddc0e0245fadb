#!/usr/bin/env python
"""InverTune tuning ablations on fixed inversions: each setting runs activation tuning for every attack
on the trigger that an earlier run inverted (``TriggerInversion.load_from``), and reports the
validation-split ASR and CA drop (the test split stays for the final table).

    python scripts/defense_table.py --defenses invertune          # inverts and saves the triggers
    python scripts/invertune_sweep.py --inversions runs/defense_table \\
        --setting base --setting 'views:augment={flip_p: 0.5, max_shift: 2}' \\
        --setting 'views+inv:augment={flip_p: 0.5, max_shift: 2};invariance_weight=0.5'

A setting is ``NAME`` or ``NAME:key=value;key=value`` with ``model.init_args`` keys (YAML values);
``cb.KEY`` sets a ``TriggerInversion`` key instead (``cb.load_from=null`` inverts again). Prints one
markdown table (ASR / CA drop per attack; a tick where ASR <= 0.05 and the drop <= 0.05) and writes
``<root>/sweep.json``. ``--val-size 5000`` scores on more scenes of the validation stream (the default
1000 scenes put a standard error of about 0.01 on a CA drop).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from defense_table import WORLD_ATTACKS, attack_data_overrides, removed, run_defense  # noqa: E402

from attacks.io import atomic_write_json  # noqa: E402
from mmbackdoor_cli.pipeline import LOGGERS, invocation_group  # noqa: E402


def parse_setting(text: str) -> tuple[str, dict, dict]:
    """``NAME:key=value;...`` -> (name, model overrides, callback overrides)."""
    name, _, body = text.partition(":")
    model, callback = {}, {}
    for item in filter(None, (part.strip() for part in body.split(";"))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"setting {text!r}: expected key=value, got {item!r}")
        target, key = (callback, key[3:]) if key.startswith("cb.") else (model, key)
        target[key] = yaml.safe_load(value)
    return name, model, callback


def data_overrides(attack: str, val_size: int | None = None, world: str = "shapes") -> list[str]:
    """The CLI overrides of one attack's reporting trigger (and of the validation size, when given)."""
    overrides = attack_data_overrides(ROOT / "configs" / f"clip_{world}_{attack}.yaml")
    if val_size is not None:
        if world != "shapes":
            raise ValueError(
                f"--val-size needs the embedded world (its validation stream); {world} has a fixed val folder"
            )
        if val_size < 1:
            raise ValueError(f"--val-size must be >= 1, got {val_size}")
        overrides.append(f"--data.init_args.val_size={val_size}")
    return overrides


def settings_table(
    results: dict[str, dict[str, dict]],
    columns: list[str],
    cell: Callable[[dict], tuple[str, bool]],
    tally: str,
    of: int | None = None,
) -> str:
    """A markdown table with one row per setting (``results``: setting -> column -> row) and one cell per
    column (``cell(row)`` -> its text and whether it counts); the last column, ``tally``, is the count of
    counting cells (``count/of`` when ``of`` is given)."""
    lines = ["| setting | " + " | ".join(columns) + f" | {tally} |", "|" + "---|" * (len(columns) + 2)]
    for name, rows in results.items():
        cells = [cell(rows[column]) for column in columns]
        count = sum(ok for _, ok in cells)
        total = f"{count}/{of}" if of is not None else f"{count}"
        lines.append(f"| {name} | " + " | ".join(text for text, _ in cells) + f" | {total} |")
    return "\n".join(lines)


def latest_inversion(runs: Path) -> Path:
    """The ``trigger_inversion`` folder of the newest ``version_N`` run under ``runs`` that has one."""
    found = sorted(
        (int(path.parent.parent.name.split("_")[-1]), path.parent)
        for path in runs.glob("version_*/trigger_inversion/trigger.safetensors")
    )
    if not found:
        raise FileNotFoundError(
            f"no saved inversion (version_N/trigger_inversion/trigger.safetensors) under {runs}"
        )
    return found[-1][1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--inversions",
        default=None,
        help="a defense_table root (<A>/invertune/version_N/...) or an earlier setting of a sweep "
        "(<root>/<name>, holding <A>/version_N/...): steps 1-2 are reused; without it every run "
        "identifies and inverts again",
    )
    parser.add_argument("--setting", action="append", required=True, help="NAME[:key=value;...]")
    parser.add_argument("--world", default="shapes", choices=sorted(WORLD_ATTACKS))
    parser.add_argument("--attacks", nargs="+", default=None, help="default: the world's attack list")
    parser.add_argument("--models", default="runs", help="folder holding clip_<world>_<attack>/latest_export")
    parser.add_argument("--config", default=None, help="default: configs/invertune_clip_<world>.yaml")
    parser.add_argument("--root", default=None, help="default: runs/invertune_sweep[_<world>]")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--logger",
        default="false",
        choices=LOGGERS,
        help="W&B (offline unless configured; one run per setting and attack, grouped) or none",
    )
    parser.add_argument(
        "--val-size",
        type=int,
        default=None,
        help="validation scenes to score on (default: the config's data.val_size); more scenes from "
        "the same validation stream make the choice between settings less noisy",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    world = args.world
    attacks = args.attacks or list(WORLD_ATTACKS[world])
    base = yaml.safe_load(Path(args.config or f"configs/invertune_clip_{world}.yaml").read_text())
    root = Path(
        args.root or ("runs/invertune_sweep" if world == "shapes" else f"runs/invertune_sweep_{world}")
    )
    invocation_group("invertune_sweep")
    results: dict[str, dict] = {}
    for text in args.setting:
        name, model, callback = parse_setting(text)
        results[name] = {"model": model, "callback": callback, "attacks": {}}
        for attack in attacks:
            config = copy.deepcopy(base)
            if args.inversions is not None:
                runs = Path(args.inversions) / attack
                folder = latest_inversion(runs / "invertune" if (runs / "invertune").is_dir() else runs)
                config["trainer"]["callbacks"][0]["init_args"]["load_from"] = str(folder)
            config["trainer"]["callbacks"][0]["init_args"].update(callback)
            config["model"]["init_args"].update(model)
            path = root / f"{name}_{attack}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(config))
            start = time.perf_counter()
            victim = (Path(args.models) / f"clip_{world}_{attack}" / "latest_export").resolve()
            overrides = data_overrides(attack, args.val_size, world)
            attack_config = ROOT / "configs" / f"clip_{world}_{attack}.yaml"
            true_target = yaml.safe_load(attack_config.read_text())["data"]["init_args"]["target_class"]
            _, module, _ = run_defense(path, victim, root / name / attack, overrides, args.logger)
            metrics = {k: float(v) for k, v in module.trainer.callback_metrics.items()}
            row = {
                "asr": metrics["val/asr"],
                "ca_drop": metrics["before/ca"] - metrics["val/ca"],
                "before_asr": metrics["before/asr"],
                "before_ca": metrics["before/ca"],
                "inverted_asr": metrics.get("val/inverted_asr"),
                "best_iteration": module.tuning_result.best_iteration,
                "identified_target": module.report()["inversion"]["target"],
                "true_target": true_target,
                "seconds": time.perf_counter() - start,
            }
            results[name]["attacks"][attack] = row
            print(f"[{name}] {attack}: ASR {row['asr']:.3f}, CA drop {row['ca_drop']:+.3f}", flush=True)
            del module

    def cell(row: dict) -> tuple[str, bool]:
        ok = removed(row["asr"], row["ca_drop"])
        wrong = (
            "" if row["identified_target"] == row["true_target"] else f" (target {row['identified_target']}!)"
        )
        return f"{row['asr']:.3f} / {row['ca_drop']:+.3f}{' ✓' if ok else ''}{wrong}", ok

    print("\n" + settings_table({n: r["attacks"] for n, r in results.items()}, attacks, cell, "removed"))
    atomic_write_json(root / "sweep.json", {"command": " ".join(sys.argv), "results": results})
    return results


if __name__ == "__main__":
    main()
