"""The family-free auxiliary attribute heads (``model.vision_aux``): the loss equals its formula for both
poolings, bad options and attribute values are refused by name; LLaVA adds the loss of the projected image tokens
only when asked, and never exports the heads."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.llava_finetune import LlavaFineTuning
from lightning_modules.vision_aux import VisionAuxHeads
from model_families.llava import load_snapshot
from tests.test_llava_finetune import _batch

CLASSES = {"shape": ["circle", "star", "heart"], "colour": ["red", "blue"]}


def _expected(heads: VisionAuxHeads, vision: torch.Tensor, attributes: list[dict]) -> torch.Tensor:
    means = []
    for name, head in heads.items():
        terms = []
        for sample, attrs in enumerate(attributes):
            if name not in attrs:
                continue
            label = CLASSES[name].index(attrs[name])
            rows = vision[sample] if heads.pooling == "token" else vision[sample].mean(dim=0, keepdim=True)
            terms.extend(-torch.log_softmax(head(rows), dim=-1)[:, label])
        means.append(torch.stack(terms).mean())
    return torch.stack(means).mean()


@pytest.mark.parametrize("pooling", ["mean", "token"])
def test_aux_loss_is_the_mean_cross_entropy_of_each_attribute(pooling: str) -> None:
    torch.manual_seed(0)
    heads = VisionAuxHeads(CLASSES, 8, pooling)
    vision = torch.randn(3, 5, 8)
    attributes = [{"shape": "star", "colour": "blue"}, {"shape": "heart"}, {"colour": "red"}]
    assert torch.allclose(heads.loss(vision, attributes), _expected(heads, vision, attributes), atol=1e-6)
    assert heads.loss(vision, [{}, None, {"size": "large"}]) is None  # no sample has an attribute


def test_bad_aux_options_and_values_are_refused_by_name() -> None:
    assert VisionAuxHeads.from_options(CLASSES, 0.0, 8) is None  # off by default
    with pytest.raises(ValueError, match="vision_aux_pooling='max'"):
        VisionAuxHeads.from_options(CLASSES, 1.0, 8, "max")
    with pytest.raises(ValueError, match=r"vision_aux_weight > 0 needs model\.vision_aux"):
        VisionAuxHeads.from_options(None, 1.0, 8)
    with pytest.raises(ValueError, match="vision_aux_weight must be >= 0"):
        VisionAuxHeads.from_options(CLASSES, -1.0, 8)
    with pytest.raises(ValueError, match=r"model\.vision_aux\.shape.*\['cross'\]"):
        VisionAuxHeads(CLASSES, 8).loss(torch.randn(1, 2, 8), [{"shape": "cross"}])


def test_llava_adds_the_aux_loss_of_its_projected_image_tokens_only_when_asked(tmp_path) -> None:
    torch.manual_seed(0)
    plain = LlavaFineTuning()
    assert plain.vision_aux_heads is None
    batch = _batch(plain)
    batch["attributes"] = [{"shape": "circle", "colour": "red"}, {"shape": "star", "colour": "blue"}]
    plain.model.eval()
    assert torch.equal(plain.training_step(batch, 0), plain.loss(batch))

    module = LlavaFineTuning(vision_aux=CLASSES, vision_aux_weight=2.0, vision_aux_pooling="token")
    module.model.eval()
    answer, aux = module.losses(batch)
    vision = module.model.model.get_image_features(
        pixel_values=module.pixel_values(batch),
        vision_feature_layer=module.model.config.vision_feature_layer,
        vision_feature_select_strategy=module.model.config.vision_feature_select_strategy,
    ).pooler_output
    vision = torch.stack(list(vision))
    assert vision.shape[:2] == (2, module.image_tokens)
    assert torch.allclose(aux, _expected(module.vision_aux_heads, vision, batch["attributes"]), atol=1e-5)
    total = module.training_step(batch, 0)
    assert torch.allclose(total, answer + 2.0 * aux, atol=1e-6)
    aux.backward()  # the heads train the vision tower
    tower = module.model.model.vision_tower
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in tower.parameters())
    optimised = {id(p) for _, p in module._named_parameters()}  # what the optimizer trains
    assert all(id(p) in optimised for p in module.vision_aux_heads.parameters())

    path = module.export(tmp_path / "export")  # a plain llava-hf snapshot: the strict loader takes it
    assert load_snapshot(path).model.state_dict().keys() == plain.model.state_dict().keys()
