"""Runs started or finishing at the same moment never crash or share a folder, and
`--run_version_dir=false` on a folder holding a previous run stops before anything is trained."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import lightning.pytorch as pl
import pytest

import mmbackdoor_cli.cli as cli_module
from callbacks.export import update_link
from mmbackdoor_cli.cli import MMBackdoorCLI, main

CONFIGS = Path(__file__).parents[1] / "configs"
CLEAN = str(CONFIGS / "clip_shapes_clean.yaml")


def _in_threads(n: int, work) -> list[BaseException]:
    """Run `work(i)` in `n` threads released together; the exceptions they raised."""
    barrier, errors = threading.Barrier(n), []

    def body(i: int) -> None:
        barrier.wait()
        try:
            work(i)
        except BaseException as exc:  # collected and asserted on
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_update_link_never_raises_and_leaves_a_valid_link(tmp_path):
    targets = [tmp_path / f"version_{i}" / "export" for i in range(4)]
    for target in targets:
        target.mkdir(parents=True)
    link = tmp_path / "latest_export"

    def work(i: int) -> None:
        for _ in range(300):
            update_link(link, targets[i])

    errors = _in_threads(len(targets), work)
    assert errors == []
    assert link.is_symlink() and link.resolve() in {t.resolve() for t in targets}
    assert not os.path.isabs(os.readlink(link))  # relative: the runs folder can be moved
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp link left


def test_concurrent_run_folder_allocations_are_distinct(tmp_path):
    claimed: list[list[Path]] = [[] for _ in range(6)]

    def work(i: int) -> None:
        for _ in range(15):
            claimed[i].append(cli_module.allocate_run_dir(tmp_path / "runs"))

    assert _in_threads(len(claimed), work) == []
    folders = [p for per_thread in claimed for p in per_thread]
    assert len(set(folders)) == len(folders) == 90
    assert all(p.is_dir() for p in folders)


def test_a_folder_taken_between_check_and_create_is_not_shared(tmp_path, monkeypatch):
    """Another run creates version_0 right after this one looked for the next free N."""
    original, raced = cli_module.next_run_dir, []

    def racing_next_run_dir(root: Path) -> Path:
        chosen = original(root)
        if not raced:
            chosen.mkdir(parents=True)
            (chosen / "config.yaml").write_text("other run\n")
            raced.append(chosen)
        return chosen

    monkeypatch.setattr(cli_module, "next_run_dir", racing_next_run_dir)
    cli = MMBackdoorCLI(
        args=["--config", CLEAN, "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"],
        run=False,
    )
    assert raced == [tmp_path / "version_0"]
    assert Path(cli.trainer.default_root_dir) == tmp_path / "version_1"
    assert (tmp_path / "version_0" / "config.yaml").read_text() == "other run\n"


def _previous_run(folder: Path) -> bytes:
    (folder / "checkpoints").mkdir(parents=True)
    config = b"# the previous run's resolved config\nseed_everything: 7\n"
    (folder / "config.yaml").write_bytes(config)
    return config


def _refuse_training(monkeypatch) -> list[str]:
    calls: list[str] = []

    def record(name):
        def fake(self, *args, **kwargs):
            calls.append(name)

        return fake

    for name in ("fit", "validate", "test"):
        monkeypatch.setattr(pl.Trainer, name, record(name))
    return calls


def test_no_version_dir_on_a_previous_run_fails_before_training(tmp_path, monkeypatch):
    old_config = _previous_run(tmp_path / "run")
    calls = _refuse_training(monkeypatch)
    with pytest.raises(FileExistsError) as info:
        main(
            [
                "fit",
                "--config",
                CLEAN,
                "--trainer.logger=false",
                f"--trainer.default_root_dir={tmp_path / 'run'}",
                "--run_version_dir=false",
            ]
        )
    message = str(info.value)
    assert str(tmp_path / "run") in message and "config.yaml" in message and "checkpoints" in message
    assert "--trainer.default_root_dir" in message and "--run_version_dir=true" in message
    assert calls == []
    assert (tmp_path / "run" / "config.yaml").read_bytes() == old_config
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "config.yaml"]


def test_no_version_dir_still_serves_evaluation_in_a_used_folder(tmp_path, monkeypatch):
    """validate/test and the scripts' in-process evaluation (run=False) reuse one folder on purpose."""
    _previous_run(tmp_path / "eval")
    calls = _refuse_training(monkeypatch)
    args = ["--config", CLEAN, "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path / 'eval'}"]
    main(["validate", *args, "--run_version_dir=false"])
    assert calls == ["validate"]
    cli = MMBackdoorCLI(args=[*args, "--run_version_dir=false"], run=False, instantiate=False)
    assert cli.config.trainer.default_root_dir == str(tmp_path / "eval")
