"""Time and peak memory of InverTune's stages against one epoch of the CleanCLIP and PAR baselines.

All stages run in the same process, through the public pipeline that the callback and the module wrap
(``defenses.invertune.identify`` / ``invert`` / ``tune``), on the same defender data (the clean set of
``configs/invertune_clip_shapes.yaml``'s datamodule) and the same suspect model, with the
hyperparameters of the shipped configs:

- identification: fit the UAP and rank the classes (step 1);
- inversion: invert the trigger of the identified class (step 2);
- tuning: activation tuning on one batch (step 3);
- CleanCLIP / PAR: one epoch of fine-tuning over the same clean pairs (the unit the paper's baselines
  repeat 10 times over 10x more data).

    python bench/bench_defenses.py [--victim runs/clip_shapes_badnet/latest_export] [--device cpu|cuda]
        [--threads 2] [--model-name RN50 --image-size 224 --clean-size 256]   # random real-scale model

Peak memory: on CUDA the peak allocated memory of the stage; on the CPU the peak growth of the
process's resident set during the stage (sampled every 2 ms; the allocator reuses freed memory, so
this is a lower bound). Ratios are against one CleanCLIP epoch measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.defender_shapes import DefenderShapesDataModule
from defenses.cleanclip import CleanCLIPObjective
from defenses.frozen import FrozenCopy
from defenses.invertune import IdentifyConfig, InvertConfig, TuneConfig, identify, invert, tune
from defenses.invertune.clean_images import CleanImages
from defenses.invertune.pipeline import draw_tuning_batch
from defenses.par import PARObjective
from defenses.victim import load_victim
from model_families.clip import create_clip, zero_shot_weights

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class PeakMemory:
    """Peak memory of a block: CUDA peak allocated, or CPU resident-set growth (sampled)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mib = device, 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._rss())
            time.sleep(0.002)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._max = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._max, self._rss())
        self.seconds = time.perf_counter() - self._start
        self.peak_mib = (peak - self._base) / 2**20


def config_args(name: str) -> tuple[dict, dict, dict]:
    """(callback init_args, model init_args, data init_args) of a shipped config."""
    config = yaml.safe_load((CONFIGS / name).read_text())
    callbacks = config.get("trainer", {}).get("callbacks", [])
    callback = next((c["init_args"] for c in callbacks if c["class_path"].endswith("TriggerInversion")), {})
    return callback, config["model"]["init_args"], config["data"]["init_args"]


def finetune_epoch(model, objective, loader, lr: float, weight_decay: float, device) -> int:
    """One epoch of a baseline's fine-tuning (AdamW, train mode); returns the number of steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    steps = 0
    for batch in loader:
        loss = objective(model, batch["image"].to(device), batch["caption"]).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    return steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--victim", default=None, help="suspect export (default: a random --model-name model)"
    )
    parser.add_argument("--model-name", default="tiny-rn-shapes")
    parser.add_argument(
        "--image-size", type=int, default=None, help="world image size (default: the model's)"
    )
    parser.add_argument(
        "--clean-size", type=int, default=None, help="defender images (default: the config's)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    callback_args, model_args, data_args = config_args("invertune_clip_shapes.yaml")
    _, cleanclip_args, _ = config_args("cleanclip_clip_shapes.yaml")
    _, par_args, _ = config_args("par_clip_shapes.yaml")
    torch.manual_seed(0)
    bundle = load_victim(args.victim) if args.victim else create_clip(args.model_name)
    model, normalize = bundle.model.to(device), bundle.normalize.to(device)
    data_args = {k: v for k, v in data_args.items() if k not in ("attack", "attack_kwargs", "target_class")}
    data_args["image_size"] = args.image_size or bundle.image_size
    if args.clean_size:
        data_args["clean_size"] = args.clean_size
    dm = DefenderShapesDataModule(**data_args)
    dm.setup("fit")
    loader = dm.train_dataloader()
    text = zero_shot_weights(
        model, bundle.tokenizer, dm.class_names, model_args.get("zero_shot_templates", "embedded"), device
    )
    identify_config = IdentifyConfig.from_callback_args(callback_args)
    invert_config = InvertConfig.from_callback_args(callback_args)
    tune_config = TuneConfig.from_config(model_args)
    rows: dict[str, dict] = {}

    with PeakMemory(device) as mem:
        size = (data_args["image_size"],) * 2
        found = identify(
            model, CleanImages(loader, device), text, normalize, dm.class_names, size, identify_config
        )
    rows["identification"] = {"seconds": mem.seconds, "peak_mib": mem.peak_mib}

    with PeakMemory(device) as mem:  # the optional warp estimate counts as part of the inversion
        inverted = invert(model, loader, found.target, text, normalize, dm.class_names, invert_config)
    rows["inversion"] = {"seconds": mem.seconds, "peak_mib": mem.peak_mib}

    batch, labels = draw_tuning_batch(
        loader, tune_config.tuning_batch_size, tune_config.settings.seed, with_labels=tune_config.needs_labels
    )
    with PeakMemory(device) as mem:
        tune(
            model,
            normalize,
            tune_config,
            batch.to(device),
            inverted.trigger,
            found.target,
            text,
            labels=None if labels is None else labels.to(device),
            uap=found.uap,
            warp=inverted.warp,
        )
    rows["tuning"] = {"seconds": mem.seconds, "peak_mib": mem.peak_mib}

    for name, args_, make in (
        (
            "cleanclip_epoch",
            cleanclip_args,
            lambda m: CleanCLIPObjective(bundle.tokenizer, normalize, seed=0),
        ),
        (
            "par_epoch",
            par_args,
            lambda m: PARObjective(
                FrozenCopy(m).to(device).model,
                bundle.tokenizer,
                normalize,
                tau=par_args.get("tau", 2.15),
                seed=0,
            ),
        ),
    ):
        torch.manual_seed(0)
        fresh = (load_victim(args.victim) if args.victim else create_clip(args.model_name)).model.to(device)
        objective = make(fresh)
        with PeakMemory(device) as mem:
            steps = finetune_epoch(fresh, objective, loader, args_["lr"], args_["weight_decay"], device)
        rows[name] = {"seconds": mem.seconds, "peak_mib": mem.peak_mib, "steps": steps}
        del fresh, objective

    base = rows["cleanclip_epoch"]
    print(
        f"device {device}, {args.threads} threads, model {bundle.model_name}, "
        f"{len(dm.train_data)} clean images at {data_args['image_size']} px\n"
    )
    print("| stage | seconds | peak memory (MiB) | time / CleanCLIP epoch |")
    print("|---|---|---|---|")
    total = 0.0
    for name, row in rows.items():
        if name in ("identification", "inversion", "tuning"):
            total += row["seconds"]
        print(
            f"| {name} | {row['seconds']:.2f} | {row['peak_mib']:.0f} | {row['seconds'] / base['seconds']:.2f} |"
        )
    print(f"| InverTune total | {total:.2f} | - | {total / base['seconds']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
