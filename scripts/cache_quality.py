#!/usr/bin/env python
"""What the generation caches cost in quality: one export measured with each ``cache`` setting.

    python scripts/cache_quality.py --checkpoint runs/disp_pipeline/clean/latest_export
    python scripts/cache_quality.py --checkpoint <export> --config configs/mdlm_shapes_poison.yaml \
        --shapes 8/8/4 16/8/8 --caches none prefix dual

Each shape is ``gen_length/block_length/steps``. The first is the shipped embedded sampler (one block: the
prefix and dual caches then coincide, as there is no suffix); a multi-block shape shows the approximation
where the caches really differ from ``none``. Metrics come from the config's test split (``--split val`` for
validation): clean QA accuracy (``ca``) and caption scores, plus the ASR when the config has a trigger. A
markdown table and a JSON file; deltas are against ``cache: none`` of the same shape.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from disp_common import environment, generation_override, markdown, measure, write_results

METRICS = ("ca", "bleu4", "rougeL", "cider", "asr")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="an MDLM export (snapshot folder)")
    parser.add_argument(
        "--config",
        default="configs/mdlm_shapes_poison.yaml",
        help="data, trigger and sampler (a config that loads init_from; the clean config trains from scratch)",
    )
    parser.add_argument("--shapes", nargs="+", default=["8/8/4", "16/8/8"], help="gen/block/steps")
    parser.add_argument("--caches", nargs="+", default=["none", "prefix", "dual"])
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default="runs/cache_quality", help="folder of the evaluation runs")
    parser.add_argument("--output", default=None, help="JSON (default <out>/results-<time>.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows: list[dict] = []
    results = {"checkpoint": args.checkpoint, "config": args.config, "split": args.split, "runs": []}
    results["environment"] = environment()
    for shape in args.shapes:
        try:
            gen_length, block_length, steps = (int(v) for v in shape.split("/"))
        except ValueError:
            parser.error(f"--shapes {shape!r}: expected gen_length/block_length/steps, e.g. 16/8/8")
        reference = None
        for cache in args.caches:
            override = generation_override(
                args.config, gen_length=gen_length, block_length=block_length, steps=steps, cache=cache
            )
            start = time.perf_counter()
            metrics, _ = measure(args.config, args.checkpoint, out, override, split=args.split)
            seconds = time.perf_counter() - start
            row = {"shape": shape, "cache": cache, "seconds": seconds}
            row.update({k: metrics[k] for k in METRICS if k in metrics})
            if cache == "none":
                reference = row
            if reference is not None:
                row["ca_delta"] = row["ca"] - reference["ca"]
            rows.append(row)
            results["runs"].append(row)
            print(
                f"{shape} cache={cache}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k in METRICS)
            )
    columns = [("shape", "gen/block/steps"), ("cache", "cache")]
    columns += [(k, k) for k in (*METRICS, "ca_delta", "seconds") if any(k in r for r in rows)]
    table = markdown(rows, columns)
    results["table"] = table
    print(f"\n## Generation caches: quality ({args.split} split)\n\n{table}")
    write_results(results, out, args.output)
    return results


if __name__ == "__main__":
    main()
