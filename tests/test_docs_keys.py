"""Every constructor argument of a configurable class (what a config's ``init_args`` can set) is named in
the docs, so a key added without documentation fails here."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"

# class -> the doc page that must name its keys (None: any page under docs/)
DOCUMENTED = {
    "lightning_modules.invertune:InverTuneModule": "invertune.md",
    "callbacks.trigger_inversion:TriggerInversion": "invertune.md",
    "lightning_modules.cleanclip:CleanCLIPFineTuning": "invertune.md",
    "lightning_modules.par:PARFineTuning": "invertune.md",
    "datamodules.defender_shapes:DefenderShapesDataModule": "invertune.md",
    "lightning_modules.mdlm_disp:DiSPPurification": "disp.md",
    "lightning_modules.llava_disp:LlavaDiSPPurification": "disp.md",
    "lightning_modules.mdlm_finetune:MDLMFineTuning": None,
    "lightning_modules.clip_finetune:CLIPFineTuning": None,
    "datamodules.shapes_clip:ShapesCLIPDataModule": None,
    "datamodules.mdlm_shapes:ShapesInstructDataModule": None,
    "datamodules.llava_json:LlavaJsonDataModule": None,
    "datamodules.instruct:InstructDataModule": "disp.md",
    "datamodules.real_clip:ImageFolderCLIPDataModule": None,
    "datamodules.real_clip:CaptionCSVDataModule": None,
    "callbacks.mdlm_samples:MDLMSampleGenerations": None,
    "callbacks.sample_grid:PoisonSampleGrid": None,
    "callbacks.export:ExportOnFitEnd": None,
    "lightning_modules.pix2pix_finetune:Pix2PixFineTuning": "pix2pix.md",
    "model_families.pix2pix.sampler:GuidanceConfig": "pix2pix.md",
    "model_families.pix2pix.config:Pix2PixConfig": "pix2pix.md",
    "lightning_modules.llava_finetune:LlavaFineTuning": "llava.md",
    "model_families.llava.generation:LlavaGeneration": "llava.md",
    "model_families.llava.chat:LlavaChatTemplate": "llava.md",
}


def config_keys(path: str) -> list[str]:
    module, name = path.split(":")
    cls = getattr(importlib.import_module(module), name)
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def named_in(key: str, text: str) -> bool:
    """``key`` as a word inside a code span (`` `key` ``, `` `a.key` ``, `` `key: 3` ``)."""
    return re.search(r"`[^`\n]*\b" + re.escape(key) + r"\b[^`\n]*`", text) is not None


def test_named_in_needs_the_key_inside_a_code_span() -> None:
    assert named_in("lr", "| `lr`, `weight_decay` |") and named_in("seed", "`model.init_args.seed=1`")
    assert not named_in("lr", "the lr is small") and not named_in("lr", "`min_lrx`")


@pytest.mark.parametrize("path", sorted(DOCUMENTED))
def test_every_config_key_is_documented(path: str) -> None:
    page = DOCUMENTED[path]
    text = (DOCS / page).read_text() if page else "\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))
    missing = [key for key in config_keys(path) if not named_in(key, text)]
    assert not missing, f"{path}: keys not named in docs/{page or '*.md'}: {missing}"


def test_every_test_named_in_the_reliability_page_exists() -> None:
    """docs/reliability.md names the test that checks each bad input: a renamed or deleted test fails here."""
    text = (DOCS / "reliability.md").read_text()
    refs = re.findall(r"tests/(test_\w+\.py)::(\w+)", text)
    assert len(refs) > 50, "the reliability page names its tests as tests/test_x.py::test_name"
    tests = Path(__file__).resolve().parent
    missing = [
        f"{name}::{test}"
        for name, test in refs
        if not (tests / name).is_file()
        or not re.search(rf"def {re.escape(test)}\b", (tests / name).read_text())
    ]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
