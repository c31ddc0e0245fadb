"""DiSP on LLaVA through the family-free defense code: LLaVA's adapter gives the saliency of its vision tokens
(every estimator agrees with the exact Fisher-Jacobian form), unmasked answers equal the module's evaluation
answers, masking changes them, and the shipped config purifies and recovers a poisoned tiny LLaVA end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datamodules.instruct_data import InstructCollator
from defenses.disp.masking import DiSPMasking
from lightning_modules.llava_finetune import LlavaFineTuning
from mmbackdoor_cli.cli import main
from model_families.llava.disp import LlavaDiSP

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUIET = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=false",
]
QUESTIONS = ["what is it?", "describe the image.", "what colour is the shape?"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    module = LlavaFineTuning(generation={"max_new_tokens": 6})
    module.model.eval()
    items = [
        {"image": torch.rand(3, 32, 32), "question": q, "answer": "x", "index": i, "key": str(i)}
        for i, q in enumerate(QUESTIONS)
    ]
    return module, InstructCollator(module.instruct_text(), 8)(items)


def test_saliency_estimators_of_the_llava_adapter_agree_with_the_exact_form(tiny):
    module, batch = tiny
    family = LlavaDiSP.from_module(module)
    exact = family.scores(batch, DiSPMasking(estimator="exact"), None)
    assert exact.shape == (3, 16) and bool((exact > 0).all())
    for estimator in ("vjp", "jvp"):
        masking = DiSPMasking(estimator=estimator, num_probes=64)
        estimate = family.scores(batch, masking, torch.Generator().manual_seed(0))
        assert torch.allclose(estimate, exact, rtol=0.3), estimator  # unbiased Hutchinson, 64 probes


def test_unmasked_answers_are_the_modules_and_masking_changes_them(tiny):
    module, batch = tiny
    family = LlavaDiSP.from_module(module)
    plain, selected = family.masked_responses(batch, DiSPMasking(rho=0.0))
    assert selected is None and plain == module.generate_responses(batch, 0)
    generator = torch.Generator().manual_seed(0)
    _, selected = family.masked_responses(batch, DiSPMasking(rho=0.45), generator)
    assert selected.sum(dim=1).tolist() == [7, 7, 7]  # round(0.45 * 16)
    for mode in ("mask", "drop"):
        every, _ = family.masked_responses(batch, DiSPMasking(rho=1.0, mode=mode, selection="random"))
        assert every != plain, mode  # no image left: other answers
    with pytest.raises(ValueError, match=r"selection 'attention' .* LlavaDiSP does not supply"):
        family.masked_responses(batch, DiSPMasking(selection="attention"))


def test_disp_config_purifies_and_recovers_a_poisoned_tiny_llava(tmp_path):
    small = [
        "--data.init_args.train_size=8", "--data.init_args.val_size=2", "--data.init_args.test_size=2",
        "--trainer.max_steps=1", "--trainer.check_val_every_n_epoch=1", *QUIET,
    ]  # fmt: skip
    clean = LlavaFineTuning(generation={"max_new_tokens": 4}).export(tmp_path / "clean")
    poison = main(
        ["fit", "--config", str(CONFIGS / "llava_shapes_blended.yaml"), *small,
         f"--trainer.default_root_dir={tmp_path / 'poison'}", f"--model.init_args.init_from={clean}",
         "--data.init_args.poison_rate=0.25"]
    )  # fmt: skip
    export = Path(poison.trainer.mmbackdoor_export)
    disp = main(
        ["fit", "--config", str(CONFIGS / "disp_llava_shapes.yaml"), *small,
         f"--trainer.default_root_dir={tmp_path / 'disp'}", f"--model.init_args.init_from={export}",
         f"--data.init_args.poison_manifest={export / 'poison_manifest.json'}",
         '--model.init_args.generation={"max_new_tokens": 4}']
    )  # fmt: skip
    purified = Path(disp.trainer.default_root_dir) / "purified"
    records = json.loads((purified / "purified.json").read_text())
    manifest = json.loads((purified / "manifest.json").read_text())
    assert len(records) == 8 * 3 and manifest["status"] == "complete"
    assert manifest["settings"]["generation"]["max_new_tokens"] == 4  # LLaVA's generation settings
    assert {r["masked_vision_tokens"] for r in records} == {7}
    poisoned = json.loads((export / "poison_manifest.json").read_text())["indices"]
    assert poisoned and all(records[i]["original_response"].startswith("banana") for i in poisoned)
    assert "val/asr_wt" in disp.trainer.callback_metrics
