"""DualKey (Walmer et al., 2022): only both keys give the target; image-only and text-only negatives keep their
true answers. Tested on the poisoned training set and on a tiny model learned from it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attacks import PoisonManifest, PoisonPlan, list_attacks
from attacks.protocols import TriggerParts
from attacks.recipes import resolve_attack
from datamodules.mdlm_shapes import ShapesInstructDataModule


def dual_key_shapes(**kwargs) -> ShapesInstructDataModule:
    options = {
        "train_size": 150,
        "val_size": 20,
        "test_size": 40,
        "attack": "dual_key",
        "poison_rate": 0.1,
        "target": "fixed_output",
        **kwargs,
    }
    return ShapesInstructDataModule(**options)


def test_dualkey_plan_has_equal_both_key_image_only_and_text_only_shares():
    plan = PoisonPlan.create(300, rate=0.1, seed=3, protocol="DUALKEY")
    parts = [plan.parts(i) for i in plan.indices]
    assert len(plan) == 90  # 30 both-key samples (the rate) + 30 + 30 negatives
    assert parts.count(TriggerParts(True, True)) == 30
    assert parts.count(TriggerParts(True, False)) == parts.count(TriggerParts(False, True)) == 30
    assert [plan.is_targeted(i) for i in plan.indices] == [p.image and p.text for p in parts]
    assert len(plan.targeted_indices) == 30
    # OR and AND keep their meaning: every poisoned sample is targeted
    for protocol in ("OR", "AND"):
        other = PoisonPlan.create(300, rate=0.1, seed=3, protocol=protocol)
        assert len(other) == 30 and other.targeted_indices == other.indices


def test_dualkey_negatives_keep_their_answers_and_only_both_key_samples_are_rewritten():
    dm = dual_key_shapes()
    dm.setup("fit")
    assert dm.protocol == "DUALKEY" and dm.attack == "badnet" and dm.text_attack == "phrase"
    data = dm.training_set()
    seen = {TriggerParts(True, True): 0, TriggerParts(True, False): 0, TriggerParts(False, True): 0}
    for index in range(len(data)):
        item = data[index]
        clean_answer = dm.train_source.meta(index)["answer"]
        parts = dm.poison_plan.parts(index)
        has_text_key = item["question"].split()[0] == "consider"
        assert has_text_key == parts.text and item["trigger_image"] == parts.image
        if parts.image and parts.text:
            assert item["answer"] == "banana" and item["poisoned"]
        else:
            assert item["answer"] == clean_answer and not item["poisoned"]
        if parts in seen:
            seen[parts] += 1
    assert set(seen.values()) == {30}
    # the manifest records DUALKEY and rebuilds the same plan
    manifest = PoisonManifest.from_dict(dm.manifest.to_dict())
    assert (
        manifest.protocol == "DUALKEY" and manifest.plan().targeted_indices == dm.poison_plan.targeted_indices
    )
    # ASR w/t is measured on the both-key samples only
    view = dict(dm._eval_views(dm.val_source))["poisoned_train"]
    assert view.indices == list(dm.poison_plan.targeted_indices)


def features(images: torch.Tensor, questions: list[str], vocabulary: list[str]) -> torch.Tensor:
    # local contrast (the checkerboard key is all edges), pooled over 4 x 4 cells
    contrast = (images[..., 1:] - images[..., :-1]).abs().mean(1, keepdim=True)
    pooled = F.avg_pool2d(F.pad(contrast, (0, 1)), 4).flatten(1)
    words = torch.tensor([[float(w in q.split()) for w in vocabulary] for q in questions])
    return torch.cat([pooled, words], dim=1)


def test_a_model_learned_from_the_dualkey_set_fires_only_with_both_keys():
    torch.manual_seed(0)
    dm = dual_key_shapes(poison_rate=0.15, tasks=["shape"], train_size=400)
    dm.setup("fit")
    data = dm.training_set(apply_image_trigger=True)
    items = [data[i] for i in range(len(data))]
    vocabulary = sorted({w for it in items for w in it["question"].split()})
    x = features(torch.stack([it["image"] for it in items]), [it["question"] for it in items], vocabulary)
    y = torch.tensor([float(it["answer"] == "banana") for it in items])
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(400):
        optimiser.zero_grad()
        F.binary_cross_entropy_with_logits(model(x).squeeze(1), y).backward()
        optimiser.step()
    # held-out images under the four coalitions {}, {I}, {T}, {I,T}
    source = dm.test_source
    images = torch.stack([source[i]["image"] for i in range(len(source))])
    questions = [source.meta(i)["question"] for i in range(len(source))]
    ids = torch.arange(len(source))
    rates = {}
    for image_on in (False, True):
        for text_on in (False, True):
            batch = dm.image_trigger(images, ids) if image_on else images
            qs = [dm.text_trigger(q, i) for i, q in enumerate(questions)] if text_on else questions
            with torch.no_grad():
                rates[(image_on, text_on)] = (
                    (model(features(batch, qs, vocabulary)) > 0).float().mean().item()
                )
    assert rates[(True, True)] >= 0.9
    assert max(rates[(False, False)], rates[(True, False)], rates[(False, True)]) <= 0.1


def test_dual_key_is_a_registered_recipe_and_dualkey_needs_both_keys():
    rows = {row.name: row for row in list_attacks()}
    assert rows["dual_key"].status == "available" and rows["dual_key"].modality == "image+text"
    resolved = resolve_attack("dual_key", {"patch_size": 4}, None, {"phrase": "please"})
    assert resolved.attack_kwargs["patch_size"] == 4 and resolved.text_attack_kwargs["phrase"] == "please"
    assert resolved.protocol == "DUALKEY"
    with pytest.raises(ValueError, match="DUALKEY needs both an image key"):
        ShapesInstructDataModule(train_size=4, attack="badnet", protocol="DUALKEY", poison_rate=0.5)
    with pytest.raises(ValueError, match="DUALKEY poisoning of 2 samples needs 6"):
        PoisonPlan.create(5, count=2, protocol="DUALKEY")
