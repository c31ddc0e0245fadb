#!/usr/bin/env python
"""InverTune step 1 alone: which class each identification setting picks for every poisoned model of a
world (and the clean model, which has no target), with the margin and the member of a union that found
it. Identification needs only the defender's clean images, so this is how its settings are compared.

    python scripts/identification_table.py --world fmnist \\
        --setting shipped --setting 'paper:uap=patch;uap_score=rise;uap_area_fraction=0.03;uap_eps=0.0314'

A setting is ``NAME`` (the config's own settings) or ``NAME:key=value;...`` with ``TriggerInversion`` keys
(YAML values). The datamodule and zero-shot templates are those of ``configs/invertune_clip_<world>.yaml``
(its defender clean set); the models are ``<models>/clip_<world>_<attack>/latest_export``. Prints a markdown
table (one row per setting, one cell per model: the identified class, its margin, a tick when it is the
attack's target) and writes ``<output>`` (JSON). Deterministic for a fixed ``--seed`` at one thread.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import lightning as L
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from defense_table import WORLD_ATTACKS  # noqa: E402
from invertune_sweep import parse_setting, settings_table  # noqa: E402

from attacks.io import atomic_write_json  # noqa: E402
from defenses.invertune import IdentifyConfig, identify  # noqa: E402
from defenses.invertune.clean_images import CleanImages  # noqa: E402
from defenses.victim import load_victim  # noqa: E402
from model_families.clip import zero_shot_weights  # noqa: E402

REPORT_ONLY = ("attack", "attack_kwargs", "target_class", "target_templates")


def defender_data(config: dict):
    """The config's datamodule without its reporting trigger, set up for fitting."""
    data = config["data"]
    module, _, name = data["class_path"].rpartition(".")
    init = {k: v for k, v in data["init_args"].items() if k not in REPORT_ONLY}
    dm = getattr(importlib.import_module(module), name)(**init)
    dm.setup("fit")
    return dm


def identify_on(victim: Path, dm, templates: str, config: IdentifyConfig, seed: int) -> dict:
    """Step 1 on one model; the class names, margin, union member and every class's statistic."""
    L.seed_everything(seed, verbose=False)
    bundle = load_victim(str(victim))
    model, normalize = bundle.model.eval(), bundle.normalize
    device = torch.device("cpu")
    text = zero_shot_weights(model, bundle.tokenizer, dm.class_names, templates, device)
    clean = CleanImages(dm.train_dataloader(), device)
    _, shape = clean.size()
    found = identify(model, clean, text, normalize, dm.class_names, tuple(shape[-2:]), config)
    ident = found.identification
    return {
        "target": dm.class_names[found.target],
        "runner_up": dm.class_names[ident.ranking[1]],
        "margin": ident.margin,
        "low_confidence": found.confidence.low_confidence,
        "source": ident.source,
        "ranked_by": {dm.class_names[i]: float(ident.ranked_by[i]) for i in ident.ranking},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", default="shapes", choices=sorted(WORLD_ATTACKS))
    parser.add_argument("--setting", action="append", default=None, help="NAME[:key=value;...]")
    parser.add_argument("--attacks", nargs="+", default=None, help="default: the world's attack list")
    parser.add_argument("--models", default="runs", help="folder holding clip_<world>_<attack>/latest_export")
    parser.add_argument("--no-clean", action="store_true", help="skip the clean model (clip_<world>_clean)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="global seed and the UAPs' seed (unless the config or a setting sets seed)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="default: runs/identification_<world>.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    world = args.world
    config = yaml.safe_load((ROOT / "configs" / f"invertune_clip_{world}.yaml").read_text())
    callback = next(
        c["init_args"] for c in config["trainer"]["callbacks"] if c["class_path"].endswith("TriggerInversion")
    )
    templates = config["model"]["init_args"].get("zero_shot_templates", "embedded")
    models = {
        a: Path(args.models) / f"clip_{world}_{a}" / "latest_export"
        for a in args.attacks or WORLD_ATTACKS[world]
    }
    if not args.no_clean:
        models["clean"] = Path(args.models) / f"clip_{world}_clean" / "latest_export"
    for name, path in models.items():
        if not path.exists():
            raise FileNotFoundError(
                f"{name} model not found: {path} (python scripts/attack_table.py --world {world})"
            )
    targets = {
        a: yaml.safe_load((ROOT / "configs" / f"clip_{world}_{a}.yaml").read_text())["data"]["init_args"][
            "target_class"
        ]
        for a in models
        if a != "clean"
    }
    dm = defender_data(config)
    results: dict[str, dict] = {}
    for text in args.setting or ["shipped"]:
        name, overrides, callback_overrides = parse_setting(text)
        settings = {"seed": args.seed, **callback, **overrides, **callback_overrides}
        identify_config = IdentifyConfig.from_callback_args(settings)
        results[name] = {"settings": {k: v for k, v in settings.items() if k.startswith("uap")}, "models": {}}
        for model_name, path in models.items():
            row = identify_on(path, dm, templates, identify_config, args.seed)
            row["true_target"] = targets.get(model_name)
            results[name]["models"][model_name] = row
            print(
                f"[{name}] {model_name}: {row['target']} (margin {row['margin']:.3f}, {row['source']})",
                flush=True,
            )

    def cell(row: dict) -> tuple[str, bool]:
        hit = row["true_target"] is not None and row["target"] == row["true_target"]
        low = ", low" if row["low_confidence"] else ""
        return f"{row['target']} ({row['margin']:.3f}{low}){' ✓' if hit else ''}", hit

    by_setting = {name: result["models"] for name, result in results.items()}
    table = settings_table(by_setting, list(models), cell, "found", of=len(targets))
    print("\n" + table)
    output = Path(args.output or f"runs/identification_{world}.json")
    atomic_write_json(
        output, {"command": " ".join(["python", *sys.argv]), "results": results, "table": table}
    )
    return results


if __name__ == "__main__":
    main()
