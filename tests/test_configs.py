"""Every shipped YAML parses against the code's signatures (unknown keys, wrong types and bad class
paths fail here), without instantiating anything heavy."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmbackdoor_cli.cli import MMBackdoorCLI, with_default_subcommand

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_parses_against_the_code(config):
    cli = MMBackdoorCLI(
        args=["--config", str(config), "--trainer.logger=false"], run=False, instantiate=False
    )
    cfg = cli.config
    assert cfg.model.class_path and cfg.data.class_path
    assert cfg.trainer.default_root_dir


def test_unknown_config_key_is_an_error(tmp_path, capsys):
    src = (Path(__file__).parents[1] / "configs" / "clip_shapes_clean.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(src.replace("    lr: 3.0e-3", "    lr: 3.0e-3\n    learning_rte: 0.1"))
    with pytest.raises(SystemExit):
        MMBackdoorCLI(args=["--config", str(bad)], run=False, instantiate=False)
    assert "learning_rte" in capsys.readouterr().err


def test_unknown_override_is_an_error(capsys):
    cfg = str(Path(__file__).parents[1] / "configs" / "clip_shapes_clean.yaml")
    with pytest.raises(SystemExit):
        MMBackdoorCLI(
            args=["--config", cfg, "--data.init_args.poison_ratio=0.1"], run=False, instantiate=False
        )
    assert "poison_ratio" in capsys.readouterr().err


def test_fit_is_the_default_subcommand():
    assert with_default_subcommand(["--config", "x.yaml"]) == ["fit", "--config", "x.yaml"]
    assert with_default_subcommand(["test", "--config", "x.yaml"])[0] == "test"
