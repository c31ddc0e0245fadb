#!/usr/bin/env python
"""CLIP quickstart on the embedded world: train a clean tiny CLIP, poison it with BadNet by fine-tuning,
evaluate both on clean and triggered test images, and print the table.

    python scripts/quickstart.py            (what `make demo` runs)
    python scripts/quickstart.py --logger false   (no W&B files)

With W&B each training is its own run (in its run folder, named after it, e.g. clip_shapes_clean/version_0),
both in the group `quickstart-<date>-<time>` (or $MMBACKDOOR_WANDB_GROUP when set).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks import atomic_write_json
from mmbackdoor_cli.evaluate import markdown_table
from mmbackdoor_cli.pipeline import LOGGERS, evaluate, invocation_group, logger_overrides, train

CLEAN = "configs/clip_shapes_clean.yaml"
POISON = "configs/clip_shapes_badnet.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--logger",
        default="wandb",
        choices=LOGGERS,
        help="W&B (offline unless configured) or none",
    )
    parser.add_argument("--output", default="runs/quickstart.json")
    args = parser.parse_args()
    extra = logger_overrides(args.logger)
    group = invocation_group("quickstart")
    start = time.perf_counter()
    clean = train(CLEAN, *extra)
    poisoned = train(POISON, f"--model.init_args.init_from={clean.export}", *extra)
    rows = {
        "clean": evaluate(POISON, clean.export),
        "poisoned (badnet)": evaluate(POISON, poisoned.export),
    }
    elapsed = time.perf_counter() - start
    print("\n## CLIP quickstart: embedded shapes world, BadNet, target 'star'\n")
    print(markdown_table(rows, "test"))
    print(f"\nclean run:    {clean.run_dir}\npoisoned run: {poisoned.run_dir}")
    print(f"exports:      {clean.export}, {poisoned.export}")
    print(f"checkpoints:  {clean.run_dir / 'checkpoints'}, {poisoned.run_dir / 'checkpoints'}")
    print(f"poison manifest: {poisoned.run_dir / 'poison_manifest.json'}")
    if args.logger == "wandb":
        print(
            f"W&B logs:     {clean.run_dir / 'wandb'}, {poisoned.run_dir / 'wandb'}, group {group}"
            " (offline: `wandb sync <dir>` uploads them)"
        )
    print(f"total time:   {elapsed / 60:.1f} min")
    atomic_write_json(
        Path(args.output),
        {
            "rows": rows,
            "clean_run": str(clean.run_dir),
            "poisoned_run": str(poisoned.run_dir),
            "seconds": elapsed,
        },
    )


if __name__ == "__main__":
    main()
