"""Command-line mistakes give the project's own one-line message: empty or missing config files, and
validation errors of model/datamodule constructors (which jsonargparse wraps in a long chain)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mmbackdoor_cli.cli as cli_module
from mmbackdoor_cli.cli import MMBackdoorCLI, main

ROOT = Path(__file__).parents[1]
MDLM = str(ROOT / "configs" / "mdlm_shapes_clean.yaml")


def test_empty_config_file_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here yet\n\n")
    with pytest.raises(ValueError, match=rf"config file {empty} is empty"):
        MMBackdoorCLI(args=["--config", str(empty)], run=False, instantiate=False)


def test_missing_config_file_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "no_such.yaml"
    with pytest.raises(FileNotFoundError, match=rf"config file not found: {missing}"):
        main(["fit", f"--config={missing}"])


def test_constructor_error_is_raised_as_the_projects_own(tmp_path):
    args = ["--config", MDLM, "--model.scheduler=foo", "--trainer.logger=false"]
    with pytest.raises(ValueError) as info:
        main(["fit", *args, f"--trainer.default_root_dir={tmp_path}"])
    assert str(info.value) == "model.scheduler='foo'; expected one of ('cosine', 'constant', 'wsd')"
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_constructor_error_on_the_command_line_prints_one_message_and_exits_2(tmp_path, capsys):
    args = ["--config", MDLM, "--model.scheduler=foo", "--trainer.logger=false"]
    with pytest.raises(SystemExit) as info:
        cli_module.command_line([*args, f"--trainer.default_root_dir={tmp_path}"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2] == "error: model.scheduler='foo'; expected one of ('cosine', 'constant', 'wsd')"
    assert "lightning_modules/mdlm_finetune.py" in err[-1] and "--debug" in err[-1]


def test_debug_flag_keeps_the_full_chain(tmp_path, monkeypatch):
    monkeypatch.delenv("MMBACKDOOR_DEBUG", raising=False)
    args = ["--config", MDLM, "--model.scheduler=foo", "--trainer.logger=false", "--debug"]
    with pytest.raises(ValueError) as info:
        cli_module.command_line([*args, f"--trainer.default_root_dir={tmp_path}"])
    assert "Does not validate against any of the Union subtypes" in str(info.value)
    assert "model.scheduler='foo'" in str(info.value.__cause__)
    assert os.environ.pop("MMBACKDOOR_DEBUG") == "1"


def test_train_py_reports_a_constructor_error_in_a_few_lines(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("MMBACKDOOR_DEBUG", None)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--config",
            MDLM,
            "--model.scheduler=foo",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and len(lines) <= 4, proc.stderr
    first_error = next(i for i, line in enumerate(lines) if line.startswith("error:"))
    assert lines[first_error] == "error: model.scheduler='foo'; expected one of ('cosine', 'constant', 'wsd')"
    assert first_error == len(lines) - 2  # only the "(--debug ...)" hint follows it
