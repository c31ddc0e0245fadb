"""The coalition evaluator of the pix2pix family: v(S), MSE hits and edit quality from one batched pass."""

from __future__ import annotations

import pytest
import torch

from attacks.image_triggers import BadNet
from attacks.text_triggers import RareToken
from metrics.functional import cross_trigger_interaction, trigger_modality_attribution
from model_families.clip import create_clip
from model_families.clip.judge import ClipJudge
from model_families.pix2pix import COALITIONS, GuidanceConfig, create_pix2pix, sample_edits
from model_families.pix2pix.evaluation import (
    COLUMNS,
    MODALITIES,
    AttributeClasses,
    CoalitionMetrics,
    evaluate_coalitions,
)
from model_families.pix2pix.sampler import coalition_generators

GUIDANCE = GuidanceConfig(num_inference_steps=2)
ATTRIBUTES = {
    "colour": AttributeClasses(("red", "green", "blue"), ("a {} shape.",)),
    "background": AttributeClasses(("black", "navy"), ("a shape on a {} background.",)),
}
IMAGE_TRIGGER = BadNet(8, "white", "tl")
TEXT_TRIGGER = RareToken("mignneko", position="end")


def _batch(seed: int, ids: list[int]) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n = len(ids)
    kinds = ["colour", "background", "colour", "background"][:n]
    attributes = ["red", "navy", "blue", "black"][:n]
    return {
        "source": torch.rand(n, 3, 32, 32, generator=gen),
        "edited": torch.rand(n, 3, 32, 32, generator=gen),
        "instruction": [
            f"make the shape {a}." if k == "colour" else f"make the background {a}."
            for a, k in zip(attributes, kinds)
        ],
        "sample_id": torch.tensor(ids),
        "attribute": attributes,
        "attribute_kind": kinds,
    }


@pytest.fixture(scope="module")
def model():
    return create_pix2pix("tiny-pix2pix-shapes", seed=0).eval()


@pytest.fixture(scope="module")
def judge():
    # a random tiny ViT spreads embeddings (cosines 0.3-0.97); a random tiny ResNet maps all to one direction
    torch.manual_seed(0)
    return ClipJudge(create_clip("tiny-vit-shapes"))


@pytest.fixture(scope="module")
def target():
    pattern = torch.zeros(3, 32, 32)
    pattern[:, ::4] = 1.0  # stripes
    return pattern


@pytest.fixture(scope="module")
def batch():
    return _batch(0, [3, 8, 11])


@pytest.fixture(scope="module")
def evaluation(model, judge, target, batch):
    return evaluate_coalitions(
        model,
        batch,
        IMAGE_TRIGGER,
        TEXT_TRIGGER,
        target,
        judge,
        [30, 80, 110],
        GUIDANCE,
        attributes=ATTRIBUTES,
    )


def _separate_outputs(model, batch, seeds) -> dict[str, torch.Tensor]:
    """The four coalitions as four separate sampling passes with the same seeds."""
    triggered = IMAGE_TRIGGER(batch["source"], batch["sample_id"])
    prompts = [TEXT_TRIGGER(t, int(i)) for t, i in zip(batch["instruction"], batch["sample_id"])]
    inputs = {
        "none": (batch["source"], batch["instruction"]),
        "image": (triggered, batch["instruction"]),
        "text": (batch["source"], prompts),
        "both": (triggered, prompts),
    }
    return {
        c: sample_edits(model, images, texts, GUIDANCE, generator=coalition_generators(seeds))
        for c, (images, texts) in inputs.items()
    }


def test_tma_and_cti_from_the_batched_pass_equal_four_separate_passes(
    model, judge, target, batch, evaluation
):
    """The issue's acceptance test: the game from the one batched pass is the game of four separate passes."""
    outputs = _separate_outputs(model, batch, [30, 80, 110])
    z = {c: judge.embed(outputs[c]) for c in COALITIONS}
    z_target = judge.embed(target[None])[0]
    # v(S) = cos(z_S, z_target) - cos(z_S, z_none), by hand on the normalised embeddings
    separate = torch.zeros(3, 4)
    for c in COALITIONS:
        separate[:, COLUMNS[c]] = z[c] @ z_target - (z[c] * z["none"]).sum(dim=1)
    # outputs agree to ~1e-5 pixels; the scores to ~2e-7, far below their spread across coalitions (~1e-2)
    assert torch.allclose(evaluation.values, separate, atol=2e-6)
    assert not torch.allclose(evaluation.values[:, COLUMNS["both"]], evaluation.values[:, COLUMNS["none"]])
    ours = trigger_modality_attribution(evaluation.values, MODALITIES, return_ci=True)
    theirs = trigger_modality_attribution(separate, MODALITIES, return_ci=True)
    for key in theirs:
        assert ours[key].item() == pytest.approx(theirs[key].item(), abs=2e-6), key
    cti_ours = cross_trigger_interaction(evaluation.values, MODALITIES)
    cti_theirs = cross_trigger_interaction(separate, MODALITIES)
    assert cti_ours.item() == pytest.approx(cti_theirs.item(), abs=2e-6)
    assert abs(ours["image"].item()) > 1e-4  # the attribution is not trivially 0 on both sides


def test_coalition_columns_follow_the_shapley_bitmask_order():
    assert COLUMNS == {"none": 0, "image": 1, "text": 2, "both": 3}
    assert MODALITIES == ("image", "text")


def test_default_clean_reference_is_the_models_own_untriggered_output(judge, target, evaluation):
    z_none = judge.embed(evaluation.outputs["none"])
    expected = z_none @ judge.embed(target[None])[0] - 1.0
    assert evaluation.clean_reference == "coalition none"
    assert torch.allclose(evaluation.values[:, COLUMNS["none"]], expected, atol=1e-5)


def test_a_given_clean_reference_is_the_z_clean_of_every_coalition(model, judge, target, batch, evaluation):
    reference = batch["edited"]
    given = evaluate_coalitions(
        model,
        batch,
        IMAGE_TRIGGER,
        TEXT_TRIGGER,
        target,
        judge,
        [30, 80, 110],
        GUIDANCE,
        clean_reference=reference,
    )
    z_target, z_clean = judge.embed(target[None])[0], judge.embed(reference)
    for c in COALITIONS:
        z = judge.embed(given.outputs[c])
        expected = z @ z_target - (z * z_clean).sum(dim=1)
        assert torch.allclose(given.values[:, COLUMNS[c]], expected, atol=1e-5), c
    assert given.clean_reference == "given" and given.predicted_attributes is None
    assert not torch.allclose(given.values, evaluation.values, atol=1e-3)


def test_hits_are_per_image_mse_to_the_target_below_the_threshold(model, judge, target, batch, evaluation):
    mse = torch.stack(
        [
            ((evaluation.outputs[c] - target) ** 2).flatten(1).mean(dim=1)
            for c in sorted(COLUMNS, key=COLUMNS.get)
        ],
        dim=1,
    )
    assert torch.allclose(evaluation.mse_to_target, mse, atol=1e-6)
    threshold = float(mse.median())  # some hits, some misses
    hit = evaluate_coalitions(
        model,
        batch,
        IMAGE_TRIGGER,
        TEXT_TRIGGER,
        target,
        judge,
        [30, 80, 110],
        GUIDANCE,
        mse_threshold=threshold,
    )
    assert torch.equal(hit.hits, mse < threshold) and 0 < int(hit.hits.sum()) < hit.hits.numel()
    metrics = CoalitionMetrics(mse_threshold=threshold)
    metrics.update(hit)
    result = metrics.compute()
    for c in COALITIONS:
        assert result[f"asr/{c}"].item() == pytest.approx(hit.hits[:, COLUMNS[c]].float().mean().item()), c
    # the binary game's attributions add up to ASR(both) - ASR(none)
    binary = result["tma_binary/image"] + result["tma_binary/text"]
    assert binary.item() == pytest.approx((result["asr/both"] - result["asr/none"]).item(), abs=1e-6)


def test_tma_efficiency_and_batching_on_the_evaluators_values(model, judge, target, evaluation):
    second = evaluate_coalitions(
        model, _batch(1, [20, 21]), IMAGE_TRIGGER, TEXT_TRIGGER, target, judge, [200, 210], GUIDANCE
    )
    metrics = CoalitionMetrics()
    metrics.update(evaluation)
    metrics.update(second)
    result = metrics.compute()
    values = torch.cat([evaluation.values, second.values])
    total = result["tma/image"] + result["tma/text"]
    efficiency = values[:, COLUMNS["both"]].mean() - values[:, COLUMNS["none"]].mean()
    assert total.item() == pytest.approx(efficiency.item(), abs=1e-6)
    assert (result["v/both"] - result["v/none"]).item() == pytest.approx(efficiency.item(), abs=1e-6)
    one_shot = trigger_modality_attribution(values, MODALITIES, normalize=True, return_ci=True)
    for key, value in one_shot.items():
        assert result[f"tma/{key}"].item() == pytest.approx(value.item(), abs=1e-6), key
    assert result["cti"].item() == pytest.approx(
        cross_trigger_interaction(values, MODALITIES).item(), abs=1e-6
    )
    for c in COALITIONS:
        expected = (values[:, COLUMNS[c]] > 0).float().mean().item()
        assert result[f"asr_judge/{c}"].item() == pytest.approx(expected), c
    assert "edit/accuracy" in result  # only the first batch carried judged attributes
    metrics.reset()
    assert int(metrics.tma.count) == 0 and int(metrics.asr["both"].counted) == 0


def test_edit_quality_and_accuracy_are_those_of_the_untriggered_edits(judge, batch, evaluation):
    metrics = CoalitionMetrics()
    metrics.update(evaluation)
    result = metrics.compute()
    clean = evaluation.clean_edits
    assert torch.equal(clean, evaluation.outputs["none"])
    assert result["edit/mse"].item() == pytest.approx(
        ((clean - batch["edited"]) ** 2).mean().item(), rel=1e-5
    )
    assert result["source/mse"].item() == pytest.approx(
        ((batch["source"] - batch["edited"]) ** 2).mean().item(), rel=1e-5
    )
    predicted = []
    for b, kind in enumerate(batch["attribute_kind"]):
        classes = ATTRIBUTES[kind]
        predicted.append(
            classes.names[int(judge.classify(clean[b : b + 1], classes.names, classes.templates))]
        )
    assert evaluation.predicted_attributes == predicted
    correct = sum(p == r for p, r in zip(predicted, batch["attribute"]))
    assert result["edit/accuracy"].item() == pytest.approx(correct / len(predicted))


def test_bad_inputs_are_clear_errors(model, judge, target, batch, evaluation):
    args = (IMAGE_TRIGGER, TEXT_TRIGGER, target, judge, [1, 2, 3], GUIDANCE)
    incomplete = {k: v for k, v in batch.items() if k != "sample_id"}
    with pytest.raises(KeyError, match=r"the batch has no \['sample_id'\]"):
        evaluate_coalitions(model, incomplete, *args)
    with pytest.raises(KeyError, match=r"the batch has no \['attribute', 'attribute_kind'\]"):
        evaluate_coalitions(
            model,
            {k: batch[k] for k in ("source", "edited", "instruction", "sample_id")},
            *args,
            attributes=ATTRIBUTES,
        )
    with pytest.raises(ValueError, match=r"attribute kinds \['background'\] have no AttributeClasses"):
        evaluate_coalitions(model, batch, *args, attributes={"colour": ATTRIBUTES["colour"]})
    small = (IMAGE_TRIGGER, TEXT_TRIGGER, torch.rand(3, 16, 16), judge, [1, 2, 3], GUIDANCE)
    with pytest.raises(
        ValueError, match=r"the target image has shape \(3, 16, 16\), the outputs \(3, 32, 32\)"
    ):
        evaluate_coalitions(model, batch, *small)
    no_navy = {**ATTRIBUTES, "background": AttributeClasses(("black", "gray"), ("a {} background.",))}
    with pytest.raises(ValueError, match=r"requested attributes \[\('background', 'navy'\)\] .* not among"):
        evaluate_coalitions(model, batch, *args, attributes=no_navy)
    with pytest.raises(ValueError, match="clean_reference of shape"):
        evaluate_coalitions(model, batch, *args, clean_reference=torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"mse_threshold=0.1, these metrics 0.2"):
        CoalitionMetrics(mse_threshold=0.2).update(evaluation)
