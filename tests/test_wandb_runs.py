"""Every stage is its own W&B run: two trainings in one process (what the quickstart does) give two offline
runs, each in its own run folder, each finished with its own summary, both in the invocation's group.

wandb 0.31 writes nothing but the run's transaction log offline (no `wandb-summary.json`, no
`wandb-metadata.json`): `run-<id>.wandb`, records in the LevelDB log format (7-byte file header, 32 KiB
blocks, 7-byte chunk headers: crc32, length, type), each a `wandb_internal_pb2.Record`. The tests read that
log: the run record (name and group), the summary updates and the exit record (written by `finish`).
wandb-core's writer buffers the log and flushes it when the stream closes, shortly after `finish` returns:
the tests wait (a few seconds at most) for the exit record before they judge a run.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import lightning as L
import pytest

from mmbackdoor_cli.pipeline import invocation_group, logger_overrides, train
from mmbackdoor_cli.wandb_mode import GROUP_ENV
from tests.conftest import tiny_overrides

CLEAN = "configs/clip_shapes_clean.yaml"
POISON = "configs/clip_shapes_badnet.yaml"
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def offline_records(path: Path) -> list:
    """The records of an offline run's `.wandb` log, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        if length == 0 and kind == 0:  # zero padding up to the block's end
            pos += BLOCK - pos % BLOCK
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def offline_run(run_dir: Path, wait_s: float = 30.0) -> dict:
    """Name, group, summary and exit code of the one offline W&B run in `run_dir` (exit None: unfinished,
    after waiting `wait_s` for the exit record)."""
    logs = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 1, f"{run_dir}: expected one offline W&B run, found {[str(p) for p in logs]}"
    deadline = time.monotonic() + wait_s
    records = offline_records(logs[0])
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = offline_records(logs[0])
    out = {"name": None, "group": None, "summary": {}, "exit_code": None}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["name"], out["group"] = record.run.display_name, record.run.run_group
        elif kind == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                out["summary"][key] = json.loads(item.value_json)
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def wandb_overrides(root: Path, epochs: int) -> list[str]:
    """The tiny-run overrides with the real (default) WandbLogger instead of `--trainer.logger=false`."""
    return [
        *[o for o in tiny_overrides(root, 64, 32, 32, epochs) if not o.startswith("--trainer.logger")],
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--data.init_args.batch_size=16",
    ]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv(GROUP_ENV, "pytest-two-stages")
    yield
    import wandb

    if wandb.run is not None:  # a leaked run would make every later WandbLogger reuse it
        wandb.run.finish(exit_code=1)


def test_each_stage_in_one_process_is_its_own_finished_wandb_run_in_the_invocation_group(
    tmp_path, offline_wandb
):
    import wandb

    clean = train(CLEAN, *wandb_overrides(tmp_path / "clean", epochs=1))
    assert wandb.run is None, "the first stage left its W&B run active: the next stage would reuse it"
    poisoned = train(
        POISON,
        *wandb_overrides(tmp_path / "poisoned", epochs=2),
        f"--model.init_args.init_from={clean.export}",
        "--data.init_args.poison_rate=0.5",
    )
    runs = {
        "clean": (clean, offline_run(clean.run_dir)),
        "poisoned": (poisoned, offline_run(poisoned.run_dir)),
    }
    for stage, (trained, run) in runs.items():
        assert run["name"] == f"{stage}/version_0"
        assert run["group"] == "pytest-two-stages"
        assert run["exit_code"] == 0, f"{stage}: the W&B run was never finished"
        for key in ("val/ca", "val/asr", "train/poisoned_fraction"):
            assert run["summary"][key] == pytest.approx(trained.metrics[key], abs=1e-6), (stage, key)
    assert runs["clean"][1]["summary"]["epoch"] == 0
    assert runs["poisoned"][1]["summary"]["epoch"] == 1
    assert runs["clean"][1]["summary"]["train/poisoned_fraction"] == 0
    assert runs["poisoned"][1]["summary"]["train/poisoned_fraction"] > 0.25


class FailAtTrainStart(L.Callback):
    """Raises once training has started (the W&B run exists by then)."""

    def on_train_start(self, trainer, pl_module) -> None:
        raise RuntimeError("stage failed on purpose")


def test_a_failing_stage_finishes_its_wandb_run_with_a_nonzero_exit_code(tmp_path, offline_wandb):
    import wandb

    with pytest.raises(RuntimeError, match="stage failed on purpose"):
        train(
            CLEAN,
            *wandb_overrides(tmp_path / "failed", epochs=1),
            "--trainer.callbacks+=tests.test_wandb_runs.FailAtTrainStart",
        )
    assert wandb.run is None, "the failed stage left its W&B run active"
    failed = offline_run(tmp_path / "failed" / "version_0")
    assert failed["exit_code"] == 1
    clean = train(CLEAN, *wandb_overrides(tmp_path / "clean", epochs=1))
    assert offline_run(clean.run_dir)["exit_code"] == 0


def test_a_group_override_wins_over_the_invocation_group(tmp_path, offline_wandb):
    run = train(
        CLEAN, *wandb_overrides(tmp_path / "clean", epochs=1), "--trainer.logger.init_args.group=mine"
    )
    assert offline_run(run.run_dir)["group"] == "mine"


def test_a_scripts_wandb_choice_logs_a_stage_whose_config_turns_the_logger_off(tmp_path, offline_wandb):
    # what disp_pipeline.py --logger wandb does with the MDLM configs (`trainer.logger: false`)
    off = [*wandb_overrides(tmp_path / "stage", epochs=1), "--trainer.logger=false"]
    run = train(CLEAN, *off, *logger_overrides("wandb"))
    logged = offline_run(run.run_dir)
    assert (logged["name"], logged["group"], logged["exit_code"]) == (
        "stage/version_0",
        "pytest-two-stages",
        0,
    )
    assert logger_overrides("false") == ["--trainer.logger=false"]
    with pytest.raises(ValueError, match="'tensorboard'"):
        logger_overrides("tensorboard")


def test_invocation_group_is_set_once_and_kept_by_nested_scripts(monkeypatch):
    monkeypatch.setenv(GROUP_ENV, "")
    group = invocation_group("quickstart")
    assert group.startswith("quickstart-") and len(group) == len("quickstart-20261201-094500")
    assert invocation_group("attack_table") == group
    monkeypatch.setenv(GROUP_ENV, "user-chosen")
    assert invocation_group("quickstart") == "user-chosen"
