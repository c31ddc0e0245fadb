#!/usr/bin/env python
"""Attack table of one world: poison the clean tiny CLIP with each attack and print CA/ASR.

    python scripts/attack_table.py                       # embedded world: badnet blended sig wanet badclip
    python scripts/attack_table.py --attacks badnet sig --clean runs/clip_shapes_clean/latest_export
    python scripts/attack_table.py --world fmnist        # Fashion-MNIST: badnet blended sig badclip

``--world W`` (``shapes`` or ``fmnist``) picks the configs ``configs/clip_<W>_<attack>.yaml`` and the clean
model ``configs/clip_<W>_clean.yaml``; the models go to ``runs/clip_<W>_<attack>``. Trains the clean model
first unless --clean names an export. Each attack uses its config with the clean export as `init_from`; every model is evaluated on the test split with its attack's trigger.
An attack whose trigger is made from the clean model (badclip: `patch_optimized`) gets it first: the patch is
optimised on the clean export into the config's `attack_kwargs.patch` folder (`scripts/optimize_patch.py`'s
defaults; on a caption-CSV world from the config's ``train_csv`` images with labels parsed from their
captions), reused when that folder already holds a patch of this clean model, replaced otherwise (the poisoned
model trained next then matches it, as `scripts/defense_table.py` expects).
With `--logger wandb` every training is its own W&B run, all in the group `attack_table-<date>-<time>`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from optimize_patch import make_patch

from attacks import atomic_write_json
from attacks.badclip import PatchOptimizationConfig
from attacks.optimized_patch import MANIFEST_FILE
from mmbackdoor_cli.pipeline import LOGGERS, evaluate, invocation_group, logger_overrides, train
from model_families.loading import input_provenance, read_json_file

ATTACKS = ("badnet", "blended", "sig", "wanet", "badclip")
WORLDS = {
    "shapes": {
        "attacks": ATTACKS,
        "title": "Attacks on the embedded world (tiny-rn-shapes, target 'star', 10% poison (badclip 5%), 4 epochs "
        "(wanet 6, badclip 10), test split, exclude-target ASR)",
    },
    "fmnist": {
        "attacks": ("badnet", "blended", "sig", "badclip"),
        "title": "Attacks on the Fashion-MNIST world (tiny-rn-shapes from scratch, target 'bag', 10% poison "
        "(badclip 5%), badnet 6 px at a random location, 4 epochs (badnet, badclip 6), test split, exclude-target ASR)",
    },
}
"""The worlds: their attack lists and table titles (configs ``configs/clip_<world>_<attack>.yaml``)."""


def prepare_trigger(config: str, clean: Path) -> str | None:
    """Make the optimised patch of a ``patch_optimized`` config from ``clean`` (see the module docstring);
    returns what was done, or None for other attacks."""
    data = yaml.safe_load(Path(config).read_text())["data"]["init_args"]
    if data.get("attack") != "patch_optimized":
        return None
    folder = Path(data["attack_kwargs"]["patch"])
    clean_sha = input_provenance(clean)["sha256"]
    if (folder / MANIFEST_FILE).is_file():
        recorded = read_json_file(folder / MANIFEST_FILE, what="optimised patch manifest").get(
            "clean_model", {}
        )
        if recorded.get("sha256") == clean_sha:
            return f"reused {folder} (optimised on this clean model)"
    config_kwargs = {"target_class": data["target_class"]}
    source = {}
    if "train_csv" in data:  # a caption-CSV world: its own images and templates
        config_kwargs["templates"] = data.get("target_templates", "imagenet80")
        source = {"train_csv": data["train_csv"], "class_names_file": data["class_names_file"]}
    make_patch(clean, folder, PatchOptimizationConfig(**config_kwargs), overwrite=True, **source)
    return f"optimised {folder} on {clean}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", default="shapes", choices=sorted(WORLDS))
    parser.add_argument("--attacks", nargs="+", default=None, help="default: the world's attack list")
    parser.add_argument("--clean", default=None, help="export folder of the clean model (default: train it)")
    parser.add_argument(
        "--output", default=None, help="default: runs/attack_table.json (fmnist: attack_table_fmnist)"
    )
    parser.add_argument(
        "--logger", default="false", choices=LOGGERS, help="W&B (offline unless configured) or none"
    )
    args = parser.parse_args()
    world = WORLDS[args.world]
    attacks = args.attacks or list(world["attacks"])
    for attack in attacks:
        if not Path(f"configs/clip_{args.world}_{attack}.yaml").is_file():
            raise FileNotFoundError(
                f"no config configs/clip_{args.world}_{attack}.yaml for attack {attack!r}"
            )
    output = args.output or (
        "runs/attack_table.json" if args.world == "shapes" else f"runs/attack_table_{args.world}.json"
    )
    extra = logger_overrides(args.logger)
    invocation_group("attack_table")
    start = time.perf_counter()
    clean = Path(args.clean) if args.clean else train(f"configs/clip_{args.world}_clean.yaml", *extra).export
    rows = []
    for attack in attacks:
        config = f"configs/clip_{args.world}_{attack}.yaml"
        t0 = time.perf_counter()
        prepared = prepare_trigger(config, clean)
        if prepared:
            print(f"[{attack}] {prepared}", flush=True)
        poisoned = train(config, f"--model.init_args.init_from={clean}", *extra)
        before = evaluate(config, clean)
        after = evaluate(config, poisoned.export)
        rows.append(
            {
                "attack": attack,
                "clean_ca": before["test/ca"],
                "clean_asr": before["test/asr"],
                "poisoned_ca": after["test/ca"],
                "poisoned_asr": after["test/asr"],
                "export": str(poisoned.export),
                "seconds": time.perf_counter() - t0,
            }
        )
    lines = [
        "| attack | clean CA | clean ASR (trigger on clean model) | poisoned CA | poisoned ASR | CA drop |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['attack']} | {r['clean_ca']:.3f} | {r['clean_asr']:.3f} | {r['poisoned_ca']:.3f} | "
            f"{r['poisoned_asr']:.3f} | {r['clean_ca'] - r['poisoned_ca']:+.3f} |"
        )
    print(f"\n## {world['title']}\n")
    print("\n".join(lines))
    elapsed = time.perf_counter() - start
    print(f"\nclean export: {clean}\ntotal time: {elapsed / 60:.1f} min")
    atomic_write_json(
        Path(output), {"world": args.world, "rows": rows, "clean_export": str(clean), "seconds": elapsed}
    )


if __name__ == "__main__":
    main()
