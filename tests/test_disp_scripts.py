"""The DiSP scripts' helpers: one sampler setting changed on top of a config's own sampler, and the package
versions recorded with every result."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from disp_common import environment, generation_override  # noqa: E402


def test_generation_override_keeps_the_configs_sampler_and_sets_the_cache(tmp_path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {"model": {"init_args": {"generation": {"gen_length": 8, "block_length": 4, "steps": 2}}}},
            sort_keys=False,
        )
    )
    assert generation_override(str(config), cache="prefix") == (
        "--model.init_args.generation={gen_length: 8, block_length: 4, steps: 2, cache: prefix}"
    )
    assert generation_override(str(config), "purify_generation", steps=4).startswith(
        "--model.init_args.purify_generation={gen_length: 8, block_length: 4, steps: 4"
    )


def test_generation_override_of_a_shipped_config_parses_into_a_generation_config() -> None:
    from model_families.mdlm.inference import GenerationConfig

    override = generation_override("configs/mdlm_shapes_poison.yaml", cache="dual")
    value = yaml.safe_load(override.split("=", 1)[1])
    assert GenerationConfig.from_dict(value).cache == "dual"


def test_environment_names_the_numerical_packages() -> None:
    import torch

    found = environment()
    assert found["torch"] == torch.__version__.split("+")[0] or found["torch"].startswith(torch.__version__)
    assert {"python", "transformers", "lightning"} <= set(found)


def test_environment_names_the_cpu_model(tmp_path, monkeypatch) -> None:
    """The embedded DiSP table follows the CPU (docs/disp.md, Results), so the results JSON names it."""
    from disp_common import cpu_model

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654\n")
    assert cpu_model(cpuinfo) == "AMD EPYC 9654"
    monkeypatch.setattr("platform.processor", lambda: "x86_64")
    assert cpu_model(tmp_path / "absent") == "x86_64"
    assert environment()["cpu"] == cpu_model()
