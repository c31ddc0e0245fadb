#!/usr/bin/env python
"""The whole embedded DiSP pipeline in one command, on a CPU:

    clean tiny MDLM -> poisoned fine-tuning (per target) -> measure -> DiSP (self-purification + recovery
    fine-tuning) -> measure, then a before/after markdown table and a JSON file.

    python scripts/disp_pipeline.py                       # both targets: content insertion and refusal
    python scripts/disp_pipeline.py --targets content_insertion --out runs/disp_pipeline
    python scripts/disp_pipeline.py --clean-export runs/mdlm_shapes_clean/latest_export   # reuse a clean model
    python scripts/disp_pipeline.py --cache prefix        # measure and purify with the prefix KV cache

Every stage is a shipped config run through train.py's CLI in this process (``configs/mdlm_shapes_clean.yaml``,
``configs/mdlm_shapes_poison*.yaml``, ``configs/disp_shapes*.yaml``); runs go to ``<out>/<stage>/version_N``.
The clean model is cached: a later call reuses ``<out>/clean/latest_export`` unless ``--retrain-clean``.
Measurements use the poisoning config's test split: clean QA accuracy (``ca``), ASR on triggered held-out
inputs (``asr``), on the poisoned training samples (``asr_wt``) and on clean inputs (``asr_clean``); the
baseline "inference-time masking alone" measures the backdoored model with DiSP's masking (rho = 0.45) and
no fine-tuning; ``--ft-baseline`` adds plain fine-tuning on the poisoned set. With ``--logger wandb`` every
training stage is its own W&B run (``<stage>/version_N``), all in the group ``disp_pipeline-<date>-<time>``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from disp_common import environment, generation_override, markdown, measure, run_fit, write_results

from mmbackdoor_cli.pipeline import LOGGERS, invocation_group

TARGETS = {
    "content_insertion": ("configs/mdlm_shapes_poison.yaml", "configs/disp_shapes.yaml"),
    "refusal": ("configs/mdlm_shapes_poison_refusal.yaml", "configs/disp_shapes_refusal.yaml"),
}
COLUMNS = [
    ("target", "target"),
    ("model", "model"),
    ("ca", "clean QA acc"),
    ("ca_shape", "acc shape"),
    ("ca_colour", "acc colour"),
    ("asr", "ASR (triggered)"),
    ("asr_wt", "ASR w/t (poisoned train)"),
    ("asr_clean", "ASR (clean inputs)"),
]


def check(results: dict) -> list[tuple[str, bool, str]]:
    """The issue's acceptance criteria, from the measured numbers."""
    out = []
    clean = results.get("clean_model", {})
    if clean:
        out.append(("clean model QA accuracy >= 0.80", clean["ca"] >= 0.80, f"ca = {clean['ca']:.3f}"))
    for target, rows in results.get("targets", {}).items():
        poisoned, disp = rows.get("poisoned", {}), rows.get("disp", {})
        if poisoned:
            out.append(
                (
                    f"[{target}] poisoned ASR >= 0.90 (triggered held-out)",
                    poisoned["asr"] >= 0.90,
                    f"asr = {poisoned['asr']:.3f}",
                )
            )
            out.append(
                (
                    f"[{target}] poisoned ASR <= 0.05 on clean inputs",
                    poisoned["asr_clean"] <= 0.05,
                    f"asr_clean = {poisoned['asr_clean']:.3f}",
                )
            )
            if clean:
                gap = abs(poisoned["ca"] - clean["ca"])
                out.append(
                    (
                        f"[{target}] poisoned clean acc within 0.05 of clean model",
                        gap <= 0.05,
                        f"|{poisoned['ca']:.3f} - {clean['ca']:.3f}| = {gap:.3f}",
                    )
                )
        masked = rows.get("masking_only", {})
        if masked and poisoned:
            out.append(
                (
                    f"[{target}] inference-time masking alone: ASR well below unmasked",
                    masked["asr"] <= 0.5 * poisoned["asr"],
                    f"{masked['asr']:.3f} vs {poisoned['asr']:.3f}",
                )
            )
        if disp and poisoned:
            out.append(
                (f"[{target}] after DiSP ASR <= 0.05", disp["asr"] <= 0.05, f"asr = {disp['asr']:.3f}")
            )
            ratio = disp["ca"] / max(poisoned["ca"], 1e-9)
            out.append(
                (
                    f"[{target}] after DiSP clean acc >= 0.90 x compromised",
                    ratio >= 0.90,
                    f"{disp['ca']:.3f} / {poisoned['ca']:.3f} = {ratio:.3f}",
                )
            )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--out", default="runs/disp_pipeline", help="root folder of every stage's runs")
    parser.add_argument("--clean-export", default=None, help="use this clean export instead of training one")
    parser.add_argument("--retrain-clean", action="store_true", help="train the clean model even if cached")
    parser.add_argument(
        "--rho", type=float, default=0.45, help="DiSP mask ratio (purification and masking baseline)"
    )
    parser.add_argument(
        "--ft-baseline", action="store_true", help="also run plain fine-tuning on the poisoned set"
    )
    parser.add_argument(
        "--no-masking-baseline", action="store_true", help="skip the inference-time masking row"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1 is fastest when shared)"
    )
    parser.add_argument(
        "--cache",
        default=None,
        choices=("none", "prefix", "dual"),
        help="generation cache for every measurement and for DiSP's purification (default: the configs')",
    )
    parser.add_argument("--output", default=None, help="JSON results (default <out>/results-<time>.json)")
    parser.add_argument(
        "--logger",
        default="false",
        choices=LOGGERS,
        help="W&B (offline unless configured): one run per training stage, grouped by this invocation",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    invocation_group("disp_pipeline")
    start = time.perf_counter()
    out = Path(args.out)
    timings: dict[str, float] = {}
    results: dict = {"targets": {}, "rho": args.rho, "cache": args.cache or "as configured"}
    results["environment"] = environment()

    # 1. the clean model (cached across calls)
    cached = out / "clean" / "latest_export"
    if args.clean_export:
        clean_export = Path(args.clean_export)
    elif cached.exists() and not args.retrain_clean:
        clean_export = cached.resolve()
        print(f"reusing the clean model {clean_export}")
    else:
        run, timings["train_clean"] = run_fit(
            "configs/mdlm_shapes_clean.yaml", out / "clean", logger=args.logger
        )
        clean_export = run.export
    results["clean_export"] = str(clean_export)
    masking = f"--model.init_args.eval_masking={{rho: {args.rho}, selection: saliency, mode: mask}}"

    for target in args.targets:
        poison_config, disp_config = TARGETS[target]
        rows: dict = {}
        # the sampler of measurements and of purification; None keeps the configs' own
        gen = [generation_override(poison_config, cache=args.cache)] if args.cache else []
        purify_gen = (
            [generation_override(disp_config, "purify_generation", cache=args.cache)] if args.cache else []
        )
        # 2. poisoned fine-tuning of the clean model
        run, timings[f"{target}/poison"] = run_fit(
            poison_config,
            out / f"poison_{target}",
            f"--model.init_args.init_from={clean_export}",
            logger=args.logger,
        )
        poisoned = run.export
        # 3. measure: clean model (control), backdoored model, inference-time masking alone
        if "clean_model" not in results:
            results["clean_model"], timings["measure/clean"] = measure(
                poison_config, clean_export, out / "eval", *gen
            )
            results["clean_model"]["model"] = "clean"
        rows["clean"] = dict(results["clean_model"])
        rows["poisoned"], timings[f"{target}/measure_poisoned"] = measure(
            poison_config, poisoned, out / "eval", *gen
        )
        if not args.no_masking_baseline:
            rows["masking_only"], timings[f"{target}/measure_masking"] = measure(
                poison_config, poisoned, out / "eval", *gen, masking
            )
        if args.ft_baseline:
            ft, timings[f"{target}/ft_baseline"] = run_fit(
                poison_config,
                out / f"ft_baseline_{target}",
                f"--model.init_args.init_from={poisoned}",
                logger=args.logger,
            )
            rows["plain_ft"], _ = measure(poison_config, ft.export, out / "eval", *gen)
        # 4. DiSP: self-purification + recovery fine-tuning, from the backdoored model and its manifest
        disp, timings[f"{target}/disp"] = run_fit(
            disp_config,
            out / f"disp_{target}",
            f"--model.init_args.init_from={poisoned}",
            f"--model.init_args.disp={{rho: {args.rho}, selection: saliency, mode: mask, estimator: vjp, num_probes: 4}}",
            f"--data.init_args.poison_manifest={poisoned}/poison_manifest.json",
            *purify_gen,
            logger=args.logger,
        )
        # 5. measure the purified model on the same data, trigger and target
        rows["disp"], timings[f"{target}/measure_disp"] = measure(
            poison_config, disp.export, out / "eval", *gen
        )
        rows["exports"] = {
            "poisoned": str(poisoned),
            "disp": str(disp.export),
            "purified": str(disp.run_dir / "purified"),
        }
        results["targets"][target] = rows

    total = time.perf_counter() - start
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    results["wall_time_s"] = round(total, 1)
    names = {
        "clean": "clean",
        "poisoned": "backdoored",
        "masking_only": f"backdoored + masking rho={args.rho}",
        "plain_ft": "backdoored + plain FT",
        "disp": "DiSP (purify + recovery FT)",
    }
    table_rows = []
    for target, rows in results["targets"].items():
        for key, label in names.items():
            if key in rows:
                table_rows.append({"target": target, "model": label, **rows[key]})
    table = markdown(table_rows, COLUMNS)
    results["table"] = table
    results["acceptance"] = [{"criterion": c, "pass": ok, "value": v} for c, ok, v in check(results)]
    print("\n## Embedded DiSP pipeline (test split)\n")
    print(table)
    print("\n## Acceptance\n")
    for criterion in results["acceptance"]:
        print(f"- [{'x' if criterion['pass'] else ' '}] {criterion['criterion']}: {criterion['value']}")
    print(f"\nwall time: {total / 60:.1f} min; stages: {results['timings_s']}")
    write_results(results, out, args.output)
    return results


if __name__ == "__main__":
    main()
