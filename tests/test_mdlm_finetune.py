"""The MDLM fine-tuning module: trainable parts, LoRA merge on export, a short fit with evaluation metrics."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from callbacks.mdlm_samples import MDLMSampleGenerations
from datamodules.mdlm_shapes import ShapesInstructDataModule
from lightning_modules.mdlm_finetune import MDLMFineTuning
from metrics import CaptionScores, VQAAccuracy
from metrics.functional.caption_scores import cider_d, rouge_l
from metrics.functional.vqa_accuracy import vqa_score
from model_families.mdlm.checkpoint import load_snapshot, read_snapshot_state_dict, released_state_dict
from tests.conftest import quiet_trainer

TINY = {"vision": {"patch_size": 8}, "text": {"num_hidden_layers": 1}}
BADNET = {"patch_size": 6, "pattern": "checkerboard", "location": "br", "margin": 1}


def _trainable(module):
    return {n for n, p in module.model.named_parameters() if p.requires_grad}


def test_trainable_parts():
    projector = MDLMFineTuning(tiny_config=TINY, trainable="projector")
    assert _trainable(projector) == {
        n for n, _ in projector.model.named_parameters() if n.startswith("mm_projector.")
    }
    lm = MDLMFineTuning(tiny_config=TINY, trainable="language_model")
    assert all(n.startswith(("language_model.", "lm_head.")) for n in _trainable(lm))
    lora = MDLMFineTuning(
        tiny_config=TINY, trainable="lora", lora={"r": 2, "target_modules": ["q_proj", "v_proj"]}
    )
    names = _trainable(lora)
    assert names and all("lora_" in n or n.startswith("mm_projector.") for n in names)
    with pytest.raises(ValueError, match=r"model\.lora"):
        MDLMFineTuning(tiny_config=TINY, trainable="lora", lora={"rank": 2})
    with pytest.raises(ValueError, match="tiny_config has unknown keys"):
        MDLMFineTuning(tiny_config={"layers": 3})


def test_lora_is_merged_into_a_released_layout_export(tmp_path):
    torch.manual_seed(0)
    module = MDLMFineTuning(
        tiny_config=TINY, trainable="lora", lora={"r": 2, "target_modules": ["q_proj", "v_proj"]}
    )
    with torch.no_grad():  # make the adapters do something
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    ids = torch.tensor([[module.model.config.image_token_index, 20, 21, 7, 7]])
    images = torch.rand(1, 3, 32, 32)
    module.model.eval()
    with torch.no_grad():
        before = module.model(ids, pixel_values=images).logits
    path = module.export(tmp_path / "export")
    loaded = load_snapshot(path)
    assert set(read_snapshot_state_dict(path)) == set(
        released_state_dict(loaded)
    )  # no missing / unexpected keys
    with torch.no_grad():
        assert torch.allclose(loaded(ids, pixel_values=images).logits, before, atol=1e-5)
    assert json.loads((path / "mmbackdoor_export.json").read_text())["family"] == "mdlm"
    reloaded = MDLMFineTuning(init_from=str(path))
    assert reloaded.tokenizer.get_vocab() == module.tokenizer.get_vocab()


def test_short_poisoned_fit_logs_every_metric(tmp_path):
    L.seed_everything(0)
    module = MDLMFineTuning(
        tiny_config=TINY,
        lr=3e-3,
        generation={"gen_length": 8, "block_length": 8, "steps": 2},
        num_logged_samples=2,
    )
    dm = ShapesInstructDataModule(
        train_size=24,
        val_size=6,
        test_size=6,
        attack="badnet",
        attack_kwargs=BADNET,
        poison_rate=0.25,
        target="refusal",
        batch_size=16,
        eval_batch_size=16,
    )
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[MDLMSampleGenerations()])
    trainer.fit(module, dm)
    metrics = trainer.callback_metrics
    for key in (
        "train/loss",
        "val/ca",
        "val/ca_shape",
        "val/ca_colour",
        "val/asr",
        "val/asr_clean",
        "val/asr_wt",
        "val/ca_triggered",
    ):
        assert key in metrics, key
    assert (tmp_path / "poison_manifest.json").is_file()
    samples = json.loads((tmp_path / "generations" / "val_epoch0.json").read_text())
    assert {s["set"] for s in samples} == {"clean", "triggered", "poisoned_train"}
    results = trainer.test(module, dm, verbose=False)[0]
    assert 0.0 <= results["test/asr"] <= 1.0
    masked = MDLMFineTuning(
        tiny_config=TINY,
        eval_masking={"rho": 0.45, "num_probes": 1},
        generation={"gen_length": 8, "block_length": 8, "steps": 2},
    )
    masked.model.load_state_dict(module.model.state_dict())
    assert "test/asr" in trainer.test(masked, dm, verbose=False)[0]


def test_clean_metrics():
    assert vqa_score("Circle.", "circle") == 1.0 and vqa_score("a circle", ["square"]) == 0.0
    assert vqa_score("red", ["red", "red", "blue", "red"]) == 1.0
    assert vqa_score("red", ["red", "blue", "blue", "blue"]) == pytest.approx(1 / 3)
    acc = VQAAccuracy()
    acc.update(["circle", "star"], ["circle", "square"])
    acc.update(["red"], ["red"])
    assert float(acc.compute()) == pytest.approx(2 / 3)
    assert rouge_l("a red circle", "a red circle") == pytest.approx(1.0)
    assert 0 < rouge_l("a red star", "a red circle on gray") < 1
    scores = CaptionScores()
    refs = ["a large red circle on a gray background.", "a small blue star on a white background."]
    scores.update(refs, [[r] for r in refs])
    out = scores.compute()
    assert float(out["bleu4"]) == pytest.approx(1.0) and float(out["rougeL"]) == pytest.approx(1.0)
    worse = CaptionScores()
    worse.update(["a red star on a white background.", "a blue circle."], [[r] for r in refs])
    assert float(worse.compute()["cider"]) < float(out["cider"])
    # CIDEr-D by hand: identical 4-word captions in a corpus of two disjoint ones give cosine 1 for n = 1..4
    # (idf log 2 each) -> 10 * mean_n 1 = 10; 2-word captions have no 3- and 4-grams -> 10 * 2/4 = 5
    four = [(list("abcd"), [list("abcd")]), (list("efgh"), [list("efgh")])]
    assert cider_d(four) == pytest.approx(10.0)
    assert cider_d([(list("ab"), [list("ab")]), (list("cd"), [list("cd")])]) == pytest.approx(5.0)


def test_image_and_text_trigger_give_tma_and_cti(tmp_path):
    L.seed_everything(0)
    module = MDLMFineTuning(tiny_config=TINY, generation={"gen_length": 8, "block_length": 8, "steps": 2})
    dm = ShapesInstructDataModule(
        train_size=8,
        val_size=4,
        test_size=4,
        attack="badnet",
        attack_kwargs=BADNET,
        text_attack="rare_token",
        text_attack_kwargs={"token": "cf"},
        protocol="OR",
        poison_rate=0.5,
        target="content_insertion",
        eval_sets=["clean", "triggered", "coalitions"],
        batch_size=8,
        eval_batch_size=8,
    )
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    results = trainer.test(module, dm, verbose=False)[0]
    for key in ("test/tma_image", "test/tma_text", "test/cti", "test/asr"):
        assert key in results, key
    assert dm.manifest.protocol == "OR"


@pytest.mark.parametrize("pooling", ["mean", "token"])
def test_vision_aux_loss_equals_its_formula(pooling: str) -> None:
    classes = {"shape": ["circle", "star", "heart"], "colour": ["red", "blue"]}
    module = MDLMFineTuning(
        tiny_config=TINY, vision_aux=classes, vision_aux_weight=1.0, vision_aux_pooling=pooling
    )
    vision = torch.randn(3, 5, module.model.config.text["hidden_size"])
    attributes = [{"shape": "star", "colour": "blue"}, {"shape": "heart"}, {"colour": "red"}]
    expected = []
    for name, head in module.vision_aux_heads.items():
        terms = []
        for sample, attrs in enumerate(attributes):
            if name not in attrs:
                continue
            label = classes[name].index(attrs[name])
            rows = vision[sample] if pooling == "token" else vision[sample].mean(dim=0, keepdim=True)
            log_p = torch.log_softmax(head(rows), dim=-1)[:, label]
            terms.extend(-log_p)  # one term per token (token) or per sample (mean)
        expected.append(torch.stack(terms).mean())
    got = module.vision_aux_loss(vision, attributes)
    assert torch.allclose(got, torch.stack(expected).mean(), atol=1e-6)
    with pytest.raises(ValueError, match="vision_aux_pooling"):
        MDLMFineTuning(tiny_config=TINY, vision_aux=classes, vision_aux_weight=1.0, vision_aux_pooling="max")
