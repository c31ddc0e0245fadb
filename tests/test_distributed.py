"""The same config under 2-process DDP on CPU: it trains, and its evaluation metrics equal the
single-process ones on the same model and data (uneven shards, no padding duplicates)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from model_families.clip import create_clip, save_clip_export

ROOT = Path(__file__).parents[1]
CONFIG = "configs/clip_shapes_badnet.yaml"


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("LOCAL_RANK", None)
    env.pop("MMBACKDOOR_RUN_DIR", None)
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_ddp_evaluation_equals_single_process(tmp_path):
    bundle = create_clip("tiny-rn-shapes")
    export = save_clip_export(bundle, tmp_path / "export")
    common = [
        "--",
        "--data.init_args.train_size=16",
        "--data.init_args.val_size=16",
        "--data.init_args.test_size=301",
        "--data.init_args.eval_batch_size=64",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}/eval",
    ]
    results = {}
    for name, extra in {
        "single": ["--trainer.devices=1"],
        "ddp": ["--trainer.devices=2", "--trainer.strategy=ddp"],
    }.items():
        out = tmp_path / f"{name}.json"
        run(
            [
                str(ROOT / "evaluate.py"),
                "--config",
                CONFIG,
                "--checkpoint",
                f"m={export}",
                "--output",
                str(out),
                *common,
                *extra,
            ],
            cwd=ROOT,
        )
        results[name] = json.loads(out.read_text())["results"]["m"]
    for key in ("test/ca", "test/asr"):
        assert abs(results["single"][key] - results["ddp"][key]) < 1e-6, (key, results)


def test_ddp_training_runs_in_one_run_folder(tmp_path):
    run(
        [
            str(ROOT / "train.py"),
            "--config",
            CONFIG,
            "--model.init_args.init_from=null",
            "--trainer.logger=false",
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            "--trainer.max_epochs=1",
            "--data.init_args.train_size=128",
            "--data.init_args.val_size=32",
            "--data.init_args.test_size=32",
            "--data.init_args.batch_size=32",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}/runs",
        ],
        cwd=ROOT,
    )
    versions = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith("version_"))
    assert versions == ["version_0"]
    assert (tmp_path / "runs" / "version_0" / "export" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "version_0" / "poison_manifest.json").is_file()
