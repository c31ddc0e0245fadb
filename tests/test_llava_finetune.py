"""The LLaVA fine-tuning module: trainable scopes, the response-only loss, LoRA merged on export, a short fit
on the embedded world through the shared instruction datamodule (``data.family: llava``)."""

from __future__ import annotations

import json

import pytest
import torch

from datamodules.instruct_data import InstructCollator
from datamodules.mdlm_shapes import ShapesInstructDataModule
from lightning_modules.llava_finetune import LlavaFineTuning
from model_families.llava import load_snapshot
from model_families.llava.modeling import expand_image_tokens
from tests.conftest import quiet_trainer

LORA = {"r": 2, "target_modules": ["q_proj", "v_proj"]}


def _trainable(module):
    return {n for n, p in module.model.named_parameters() if p.requires_grad}


def _batch(module, answers=("circle", "a large red star.")):
    items = [
        {"image": torch.rand(3, 32, 32), "question": "what is it?", "answer": a, "index": i, "key": str(i)}
        for i, a in enumerate(answers)
    ]
    return InstructCollator(module.instruct_text(), 8)(items)


def test_trainable_scopes():
    projector = _trainable(LlavaFineTuning(trainable="projector"))
    assert projector and all(n.startswith("model.multi_modal_projector.") for n in projector)
    stage2 = _trainable(LlavaFineTuning(trainable="projector_lm"))
    assert not any(".vision_tower." in n for n in stage2)
    assert any(n.startswith("lm_head.") for n in stage2) and any(".language_model." in n for n in stage2)
    lora = _trainable(LlavaFineTuning(trainable="lora", lora=LORA))
    assert lora and all("lora_" in n or ".multi_modal_projector." in n for n in lora)
    with pytest.raises(ValueError, match=r"model\.lora"):
        LlavaFineTuning(trainable="lora", lora={"rank": 2})
    with pytest.raises(ValueError, match=r"model\.trainable='language_model'"):
        LlavaFineTuning(trainable="language_model")


def test_loss_is_the_cross_entropy_of_the_answer_tokens_only():
    torch.manual_seed(0)
    module = LlavaFineTuning()
    batch = _batch(module)
    module.model.eval()
    loss = module.loss(batch)
    ids, mask = expand_image_tokens(batch["input_ids"], 4, 16, batch["attention_mask"])
    from model_families.llava.modeling import position_ids

    logits = module.model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids(mask),
        pixel_values=module.pixel_values(batch),
    ).logits
    prompt = ids.shape[1] - 8  # responses take the last 8 columns; the loss covers answer + </s>
    terms = []
    for row, count in enumerate(batch["response_tokens"].tolist()):
        for pos in range(prompt, prompt + count):
            terms.append(torch.nn.functional.cross_entropy(logits[row, pos - 1], ids[row, pos]))
    assert len(terms) == 2 + 6  # 'circle </s>' and 'a large red star . </s>'
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)


def test_lora_is_merged_into_a_llava_hf_export(tmp_path):
    torch.manual_seed(0)
    module = LlavaFineTuning(trainable="lora", lora=LORA, generation={"max_new_tokens": 4})
    with torch.no_grad():  # make the adapters do something
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    batch = _batch(module)
    module.model.eval()
    with torch.no_grad():
        before = module.loss(batch)
    path = module.export(tmp_path / "export")
    meta = json.loads((path / "mmbackdoor_export.json").read_text())
    assert meta["family"] == "llava" and meta["generation"]["max_new_tokens"] == 4
    loaded = load_snapshot(path)
    assert not any("lora" in n for n in loaded.model.state_dict())
    again = LlavaFineTuning(init_from=str(path))
    again.model.eval()
    with torch.no_grad():
        assert torch.allclose(again.loss(batch), before, atol=1e-5)
    assert again.inputs["model.init_from"]["resolved"] == str(path.resolve())


def test_a_short_fit_on_the_shapes_world_learns_and_is_scored(tmp_path):
    torch.manual_seed(0)
    module = LlavaFineTuning(lr=3e-3, generation={"max_new_tokens": 4})
    data = ShapesInstructDataModule(
        family="llava", train_size=128, val_size=16, test_size=16, tasks=["colour"], batch_size=32
    )
    trainer = quiet_trainer(tmp_path, max_epochs=6, limit_val_batches=1, num_sanity_val_steps=0)
    data.trainer = trainer
    data.setup("fit")
    with torch.no_grad():
        first = module.loss(next(iter(data.train_dataloader())))
    trainer.fit(module, datamodule=data)
    assert float(trainer.callback_metrics["train/loss"]) < float(first) / 2
    assert "val/ca" in trainer.callback_metrics and "val/ca_colour" in trainer.callback_metrics
    assert data.instruct_text() is module.text  # the module's tokenizer and template format the data


def test_snapshot_whose_tokenizer_disagrees_on_the_image_id_is_refused(tmp_path):
    module = LlavaFineTuning()
    path = module.export(tmp_path / "export")
    config = json.loads((path / "config.json").read_text())
    config["image_token_index"] = 5
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match="the tokenizer's '<image>' is id 4, the model's image_token_index is 5"
    ):
        LlavaFineTuning(init_from=str(path))


def test_maba_scorer_is_the_answer_log_probability_and_has_gradients_to_the_image():
    from attacks.maba import check_image_gradients

    torch.manual_seed(0)
    module = LlavaFineTuning()
    module.model.eval()
    image = torch.rand(1, 3, 32, 32)
    scorer = module.image_text_scorer(question="what is it?")
    score = scorer(image, ["a large red star."])
    items = [
        {"image": image[0], "question": "what is it?", "answer": "a large red star.", "index": 0, "key": "0"}
    ]
    batch = InstructCollator(module.instruct_text(), None)(items)
    tokens = int(batch["response_tokens"][0])  # the answer's tokens and </s>
    assert torch.allclose(score, -module.loss(batch) * tokens, atol=1e-4)
    check_image_gradients(scorer, torch.rand(2, 3, 32, 32), ["circle", "banana"])
