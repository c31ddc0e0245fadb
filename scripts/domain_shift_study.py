#!/usr/bin/env python
"""The backdoor domain-shift study (Liang et al., CVPR 2025) on the embedded world, in one command, on a CPU:

    clean CLIP (the KS judge and InputAware's surrogate) -> clean tiny LLaVA -> for each attack: poisoned
    fine-tune from the clean export -> the test split in the source domain and under every shift -> per attack
    and shift: ASR_src, ASR_tgt, ASR-G, KS of the shift, clean caption scores (CIDEr-D / BLEU-4 / ROUGE-L).

    python scripts/domain_shift_study.py                     # 6 attacks + 2 MABA rows x none/palette/outline/paraphrase
    python scripts/domain_shift_study.py --quick             # blended x palette
    python scripts/domain_shift_study.py --attacks badnet maba --shifts blur posterise --rate 0.1
    python scripts/domain_shift_study.py --family mdlm       # the tiny LLaDA-V instead (no MABA scorer, no captions)

Shifts (evaluation only, the same test scenes; :mod:`datamodules.shifts`): ``none`` (the source domain, always
measured) plus ``--shifts`` (default style A = ``palette``, style B = ``outline``, and ``paraphrase``). Attacks:
``badnet blended wanet low_frequency input_aware dual_key`` and the MABA rows beside their base attacks
(``maba`` after ``badnet``, ``maba_dual_key`` after ``dual_key``). Each attack is ``configs/llava_shapes_<attack>.yaml``
(``--family mdlm``: ``configs/mdlm_shapes_poison.yaml`` with that config's trigger keys), fine-tuned from the clean
export at ``--rate``. InputAware's generator is trained first on the CLIP (``scripts/train_input_aware.py``) into
``<out>/input_aware``, reused while that artifact names this CLIP. MABA's placements come from the clean model
(they are computed when the poisoned run starts, for the training, test and shifted test images) and are read
back for the measurement.

``--jobs N`` (default 2) runs N trainings or measurements at a time, each in a spawned process with its share of
the CPUs; every run seeds itself, so the table does not depend on N. The CLIP and the clean model are cached: a
later call reuses ``<out>/judge/latest_export`` and ``<out>/clean/latest_export`` (or ``--judge`` /
``--clean-export``) unless ``--retrain-clean``. Writes
``<out>/study.md``, ``<out>/results-<time>.json`` (rows, KS, clean-model metrics, timings, environment),
``<out>/asr_g.png`` (heat maps of ASR-G and ASR_tgt, attack x shift); with ``--logger wandb`` every training is a
W&B run and the table and heat map go to a run of their own, all in one group.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402
from disp_common import cached, environment, fmt, markdown, measure, run_fit, write_results  # noqa: E402
from shift_study_report import COLUMNS_MD, heat_map, log_to_wandb, shift_rows  # noqa: E402

from datamodules.shifts import SHAPES_SHIFTS, check_shift_names  # noqa: E402
from mmbackdoor_cli.pipeline import LOGGERS, invocation_group  # noqa: E402

JUDGE_CONFIG = "configs/clip_shapes_clean.yaml"
ATTACKS = (
    "badnet", "maba", "blended", "wanet", "low_frequency", "input_aware", "dual_key", "maba_dual_key",
)  # fmt: skip
MABA_BASE = {"maba": "badnet", "maba_dual_key": "dual_key"}
DEFAULT_SHIFTS = ("palette", "outline", "paraphrase")  # style A, style B, the instruction shift
FAMILIES = {
    "llava": {
        "clean": "configs/llava_shapes_clean.yaml",
        "poison": "configs/llava_shapes_{attack}.yaml",
        "maba": True,
    },
    # LLaDA-V's module supplies no differentiable image-text scorer: no MABA rows
    "mdlm": {
        "clean": "configs/mdlm_shapes_clean.yaml",
        "poison": "configs/mdlm_shapes_poison.yaml",
        "maba": False,
    },
}
TRIGGER_KEYS = ("attack", "attack_kwargs", "text_attack", "text_attack_kwargs", "protocol")


def data_args(config: str) -> dict:
    """``data.init_args`` of a config file."""
    return yaml.safe_load(Path(config).read_text())["data"]["init_args"]


def attack_stage(family: str, attack: str) -> tuple[str, list[str]]:
    """The poisoning config of ``attack`` and the overrides that make it that attack: none for LLaVA (each attack
    has its config), the trigger keys of ``configs/llava_shapes_<attack>.yaml`` on the MDLM poisoning config."""
    own = f"configs/llava_shapes_{attack}.yaml"
    if family == "llava":
        return own, []
    data = data_args(own)

    def value(v) -> str:  # strings as they are (jsonargparse keeps JSON quotes of a str), the rest as JSON
        return v if isinstance(v, str) else json.dumps(v)

    overrides = [f"--data.init_args.{key}={value(data[key])}" for key in TRIGGER_KEYS if key in data]
    for key in ("text_attack", "text_attack_kwargs"):
        if key not in data:
            overrides.append(f"--data.init_args.{key}=null")
    return FAMILIES[family]["poison"], overrides


def input_aware_overrides(config: str, judge: Path, folder: Path, extra: list[str]) -> tuple[list[str], str]:
    """For an ``input_aware`` config: its trigger artifact, trained on ``judge`` into ``folder`` unless that
    folder already holds one trained on this judge (another surrogate is an error), and the override that
    points the config at it; ``([], "")`` for other attacks."""
    data = data_args(config)
    if data.get("attack") != "input_aware":
        return [], ""
    from attacks.input_aware import ARTIFACT_VERSION, MANIFEST, surrogate_sha256
    from model_families.loading import read_json_file

    sha = surrogate_sha256(judge)
    if (folder / MANIFEST).is_file():
        manifest = read_json_file(folder / MANIFEST, what="input_aware manifest")
        recorded = manifest.get("surrogate", {})
        if manifest.get("version") != ARTIFACT_VERSION:
            raise ValueError(
                f"{folder}: the InputAware artifact has format version {manifest.get('version')!r}, made by an "
                f"older scripts/train_input_aware.py (now {ARTIFACT_VERSION}); remove it or use another --out"
            )
        if recorded.get("sha256") != sha:
            raise ValueError(
                f"{folder}: the InputAware artifact was trained on surrogate {recorded.get('path')} (sha256 "
                f"{str(recorded.get('sha256'))[:12]}), not on the judge {judge} ({sha[:12]}); remove it or use "
                "another --out"
            )
        done = f"reused {folder} (trained on this CLIP)"
    else:
        from train_input_aware import main as train_input_aware

        train_input_aware(
            ["--surrogate", str(judge), "--out", str(folder), "--target-class", "banana", *extra]
        )
        done = f"trained {folder} on {judge}"
    kwargs = {**(data.get("attack_kwargs") or {}), "artifact": str(folder)}
    return [f"--data.init_args.attack_kwargs={json.dumps(kwargs)}"], done


def maba_overrides(attack: str, export: Path) -> list[str]:
    """For a MABA attack: the image trigger exactly as the poisoned run built it (its poison manifest's config,
    with the placement table the clean model's attributions gave), for measuring; [] for other attacks."""
    if attack not in MABA_BASE:
        return []
    from model_families.loading import read_json_file

    manifest = read_json_file(export / "poison_manifest.json", ["image_trigger"], what="poison manifest")
    config = dict(manifest["image_trigger"]["config"])
    if config.pop("name", None) != "maba" or not config.get("placements"):
        raise ValueError(
            f"{export}/poison_manifest.json: {attack} run without a placed MABA trigger: {config}"
        )
    return [f"--data.init_args.attack_kwargs={json.dumps(config)}"]


def shift_ks_values(judge: Path, config: str, family: str, shifts: list[str], size: int) -> dict[str, float]:
    """KS of every shift on the test images of ``config``'s world, the images encoded by the CLIP ``judge``."""
    from datamodules.mdlm_shapes import ShapesInstructDataModule
    from evaluation.domain_shift import clip_image_encoder, shift_ks
    from model_families.clip import load_clip

    data = data_args(config)
    keep = ("world_seed", "image_size", "second_object_prob", "tasks", "eval_tasks")
    dm = ShapesInstructDataModule(
        train_size=0, val_size=0, test_size=size, eval_shifts=shifts, family=family, target=None,
        **{k: data[k] for k in keep if k in data},
    )  # fmt: skip
    return shift_ks(dm, clip_image_encoder(load_clip(str(judge), key="--judge")), "test", limit=None)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/domain_shift_study")
    parser.add_argument("--quick", action="store_true", help="one attack (blended), one shift (palette)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llava")
    parser.add_argument("--attacks", nargs="+", default=None, choices=ATTACKS,
                        help="default: all (without the MABA rows for a family without a MABA scorer)")  # fmt: skip
    parser.add_argument("--shifts", nargs="+", default=list(DEFAULT_SHIFTS),
                        help=f"shifts beside the source domain, some of {list(SHAPES_SHIFTS)}")  # fmt: skip
    parser.add_argument("--rate", type=float, default=0.05, help="poison rate of every attack")
    parser.add_argument("--test-size", type=int, default=500, help="test images per measurement")
    parser.add_argument(
        "--judge", default=None, help="a CLIP export (KS, InputAware surrogate); default: train"
    )
    parser.add_argument("--clean-export", default=None, help="a clean model export (default: train, cached)")
    parser.add_argument("--retrain-clean", action="store_true")
    for name, what in (
        ("clean", "the clean model's training"),
        ("poison", "every poisoned run"),
        ("eval", "every measurement"),
        ("input-aware", "scripts/train_input_aware.py"),
    ):
        parser.add_argument(
            f"--{name}-override", dest=f"{name.replace('-', '_')}_overrides", action="append", default=[],
            help=f"an argument of {what}, e.g. --{name}-override=--trainer.max_steps=2 (repeatable)",
        )  # fmt: skip
    parser.add_argument(
        "--jobs", type=int, default=min(2, len(os.sched_getaffinity(0))),
        help="trainings and measurements run at the same time, each in its own process with its share of the "
        "CPUs (default: 2, or 1 on a single CPU); the results do not depend on it",
    )  # fmt: skip
    parser.add_argument("--logger", choices=LOGGERS, default="false")
    parser.add_argument("--output", default=None, help="results JSON (default <out>/results-<time>.json)")
    args = parser.parse_args(argv)
    maba = FAMILIES[args.family]["maba"]
    if args.attacks is None:
        args.attacks = [a for a in ATTACKS if maba or a not in MABA_BASE]
    elif not maba and any(a in MABA_BASE for a in args.attacks):
        parser.error(
            f"--family {args.family}: {[a for a in args.attacks if a in MABA_BASE]} place the trigger by attribution "
            "and need the family's image_text_scorer() (gradients of an image-text score to the image), which this "
            "family does not supply; drop them from --attacks"
        )
    if args.quick:
        args.attacks, args.shifts = ["blended"], [args.shifts[0]]
    try:
        args.shifts = check_shift_names(args.shifts, SHAPES_SHIFTS, "--shifts")
    except ValueError as error:
        parser.error(str(error))
    if not 0 < args.rate <= 1:
        parser.error(f"--rate must be in (0, 1], got {args.rate}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.test_size < 1:
        parser.error(f"--test-size must be >= 1, got {args.test_size}")
    return args


class Serial:
    """The executor of ``--jobs 1``: each job runs in this process when it is submitted (an error is raised
    there); the result is wrapped in a done :class:`~concurrent.futures.Future`."""

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future

    def __enter__(self) -> Serial:
        return self

    def __exit__(self, *exc) -> None:
        return None


def executor(jobs: int):
    """``Serial()`` for one job at a time, else a pool of ``jobs`` spawned processes, each used for one job
    (a fresh interpreter per training, as if each were its own ``train.py`` command; every configuration seeds
    itself, so the results do not depend on ``jobs``), each with the CPUs divided between the jobs."""
    if jobs == 1:
        return Serial()
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    return ProcessPoolExecutor(
        jobs, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1,
        initializer=torch_threads, initargs=(threads,),
    )  # fmt: skip


def torch_threads(threads: int) -> None:
    """A worker's torch threads: the CPUs shared out between the jobs (a config's ``cpu_threads`` still wins)."""
    import torch

    torch.set_num_threads(threads)


def poison_job(job: dict) -> dict:
    """One attack of the study: its poisoned fine-tune from the clean export, then its measurement on the test
    split in every domain (MABA with the placements its run made). A worker's job under ``--jobs`` > 1."""
    run, train_s = run_fit(job["config"], Path(job["run_dir"]), *job["fit"], logger=job["logger"])
    metrics, measure_s = measure(
        job["config"], run.export, Path(job["measure_dir"]), *job["trigger"],
        *maba_overrides(job["attack"], run.export), *job["measured"],
    )  # fmt: skip
    return {"export": str(run.export), "metrics": metrics, "train_s": train_s, "measure_s": measure_s}


def max_epochs(config: str) -> int:
    """``trainer.max_epochs`` of a config (the study starts the longest trainings first)."""
    return int((yaml.safe_load(Path(config).read_text()).get("trainer") or {}).get("max_epochs") or 0)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    out = Path(args.out)
    group = invocation_group("domain_shift_study")
    started = time.perf_counter()
    family = FAMILIES[args.family]
    first_config, _ = attack_stage(args.family, args.attacks[0])
    sizes = [f"--data.init_args.test_size={args.test_size}"]
    shifts = f"--data.init_args.eval_shifts=[{', '.join(args.shifts)}]"
    measured = [shifts, *sizes, "--data.init_args.poison_rate=0", "--data.init_args.poison_count=null"]
    measured += args.eval_overrides
    timings: dict[str, float] = {}
    with executor(args.jobs) as pool:
        judge_job = pool.submit(
            cached, JUDGE_CONFIG, out / "judge", args.judge, args.retrain_clean, args.logger
        )
        clean_job = pool.submit(
            cached, family["clean"], out / "clean", args.clean_export, args.retrain_clean, args.logger,
            *args.clean_overrides,
        )  # fmt: skip
        judge, timings["judge_s"] = judge_job.result()
        start = time.perf_counter()  # while the clean model trains (--jobs > 1)
        ks = shift_ks_values(judge, first_config, args.family, args.shifts, args.test_size)
        timings["ks_s"] = time.perf_counter() - start
        artifacts = {}
        for attack in args.attacks:
            artifacts[attack], made = input_aware_overrides(
                f"configs/llava_shapes_{attack}.yaml", judge, out / "input_aware", args.input_aware_overrides
            )
            if made:
                print(f"[input_aware] {made}", flush=True)
        clean, timings["clean_s"] = clean_job.result()
        base_config, base_overrides = attack_stage(args.family, "blended")
        clean_measure = pool.submit(
            measure, base_config, clean, out / "measure" / "clean", *base_overrides, *measured
        )
        stages = {attack: attack_stage(args.family, attack) for attack in args.attacks}
        jobs = {}  # future -> attack
        # longest first; at equal epochs MABA first (its run also computes the attributions of its placements)
        order = sorted(args.attacks, key=lambda a: (-max_epochs(stages[a][0]), a not in MABA_BASE))
        for attack in order:
            config, trigger = stages[attack]
            placed = [shifts] if attack in MABA_BASE else []  # MABA places the shifted test images too
            # no in-training validation: the measurement after the run is on the test split
            fit = [
                f"--model.init_args.init_from={clean}", *trigger, *artifacts[attack],
                f"--data.init_args.poison_rate={args.rate}", "--data.init_args.poison_count=null", *sizes,
                *placed, "--trainer.limit_val_batches=0", *args.poison_overrides,
            ]  # fmt: skip
            job = {
                "attack": attack, "config": config, "run_dir": str(out / attack), "fit": fit,
                "logger": args.logger, "measure_dir": str(out / "measure" / attack),
                "trigger": [*trigger, *artifacts[attack]], "measured": measured,
            }  # fmt: skip
            jobs[pool.submit(poison_job, job)] = attack
        clean_metrics, timings["clean_measure_s"] = clean_measure.result()
        done = {}
        for future in as_completed(jobs):
            attack = jobs[future]
            done[attack] = future.result()
            print(
                f"[{attack}] trained in {done[attack]['train_s'] / 60:.1f} min, "
                f"ASR {fmt(done[attack]['metrics'].get('asr'))} ({len(done)}/{len(jobs)} attacks, "
                f"{(time.perf_counter() - started) / 60:.1f} min)",
                flush=True,
            )
    rows: list[dict] = []
    for attack in args.attacks:
        timings[f"{attack}_train_s"] = done[attack]["train_s"]
        timings[f"{attack}_measure_s"] = done[attack]["measure_s"]
        metrics = done[attack]["metrics"]
        for row in shift_rows(attack, MABA_BASE.get(attack), metrics, clean_metrics, ks, args.shifts):
            rows.append({**row, "export": done[attack]["export"]})
    timings["total_s"] = time.perf_counter() - started

    table = markdown(rows, COLUMNS_MD)
    out.mkdir(parents=True, exist_ok=True)
    from attacks.io import atomic_write_text

    atomic_write_text(out / "study.md", table + "\n")
    heat_map(rows, args.shifts, out / "asr_g.png")
    results = {
        "rows": rows,
        "ks": ks,
        "clean_metrics": clean_metrics,
        "timings": timings,
        "jobs": args.jobs,
        "judge": str(judge),
        "clean_export": str(clean),
        "family": args.family,
        "args": vars(args),
        "wandb_group": group,
        "environment": environment(),
    }
    write_results(jsonable(results), out, args.output)
    if args.logger == "wandb":
        log_to_wandb(rows, out, group)
    print(table)
    print(f"total {timings['total_s'] / 60:.1f} min ({args.jobs} job(s) at a time)")
    return results


def jsonable(value):
    """``value`` with every non-finite float as None (strict JSON); the rows name why under ``invalid``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


if __name__ == "__main__":
    main()
