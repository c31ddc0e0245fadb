#!/usr/bin/env python
"""Attack table on the embedded world: poison the clean tiny CLIP with each attack and print CA/ASR.

    python scripts/attack_table.py                       # badnet blended sig wanet badclip
    python scripts/attack_table.py --attacks badnet sig --clean runs/clip_shapes_clean/latest_export

Trains the clean model first unless --clean names an export. Each attack uses configs/clip_shapes_<attack>.yaml
with the clean export as `init_from`; every model is evaluated on the test split with its attack's trigger.
An attack whose trigger is made from the clean model (badclip: `patch_optimized`) gets it first: the patch is
optimised on the clean export into the config's `attack_kwargs.patch` folder (`scripts/optimize_patch.py`'s
defaults), reused when that folder already holds a patch of this clean model, replaced otherwise (the poisoned
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
    make_patch(clean, folder, PatchOptimizationConfig(target_class=data["target_class"]), overwrite=True)
    return f"optimised {folder} on {clean}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--clean", default=None, help="export folder of the clean model (default: train it)")
    parser.add_argument("--output", default="runs/attack_table.json")
    parser.add_argument(
        "--logger", default="false", choices=LOGGERS, help="W&B (offline unless configured) or none"
    )
    args = parser.parse_args()
    extra = logger_overrides(args.logger)
    invocation_group("attack_table")
    start = time.perf_counter()
    clean = Path(args.clean) if args.clean else train("configs/clip_shapes_clean.yaml", *extra).export
    rows = []
    for attack in args.attacks:
        config = f"configs/clip_shapes_{attack}.yaml"
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
    print(
        "\n## Attacks on the embedded world (tiny-rn-shapes, target 'star', 10% poison (badclip 5%), 4 epochs "
        "(wanet, badclip 6), test split, exclude-target ASR)\n"
    )
    print("\n".join(lines))
    elapsed = time.perf_counter() - start
    print(f"\nclean export: {clean}\ntotal time: {elapsed / 60:.1f} min")
    atomic_write_json(Path(args.output), {"rows": rows, "clean_export": str(clean), "seconds": elapsed})


if __name__ == "__main__":
    main()
