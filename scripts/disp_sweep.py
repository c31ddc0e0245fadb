#!/usr/bin/env python
"""Mask-ratio sweep of DiSP's inference-time masking (the paper's Fig. 2): ASR and clean accuracy against rho.

    python scripts/disp_sweep.py --checkpoint runs/mdlm_shapes_poison/latest_export \\
        --config configs/mdlm_shapes_poison.yaml [--rhos 0 0.1 0.2 0.3 0.45 0.6 0.8] [--selections saliency random] \\
        [--split val] [--size 200] [--wandb]

The config gives the data, trigger and target (its poison arguments rebuild the poisoned training samples for
``ASR w/t``); the checkpoint is the backdoored export. Saliency is computed once per batch and reused for every
rho. Writes ``<out>/sweep.json``, ``<out>/sweep.png`` (ASR on triggered held-out inputs and on the poisoned
training samples, clean QA accuracy, per selection rule) and, with ``--wandb``, a W&B line plot and table
(offline unless WANDB_MODE says otherwise).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from disp_common import dump, markdown

from mmbackdoor_cli.cli import MMBackdoorCLI
from mmbackdoor_cli.pipeline import invocation_group

DEFAULT_RHOS = [0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8]


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"saliency": "-", "random": "--", "attention": ":"}
    for selection in sorted({r["selection"] for r in rows}):
        part = [r for r in rows if r["selection"] == selection]
        rho = [r["rho"] for r in part]
        style = styles.get(selection, "-.")
        for key, label, colour in (
            ("asr", "ASR (triggered)", "tab:red"),
            ("asr_wt", "ASR w/t (poisoned train)", "tab:orange"),
            ("ca", "clean QA accuracy", "tab:blue"),
        ):
            if key in part[0]:
                ax.plot(
                    rho,
                    [r[key] for r in part],
                    style,
                    marker="o",
                    color=colour,
                    label=f"{label}, {selection}",
                )
    ax.axvline(0.45, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("mask ratio rho (share of vision tokens masked)")
    ax.set_ylabel("rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_wandb(rows: list[dict], png: Path, name: str) -> None:
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    run = wandb.init(
        project="mmbackdoor",
        name=name,
        job_type="disp_sweep",
        group=invocation_group("disp_sweep"),
        dir=str(png.parent),
    )
    keys = sorted({k for r in rows for k in r if k not in ("selection",)})
    table = wandb.Table(
        columns=["selection", *keys], data=[[r["selection"], *[r.get(k) for k in keys]] for r in rows]
    )
    plots = {"disp/sweep_table": table, "disp/sweep_png": wandb.Image(str(png))}
    for selection in sorted({r["selection"] for r in rows}):
        part = [r for r in rows if r["selection"] == selection]
        series = [[r.get(k, float("nan")) for r in part] for k in ("asr", "asr_wt", "ca")]
        plots[f"disp/sweep_{selection}"] = wandb.plot.line_series(
            xs=[r["rho"] for r in part],
            ys=series,
            keys=["asr", "asr_wt", "ca"],
            title=f"DiSP mask sweep ({selection})",
            xname="rho",
        )
    run.log(plots)
    run.finish()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="backdoored export (snapshot folder)")
    parser.add_argument(
        "--config", default="configs/mdlm_shapes_poison.yaml", help="data/trigger/target config"
    )
    parser.add_argument("--rhos", type=float, nargs="+", default=DEFAULT_RHOS)
    parser.add_argument(
        "--selections", nargs="+", default=["saliency", "random"], choices=["saliency", "random", "attention"]
    )
    parser.add_argument("--mode", default="mask", choices=["mask", "drop"])
    parser.add_argument("--num-probes", type=int, default=4)
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--size", type=int, default=200, help="held-out images (each with every eval task)")
    parser.add_argument("--out", default="runs/disp_sweep")
    parser.add_argument(
        "--wandb", action="store_true", help="log a W&B line plot + table (offline by default)"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if not Path(args.checkpoint).is_dir():
        raise FileNotFoundError(f"checkpoint (export folder) not found: {args.checkpoint}")
    out = Path(args.out)
    cli = MMBackdoorCLI(
        args=[
            "--config",
            args.config,
            f"--model.init_args.init_from={args.checkpoint}",
            f"--trainer.default_root_dir={out}",
            "--trainer.logger=false",
            "--run_version_dir=false",
            f"--data.init_args.{args.split}_size={args.size}",
        ],
        run=False,
    )
    module, datamodule = cli.model, cli.datamodule
    datamodule.trainer = cli.trainer  # gives the datamodule the module's tokenizer and prompt format
    cli.trainer.strategy.connect(module)
    datamodule.setup("test")
    loaders_list = datamodule.val_dataloader() if args.split == "val" else datamodule.test_dataloader()
    loaders = {
        name: loader
        for name, loader in zip(datamodule.eval_set_names, loaders_list)
        if name in ("clean", "triggered", "poisoned_train")
    }
    spec = datamodule.asr_spec()
    if spec is None:
        raise ValueError(f"{args.config} configures no backdoor target: nothing to measure ASR against")

    def prepare(batch: dict) -> dict:
        return datamodule.on_after_batch_transfer(batch, 0)

    from defenses.disp.masking import DiSPMasking
    from defenses.disp.sweep import mask_ratio_sweep

    rows = []
    for selection in args.selections:
        masking = DiSPMasking(rho=0.45, selection=selection, mode=args.mode, num_probes=args.num_probes)
        t0 = time.perf_counter()
        for row in mask_ratio_sweep(
            module.model, module.tokenizer, loaders, args.rhos, masking, module.generation, spec, prepare
        ):
            rows.append({"selection": selection, **row})
        print(f"{selection}: {time.perf_counter() - t0:.1f}s")
    columns = [
        ("selection", "selection"),
        ("rho", "rho"),
        ("asr", "ASR (triggered)"),
        ("asr_wt", "ASR w/t (poisoned train)"),
        ("asr_clean", "ASR (clean)"),
        ("ca", "clean QA acc"),
    ]
    print(markdown(rows, columns))
    png = out / "sweep.png"
    plot(rows, png, f"DiSP inference-time masking ({Path(args.config).stem}, {args.mode})")
    result = {
        "checkpoint": args.checkpoint,
        "config": args.config,
        "split": args.split,
        "size": args.size,
        "mode": args.mode,
        "rows": rows,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    dump(out / "sweep.json", result)
    if args.wandb:
        log_wandb(rows, png, f"disp_sweep/{Path(args.checkpoint).parent.name}")
    print(f"wrote {out / 'sweep.json'} and {png} in {result['wall_time_s']}s")
    return rows


if __name__ == "__main__":
    main()
