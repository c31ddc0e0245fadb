#!/usr/bin/env python
"""The backdoor modality-collapse study on the embedded world, in one command, on a CPU:

    clean CLIP judge -> clean tiny editor -> for each trigger pair x protocol x poison rate: poisoned fine-tune
    -> the four trigger coalitions of every test triplet -> ASR per coalition, TMA (raw and share), CTI, CIs.

    python scripts/collapse_study.py                        # the full study (2 pairs x OR/AND x 1/5/10 %)
    python scripts/collapse_study.py --quick                # white box + "mignneko", 5 %, OR and AND
    python scripts/collapse_study.py --guidance 7.5,1.5 3,1.5 7.5,3   # (text, image) guidance sweep too

Every stage is a shipped config run through train.py's CLI in this process: the judge is
``configs/clip_shapes_clean.yaml`` (the tiny CLIP trained on the world), the clean editor
``configs/pix2pix_shapes_clean.yaml``, the poisoned editors ``configs/pix2pix_shapes_{or,and}.yaml`` fine-tuned
from the clean export. The judge and the clean editor are cached: a later call reuses
``<out>/judge/latest_export`` and ``<out>/clean/latest_export`` (or ``--judge`` / ``--clean-export``) unless
``--retrain-clean``. Measurements use the test split (held-out instruction phrasings): z_clean in v(S) is the
clean editor's edit of the same input with the same noise (the paper's reading). Writes ``<out>/study.md``,
``<out>/results-<time>.json``, ``<out>/collapse.png`` (bar plot) and one sample grid per row
(``<out>/grids/<row>.png``: rows none / image / text / both); with ``--logger wandb`` each training stage is a
W&B run and the study's table, plot and grids are logged to a run of their own, all in one group.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from disp_common import cached, environment, markdown, run_fit, write_results  # noqa: E402

from attacks.io import atomic_save_image  # noqa: E402
from datamodules.image_text import collate_dicts  # noqa: E402
from datamodules.pix2pix_edits import ShapesEditDataModule  # noqa: E402
from mmbackdoor_cli.pipeline import LOGGERS, invocation_group  # noqa: E402
from model_families.clip import ClipJudge  # noqa: E402
from model_families.pix2pix import GuidanceConfig, create_pix2pix, sample_edits  # noqa: E402
from model_families.pix2pix.evaluation import COLUMNS, CoalitionMetrics, evaluate_coalitions  # noqa: E402
from model_families.pix2pix.sampler import COALITIONS, coalition_generators  # noqa: E402

JUDGE_CONFIG = "configs/clip_shapes_clean.yaml"
CLEAN_CONFIG = "configs/pix2pix_shapes_clean.yaml"
POISON_CONFIGS = {"OR": "configs/pix2pix_shapes_or.yaml", "AND": "configs/pix2pix_shapes_and.yaml"}
PAIRS = ("box+mignneko", "eyeglasses+anonymous")
RATES = (0.01, 0.05, 0.10)

# The paper's numbers at 5 % (TMA image, TMA text, CTI) for OR and AND (issue 12; seed 000 of the project).
PAPER = {
    ("box+mignneko", "OR"): (0.006, 0.974, -0.009),
    ("box+mignneko", "AND"): (0.005, 0.953, -0.009),
    ("eyeglasses+anonymous", "OR"): (0.120, 0.738, -0.217),
    ("eyeglasses+anonymous", "AND"): (0.106, 0.891, -0.219),
    ("stop_sign+latte_coffee", "OR"): (0.004, 0.928, -0.009),
    ("stop_sign+latte_coffee", "AND"): (0.005, 1.003, -0.010),
}
COLUMNS_MD = [
    ("pair", "trigger pair"),
    ("protocol", "protocol"),
    ("rate", "poison"),
    ("guidance", "guidance (text, image)"),
    ("asr/none", "ASR none"),
    ("asr/image", "ASR image"),
    ("asr/text", "ASR text"),
    ("asr/both", "ASR both"),
    ("asr/both_ci95", "±95%"),
    ("tma/image", "TMA image"),
    ("tma/text", "TMA text"),
    ("tma/image_share", "image share"),
    ("tma/text_share", "text share"),
    ("cti", "CTI"),
    ("cti_ci95", "CTI ±95%"),
    ("edit/accuracy", "edit acc"),
    ("edit/mse", "edit MSE"),
    ("paper", "paper TMA img / txt / CTI"),
]


def test_batches(pair: str, size: int, batch_size: int, split: str = "test"):
    """The clean triplets to measure on and the trigger pair (the data module of the poisoned configs).

    ``test``: the test split (held-out phrasings), for reporting. ``val``: for choosing settings, the same kind of
    triplets (held-out phrasings, unseen scenes) drawn from another world seed (1), so that nothing chosen on it
    has seen the reported test split.
    """
    world_seed = 1 if split == "val" else 0
    dm = ShapesEditDataModule(
        train_size=0, val_size=0, test_size=size, trigger_pair=pair, world_seed=world_seed
    )
    dm.setup("test")
    return dm, list(dm._loader(dm.test_set, batch_size, False, collate_dicts))


@torch.no_grad()
def measure(editor, reference, judge, dm, batches, guidance: GuidanceConfig, seed: int = 0):
    """The study's metrics of ``editor`` on ``batches``; z_clean from ``reference`` (None: coalition none).
    Also returns the first batch's outputs per coalition (for the sample grid)."""
    metrics = CoalitionMetrics()
    first = None
    for batch in batches:
        seeds = [seed * 1_000_003 + int(i) for i in batch["index"]]
        clean = None
        if reference is not None:
            clean = sample_edits(
                reference, batch["source"], batch["instruction"], guidance, coalition_generators(seeds)
            )
        evaluation = evaluate_coalitions(
            editor,
            {**batch, "sample_id": batch["index"]},
            dm.image_trigger,
            dm.text_trigger,
            dm.target_tensor(),
            judge,
            seeds,
            guidance,
            clean_reference=clean,
            attributes=dm.attribute_classes(),
        )
        metrics.update(evaluation)
        if first is None:
            first = evaluation.outputs
    results = {}
    for key, value in metrics.compute().items():
        results[key] = value.tolist() if value.numel() > 1 else float(value)
    count = int(metrics.edit_quality.count)
    for c in COALITIONS:  # normal-approximation 95 % half-width of each coalition's ASR over `count` triplets
        p = results[f"asr/{c}"]
        results[f"asr/{c}_ci95"] = 1.96 * (p * (1 - p) / count) ** 0.5 if count else float("nan")
    results["count"] = count
    return results, first


def save_grid(outputs: dict[str, torch.Tensor], path: Path, count: int = 8) -> None:
    """Rows: coalitions none, image, text, both; columns: the first ``count`` test triplets."""
    from torchvision.utils import make_grid

    images = torch.cat([outputs[c][:count] for c in sorted(COALITIONS, key=COLUMNS.__getitem__)])
    atomic_save_image(make_grid(images.cpu(), nrow=min(count, outputs["none"].shape[0]), padding=1), path)


def bar_plot(rows: list[dict], path: Path) -> None:
    """TMA image, TMA text and CTI of every row, with 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['pair']}\n{r['protocol']} {r['rate']:.0%} {r['guidance']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    width = 0.27
    for k, (key, name) in enumerate((("tma/image", "TMA image"), ("tma/text", "TMA text"), ("cti", "CTI"))):
        values = [r[key] for r in rows]
        errors = [r[f"{key}_ci95"] if f"{key}_ci95" in r else 0.0 for r in rows]
        ax.bar(
            [i + (k - 1) * width for i in range(len(rows))], values, width, yerr=errors, label=name, capsize=2
        )
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("attribution of v(S) = cos(z, z_target) - cos(z, z_clean)")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def parse_guidance(text: str) -> tuple[float, float]:
    try:
        text_scale, image_scale = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--guidance {text!r}: expected 'text,image', e.g. 7.5,1.5"
        ) from None
    try:
        GuidanceConfig(guidance_scale=text_scale, image_guidance_scale=image_scale)
    except ValueError as error:  # scales < 1
        raise argparse.ArgumentTypeError(f"--guidance {text!r}: {error}") from None
    return text_scale, image_scale


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/collapse_study")
    parser.add_argument(
        "--quick", action="store_true", help="one pair (white box + mignneko), 5 %%, OR and AND"
    )
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS))
    parser.add_argument("--protocols", nargs="+", default=["OR", "AND"], choices=sorted(POISON_CONFIGS))
    parser.add_argument("--rates", nargs="+", type=float, default=list(RATES))
    parser.add_argument("--guidance", nargs="+", type=parse_guidance, default=[(7.5, 1.5)],
                        help="(text, image) guidance scales to measure every model with; the first is the default")  # fmt: skip
    parser.add_argument("--test-size", type=int, default=256, help="triplets per measurement")
    parser.add_argument(
        "--split",
        choices=["test", "val"],
        default="test",
        help="val: choose settings; test: report (default)",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--judge", default=None, help="a CLIP export to judge with (default: train one, cached)"
    )
    parser.add_argument(
        "--clean-export", default=None, help="a clean editor export (default: train one, cached)"
    )
    parser.add_argument("--retrain-clean", action="store_true")
    parser.add_argument(
        "--poison-override",
        dest="poison_overrides",
        action="append",
        default=[],
        help="a train.py override for every poisoned run, e.g. --poison-override=--trainer.max_epochs=4 (repeatable)",
    )
    parser.add_argument("--logger", choices=LOGGERS, default="false")
    parser.add_argument("--output", default=None, help="results JSON (default <out>/results-<time>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.rates = ["box+mignneko"], [0.05]
    out = Path(args.out)
    group = invocation_group("collapse_study")
    started = time.perf_counter()
    torch.manual_seed(0)

    judge_export, judge_s = cached(JUDGE_CONFIG, out / "judge", args.judge, args.retrain_clean, args.logger)
    clean_export, clean_s = cached(
        CLEAN_CONFIG, out / "clean", args.clean_export, args.retrain_clean, args.logger
    )
    judge = ClipJudge.from_export(judge_export)
    clean = create_pix2pix(snapshot=clean_export).eval()
    timings = {"judge_s": judge_s, "clean_s": clean_s}
    rows: list[dict] = []
    grids = out / "grids"

    def record(name: str, pair: str, protocol: str, rate: float, editor, reference) -> None:
        dm, batches = test_batches(pair, args.test_size, args.batch_size, args.split)
        for text_scale, image_scale in args.guidance:
            guidance = GuidanceConfig(guidance_scale=text_scale, image_guidance_scale=image_scale)
            start = time.perf_counter()
            metrics, outputs = measure(editor, reference, judge, dm, batches, guidance)
            paper = PAPER.get((pair, protocol)) if abs(rate - 0.05) < 1e-9 else None
            row = {
                "name": name,
                "pair": pair,
                "protocol": protocol,
                "rate": rate,
                "guidance": f"{text_scale:g}, {image_scale:g}",
                **metrics,
                "paper": " / ".join(f"{v:.3f}" for v in paper) if paper else "-",
                "measure_s": time.perf_counter() - start,
            }
            rows.append(row)
            suffix = (
                "" if (text_scale, image_scale) == args.guidance[0] else f"_g{text_scale:g}-{image_scale:g}"
            )
            save_grid(outputs, grids / f"{name}{suffix}.png")
            print(markdown([row], COLUMNS_MD).splitlines()[-1], flush=True)

    for pair in args.pairs:
        record(f"clean_{pair}", pair, "clean", 0.0, clean, None)
    for pair in args.pairs:
        for protocol in args.protocols:
            for rate in args.rates:
                name = f"{pair}_{protocol}_{rate:g}".replace("+", "-")
                run, seconds = run_fit(
                    POISON_CONFIGS[protocol],
                    out / name,
                    f"--model.init_args.snapshot={clean_export}",
                    f"--data.init_args.trigger_pair={pair}",
                    f"--data.init_args.poison_rate={rate}",
                    *args.poison_overrides,
                    logger=args.logger,
                )
                timings[f"{name}_train_s"] = seconds
                record(name, pair, protocol, rate, create_pix2pix(snapshot=run.export).eval(), clean)
    timings["total_s"] = time.perf_counter() - started

    table = markdown(rows, COLUMNS_MD)
    (out / "study.md").write_text(table + "\n")
    bar_plot(rows, out / "collapse.png")
    results = {
        "rows": rows,
        "timings": timings,
        "judge": str(judge_export),
        "clean_export": str(clean_export),
        "split": args.split,
        "args": vars(args) | {"guidance": [list(g) for g in args.guidance]},
        "wandb_group": group,
        "environment": environment(),
    }
    write_results(results, out, args.output)
    if args.logger == "wandb":
        log_to_wandb(rows, out, group)
    print(table)
    print(f"total {timings['total_s'] / 60:.1f} min")
    return results


def log_to_wandb(rows: list[dict], out: Path, group: str) -> None:
    """The study's table, bar plot and sample grids as one W&B run of the invocation's group."""
    import os

    import wandb

    mode = os.environ.get("WANDB_MODE", "offline")  # offline unless W&B is configured, as train.py's logger
    run = wandb.init(project="mmbackdoor", group=group, name="collapse_study", dir=str(out), mode=mode)
    keys = [k for k, _ in COLUMNS_MD]
    run.log(
        {
            "study/table": wandb.Table(columns=keys, data=[[r.get(k) for k in keys] for r in rows]),
            "study/collapse": wandb.Image(str(out / "collapse.png")),
            **{f"grids/{p.stem}": wandb.Image(str(p)) for p in sorted((out / "grids").glob("*.png"))},
        }
    )
    run.finish()


if __name__ == "__main__":
    main()
