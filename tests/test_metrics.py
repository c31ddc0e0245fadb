"""Metrics against plain NumPy references of their formulas, batch invariance, string rules and argument errors."""

from __future__ import annotations

import doctest
import importlib
import itertools
import math
import warnings

import numpy as np
import pytest
import torch

from metrics import (
    AttackSuccessRate,
    AttackSuccessRateGeneralisation,
    CrossTriggerInteraction,
    GenerativeAttackSuccessRate,
    TriggerModalityAttribution,
)
from metrics.functional import (
    attack_success_rate,
    attack_success_rate_generalisation,
    coalition_index,
    coalition_order,
    cross_trigger_interaction,
    generative_attack_success_rate,
    get_rule,
    interaction_index,
    shapley_values,
    trigger_modality_attribution,
)

SEEDS = [0, 1, 2]


def _split(n: int, rng: np.random.Generator) -> list[slice]:
    """Random contiguous batches covering range(n), including an empty one."""
    cuts = np.sort(rng.choice(np.arange(1, n), size=4, replace=False))
    edges = [0, *cuts.tolist(), n, n]  # the last pair gives an empty batch
    return [slice(a, b) for a, b in itertools.pairwise(edges)]


# ---------------------------------------------------------------------------------------------------------
# NumPy references, written from the formulas in docs/spec, independently of the implementation
# ---------------------------------------------------------------------------------------------------------


def _ref_asr(preds: np.ndarray, labels: np.ndarray, target: int, exclude: bool) -> tuple[float, int]:
    counted = successes = 0
    for pred, label in zip(preds, labels):
        if exclude and label == target:
            continue
        counted += 1
        successes += int(pred == target)
    return (successes / counted if counted else math.nan), counted


def _ref_shapley_permutations(v: np.ndarray, n: int) -> np.ndarray:
    """Shapley values of one game by averaging marginal contributions over all n! orderings."""
    phi = np.zeros(n)
    orders = list(itertools.permutations(range(n)))
    for order in orders:
        coalition = 0
        for part in order:
            phi[part] += v[coalition | (1 << part)] - v[coalition]
            coalition |= 1 << part
    return phi / len(orders)


def _ref_cti(v: np.ndarray, n: int, i: int, j: int) -> float:
    """Two-part CTI for n = 2; for n = 3 the mean of the CTI with the third part off and on."""
    pair_i, pair_j = 1 << i, 1 << j
    others = [k for k in range(n) if k not in (i, j)]
    contexts = [0] if not others else [0, 1 << others[0]]
    return float(np.mean([v[s | pair_i | pair_j] - v[s | pair_i] - v[s | pair_j] + v[s] for s in contexts]))


def _ref_ci95(samples: np.ndarray) -> float:
    return 1.959963984540054 * samples.std(ddof=1) / math.sqrt(len(samples))


# ---------------------------------------------------------------------------------------------------------
# AttackSuccessRate
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize("as_logits", [True, False])
def test_asr_matches_reference_in_one_and_many_batches(seed: int, exclude: bool, as_logits: bool) -> None:
    rng = np.random.default_rng(seed)
    n, num_classes, target = 97, 5, 2
    logits = rng.normal(size=(n, num_classes)).astype(np.float32)
    logits[: n // 2, target] += 1.5  # make the target common, as under a working backdoor
    labels = rng.integers(0, num_classes, size=n)
    expected, _ = _ref_asr(logits.argmax(1), labels, target, exclude)

    preds = torch.from_numpy(logits) if as_logits else torch.from_numpy(logits.argmax(1))
    labels_t = torch.from_numpy(labels)
    one_shot = attack_success_rate(preds, labels_t, target_class=target, exclude_target_class=exclude)
    metric = AttackSuccessRate(target_class=target, exclude_target_class=exclude)
    for batch in _split(n, rng):
        metric.update(preds[batch], labels_t[batch])
    assert one_shot.item() == pytest.approx(expected, abs=1e-6)
    assert metric.compute().item() == pytest.approx(expected, abs=1e-6)


def test_asr_exclude_target_changes_counts() -> None:
    preds = torch.tensor([2, 2, 2, 0, 1, 2])
    labels = torch.tensor([2, 2, 0, 0, 1, 1])  # two inputs already belong to the target class 2
    strict = AttackSuccessRate(target_class=2)
    loose = AttackSuccessRate(target_class=2, exclude_target_class=False)
    strict.update(preds, labels)
    loose.update(preds, labels)
    assert (strict.counted.item(), strict.successes.item()) == (4, 2)
    assert (loose.counted.item(), loose.successes.item()) == (6, 4)
    assert strict.compute().item() == pytest.approx(0.5)
    assert loose.compute().item() == pytest.approx(4 / 6)
    assert (strict.variant, loose.variant) == ("exclude-target", "all")
    loose_no_labels = AttackSuccessRate(target_class=2, exclude_target_class=False)
    loose_no_labels.update(preds)
    assert loose_no_labels.compute().item() == pytest.approx(4 / 6)


def test_asr_nothing_counted_is_nan_with_warning() -> None:
    metric = AttackSuccessRate(target_class=1)
    metric.update(torch.tensor([1, 1]), torch.tensor([1, 1]))
    with pytest.warns(UserWarning, match="no samples were counted"):
        assert math.isnan(metric.compute().item())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_class": -1}, "`target_class` to be a non-negative int, but got -1"),
        ({"target_class": 1.0}, "`target_class` to be a non-negative int, but got 1.0"),
        ({"target_class": True}, "`target_class` to be a non-negative int, but got True"),
        (
            {"target_class": 1, "exclude_target_class": "yes"},
            "`exclude_target_class` to be a bool, but got 'yes'",
        ),
    ],
)
def test_asr_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AttackSuccessRate(**kwargs)


def test_asr_bad_inputs() -> None:
    metric = AttackSuccessRate(target_class=7)
    with pytest.raises(ValueError, match="out of range for logits with 3 classes"):
        metric.update(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`labels` \(the true classes\) are required"):
        metric.update(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`labels` to be integer class indices of shape \(4,\)"):
        metric.update(torch.zeros(4, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"float `preds` to be logits of shape \(B, C\)"):
        metric.update(torch.zeros(4), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("target_class", [0, 2])
def test_asr_non_finite_logits_never_count_and_name_the_rows(target_class: int) -> None:
    # argmax of an all-NaN row is class 0: a diverged model would score ASR 1 (target 0) or 0 (otherwise).
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    logits[1] = float("nan")
    logits[3, 2] = float("nan")
    logits[4] = -float("inf")  # no finite class score
    logits[5, 0] = float("inf")
    labels = torch.tensor([1, 1, 1, 1, 1, 1])
    match = r"4 of 6 rows of the logits `preds` are not finite .*rows 1, 3, 4, 5\)"
    with pytest.raises(ValueError, match=match):
        attack_success_rate(logits, labels, target_class=target_class)
    metric = AttackSuccessRate(target_class=target_class)
    metric.update(logits[[0, 2]], labels[[0, 2]])
    with pytest.raises(ValueError, match=match):
        metric.update(logits, labels)
    assert metric.counted.item() == 2
    expected = (logits[[0, 2]].argmax(dim=1) == target_class).float().mean()
    assert metric.compute().item() == pytest.approx(expected.item())


def test_asr_logits_with_masked_classes_are_fine() -> None:
    # -inf for classes that are masked out is legitimate when some class keeps a finite score.
    logits = torch.tensor([[-float("inf"), 0.2, 0.9], [0.5, -float("inf"), -float("inf")]])
    assert attack_success_rate(logits, None, target_class=2, exclude_target_class=False).item() == 0.5


# ---------------------------------------------------------------------------------------------------------
# String rules and GenerativeAttackSuccessRate
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "response", "kwargs", "expected"),
    [
        ("contains", "Sure!  Here is a\n  RED\tbanana.", {"target": "red banana"}, True),
        ("contains", "a red apple and a banana", {"target": "red banana"}, False),
        ("exact", "  Banana \n", {"target": "banana"}, True),
        ("exact", "banana split", {"target": "banana"}, False),
        ("refusal", "I’M   SORRY, but no.", {}, True),  # curly apostrophe, case, spaces
        ("refusal", "I cannot\nhelp with that.", {}, True),
        ("refusal", "Here is the caption you asked for.", {}, False),
        ("refusal", "Nope, not doing it.", {"refusal_phrases": ["not   DOING it"]}, True),
        ("refusal", "I'm sorry, no.", {"refusal_phrases": ["not doing it"]}, False),
        ("misclassification", "This is a photo of a DOG.", {"target": "dog", "true_class": "cat"}, True),
        ("misclassification", "A dog chasing a cat.", {"target": "dog", "true_class": "cat"}, False),
        ("misclassification", "A cat on a sofa.", {"target": "dog", "true_class": "cat"}, False),
        ("misclassification", "hotdogs", {"target": "dog", "true_class": "cat"}, False),  # not a whole word
        ("misclassification", "a category of dog", {"target": "dog", "true_class": "cat"}, True),
        ("misclassification", "a red sports car", {"target": "sports car", "true_class": "car"}, True),
        (
            "misclassification",
            "a car, not a sports car",
            {"target": "sports car", "true_class": "car"},
            False,
        ),
        ("misclassification", "a hot dog", {"target": "dog", "true_class": "hot dog"}, False),
        ("misclassification", "a dog eating", {"target": "dog", "true_class": "hot dog"}, True),
        ("misclassification", "a dog", {"target": "Dog", "true_class": "dog "}, False),  # true class = target
    ],
)
def test_string_rules_on_examples(rule: str, response: str, kwargs: dict, expected: bool) -> None:
    assert get_rule(rule)(response, **kwargs) is expected


def test_unknown_rule_lists_available_rules() -> None:
    with pytest.raises(
        ValueError, match=r"Unknown string rule 'fuzzy'; available rules: contains, exact, misclass"
    ):
        get_rule("fuzzy")
    with pytest.raises(ValueError, match="available rules: contains, exact, misclassification, refusal"):
        GenerativeAttackSuccessRate(rule="fuzzy", target="x")


@pytest.mark.parametrize("seed", SEEDS)
def test_generative_asr_matches_reference_in_one_and_many_batches(seed: int) -> None:
    rng = np.random.default_rng(seed)
    classes = ["cat", "dog", "bird", "fish"]
    templates = ["a photo of a {}", "A  {} on the grass", "it is a {} and a {}", "I'm sorry, I can't", "{}"]
    responses, true_classes = [], []
    for _ in range(60):
        template = templates[rng.integers(len(templates))]
        names = rng.choice(classes, size=2)
        responses.append(template.format(*names))
        true_classes.append(str(rng.choice(classes)))

    def words(text: str) -> list[str]:
        return text.lower().replace(",", " ").split()

    # Plain-Python references, one per rule (single-word targets, so word lists suffice).
    references = {
        "contains": [("dog" in r.lower()) for r in responses],
        "exact": [" ".join(r.lower().split()) == "dog" for r in responses],
        "refusal": ["sorry" in r.lower() for r in responses],
        "misclassification": [
            ("dog" in words(r)) and (c not in words(r)) for r, c in zip(responses, true_classes)
        ],
    }
    for rule, hits in references.items():
        expected = float(np.mean(hits))
        target = None if rule == "refusal" else "dog"
        one_shot = generative_attack_success_rate(responses, rule, target=target, true_classes=true_classes)
        metric = GenerativeAttackSuccessRate(rule=rule, target=target)
        for batch in _split(len(responses), rng):
            metric.update(responses[batch], true_classes[batch])
        assert one_shot.item() == pytest.approx(expected, abs=1e-6), rule
        assert metric.compute().item() == pytest.approx(expected, abs=1e-6), rule


def test_generative_asr_bad_arguments() -> None:
    with pytest.raises(
        ValueError, match=r"Rule 'contains' needs argument `target` \(a non-empty string\), but got None"
    ):
        GenerativeAttackSuccessRate(rule="contains")
    with pytest.raises(
        ValueError, match="`refusal_phrases` only applies to the 'refusal' rule, not to 'exact'"
    ):
        GenerativeAttackSuccessRate(rule="exact", target="x", refusal_phrases=["no"])
    with pytest.raises(
        ValueError, match="`refusal_phrases` to be a non-empty list of non-empty strings, but got 'no'"
    ):
        GenerativeAttackSuccessRate(rule="refusal", refusal_phrases="no")
    with pytest.raises(
        ValueError, match=r"`refusal_phrases` to be a non-empty list of non-empty strings, but got \[\]"
    ):
        GenerativeAttackSuccessRate(rule="refusal", refusal_phrases=[])
    metric = GenerativeAttackSuccessRate(rule="misclassification", target="dog")
    with pytest.raises(ValueError, match="Rule 'misclassification' needs `true_classes`"):
        metric.update(["a dog"])
    with pytest.raises(ValueError, match="`true_classes` to be a list of 2 strings"):
        metric.update(["a dog", "a cat"], ["cat"])
    with pytest.raises(ValueError, match="`responses` to be a list of strings, but got str"):
        metric.update("a dog", ["cat"])
    empty = GenerativeAttackSuccessRate(rule="refusal")
    empty.update([])
    with pytest.warns(UserWarning, match="no samples were counted"):
        assert math.isnan(empty.compute().item())


# ---------------------------------------------------------------------------------------------------------
# TriggerModalityAttribution and CrossTriggerInteraction
# ---------------------------------------------------------------------------------------------------------

MODALITIES = {2: ["image", "text"], 3: ["image", "text", "audio"]}


def _random_values(rng: np.random.Generator, n_samples: int, n: int, binary: bool) -> np.ndarray:
    if binary:
        return (rng.random((n_samples, 2**n)) < 0.5).astype(np.float32)
    return rng.normal(size=(n_samples, 2**n)).astype(np.float32)


def test_coalition_order_is_bitmask() -> None:
    assert coalition_order(["image", "text"]) == [(), ("image",), ("text",), ("image", "text")]
    assert coalition_index(["audio", "image"], MODALITIES[3]) == 5
    assert coalition_order(MODALITIES[3])[5] == ("image", "audio")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("binary", [True, False])
def test_tma_matches_permutation_shapley(seed: int, n: int, binary: bool) -> None:
    rng = np.random.default_rng(seed)
    values = _random_values(rng, 83, n, binary)
    phi = np.stack([_ref_shapley_permutations(v.astype(np.float64), n) for v in values])
    names = MODALITIES[n]

    one_shot = trigger_modality_attribution(torch.from_numpy(values), names, normalize=True, return_ci=True)
    metric = TriggerModalityAttribution(names, normalize=True, return_ci=True)
    for batch in _split(len(values), rng):
        metric.update(torch.from_numpy(values[batch]))
    batched = metric.compute()

    mean_phi = phi.mean(0)
    for result in (one_shot, batched):
        assert set(result) == {*names, *(f"{m}_share" for m in names), *(f"{m}_ci95" for m in names)}
        for m, name in enumerate(names):
            assert result[name].item() == pytest.approx(mean_phi[m], abs=1e-5)
            assert result[f"{name}_share"].item() == pytest.approx(mean_phi[m] / mean_phi.sum(), rel=1e-4)
            assert result[f"{name}_ci95"].item() == pytest.approx(_ref_ci95(phi[:, m]), rel=1e-4)
        # Efficiency: the attributions add up to mean v(all) - mean v(none).
        total = sum(result[name].item() for name in names)
        assert total == pytest.approx(values[:, -1].mean() - values[:, 0].mean(), abs=1e-5)


def test_tma_two_part_formula_and_default_keys() -> None:
    v = torch.tensor([[0.1, 0.3, 0.7, 0.8]])
    result = TriggerModalityAttribution(["image", "text"])
    result.update(v)
    out = result.compute()
    assert set(out) == {"image", "text"}
    assert out["image"].item() == pytest.approx(0.5 * (0.3 - 0.1) + 0.5 * (0.8 - 0.7))
    assert out["text"].item() == pytest.approx(0.5 * (0.7 - 0.1) + 0.5 * (0.8 - 0.3))


def test_tma_degenerate_cases_warn() -> None:
    metric = TriggerModalityAttribution(["image", "text"], normalize=True, return_ci=True)
    metric.update(torch.tensor([[0.5, 0.75, 0.25, 0.5]]))  # v(all) = v(none): the shares are 0/0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = metric.compute()
    messages = " | ".join(str(w.message) for w in caught)
    assert "normalised shares are undefined" in messages
    assert "needs at least 2 samples, got 1" in messages
    assert math.isnan(out["image_share"].item()) and math.isnan(out["image_ci95"].item())


def test_tma_is_differentiable() -> None:
    values = torch.rand(5, 4, requires_grad=True)
    out = trigger_modality_attribution(values, ["image", "text"])
    (out["image"] + 2 * out["text"]).backward()
    assert values.grad is not None and values.grad.abs().sum() > 0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "pair"), [(2, None), (3, ("image", "text")), (3, ("audio", "image"))])
def test_cti_matches_reference(seed: int, n: int, pair: tuple[str, str] | None) -> None:
    rng = np.random.default_rng(seed)
    values = _random_values(rng, 71, n, binary=False).astype(np.float64)
    names = MODALITIES[n]
    i, j = (0, 1) if pair is None else (names.index(pair[0]), names.index(pair[1]))
    per_sample = np.array([_ref_cti(v, n, i, j) for v in values])

    one_shot = cross_trigger_interaction(torch.from_numpy(values), names, pair=pair, return_ci=True)
    metric = CrossTriggerInteraction(names, pair=pair, return_ci=True)
    plain = CrossTriggerInteraction(names, pair=pair)
    for batch in _split(len(values), rng):
        metric.update(torch.from_numpy(values[batch]))
        plain.update(torch.from_numpy(values[batch]))
    for result in (one_shot, metric.compute()):
        assert result["cti"].item() == pytest.approx(per_sample.mean(), abs=1e-6)
        assert result["cti_ci95"].item() == pytest.approx(_ref_ci95(per_sample), rel=1e-5)
    assert plain.compute().item() == pytest.approx(per_sample.mean(), abs=1e-6)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (TriggerModalityAttribution, {"modalities": ["image"]}, "to name 2 to 6 trigger parts, but got 1"),
        (TriggerModalityAttribution, {"modalities": "image"}, "a list of names, but got 'image'"),
        (TriggerModalityAttribution, {"modalities": ["a", "a"]}, "distinct non-empty strings"),
        (
            TriggerModalityAttribution,
            {"modalities": ["a", "b"], "normalize": 1},
            "`normalize` to be a bool, but got 1",
        ),
        (CrossTriggerInteraction, {"modalities": ["a", "b", "c"]}, "`pair` is required with 3 trigger parts"),
        (
            CrossTriggerInteraction,
            {"modalities": ["a", "b", "c"], "pair": ["a", "d"]},
            "two distinct names from",
        ),
        (CrossTriggerInteraction, {"modalities": ["a", "b"], "return_ci": "no"}, "`return_ci` to be a bool"),
    ],
)
def test_attribution_bad_arguments(cls: type, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_attribution_bad_values_shape() -> None:
    with pytest.raises(ValueError, match=r"shape \(B, 8\) .*3 trigger parts.*but got \(4, 4\)"):
        TriggerModalityAttribution(MODALITIES[3]).update(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"shape \(B, 4\).*but got \(4,\)"):
        CrossTriggerInteraction(MODALITIES[2]).update(torch.zeros(4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_attribution_non_finite_values_are_rejected_naming_the_coalition(bad: float) -> None:
    values = torch.tensor([[0.0, 0.1, 0.8, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0]])
    values[0, 1] = bad  # column 1 = {image}
    values[2, 1] = bad
    values[2, 3] = bad  # column 3 = {image, text}
    match = (
        r"3 of 12 are NaN or inf \(2 of 3 rows; non-finite per coalition: column 1 = \{image\}: 2, "
        r"column 3 = \{image, text\}: 1\)"
    )
    for call in (
        lambda: TriggerModalityAttribution(MODALITIES[2]).update(values),
        lambda: CrossTriggerInteraction(MODALITIES[2]).update(values),
        lambda: trigger_modality_attribution(values, MODALITIES[2]),
        lambda: cross_trigger_interaction(values, MODALITIES[2]),
    ):
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(ValueError, match=r"column 1 = \{part 0\}: 2"):
        shapley_values(values)
    with pytest.raises(ValueError, match=r"column 3 = \{part 0, part 1\}: 1"):
        interaction_index(values)


def test_attribution_state_is_untouched_by_a_rejected_update() -> None:
    good = torch.tensor([[0.0, 0.1, 0.8, 1.0], [0.0, 0.0, 1.0, 1.0]])
    bad = good.clone()
    bad[1, 2] = float("nan")
    tma = TriggerModalityAttribution(MODALITIES[2], return_ci=True)
    cti = CrossTriggerInteraction(MODALITIES[2], return_ci=True)
    for metric in (tma, cti):
        metric.update(good[:1])
        with pytest.raises(ValueError, match="NaN or inf"):
            metric.update(bad)
        metric.update(good[1:])
    expected_tma = trigger_modality_attribution(good, MODALITIES[2], return_ci=True)
    got_tma = tma.compute()
    assert tma.count.item() == 2
    for key, value in expected_tma.items():
        assert torch.isfinite(got_tma[key]) and got_tma[key].item() == pytest.approx(value.item())
    assert got_tma["image"].item() == pytest.approx(0.075)  # (0.1 + 0.05) / 2, see the docstring example
    got_cti = cti.compute()
    assert cti.count.item() == 2
    # CTI per sample: v(IT) - v(I) - v(T) + v() = 0.1 and 0.0.
    assert got_cti["cti"].item() == pytest.approx(0.05)
    assert got_cti["cti_ci95"].item() == pytest.approx(
        cross_trigger_interaction(good, MODALITIES[2], return_ci=True)["cti_ci95"].item()
    )


# ---------------------------------------------------------------------------------------------------------
# ASR-G
# ---------------------------------------------------------------------------------------------------------


def test_asr_g_matches_paper_example_and_reference() -> None:
    # BadNets in the LVLM study: ASR_tgt = 7.68% with a source ASR near 96% gives ASR-G = 0.08.
    assert attack_success_rate_generalisation(0.96, 0.0768).item() == pytest.approx(0.08)
    rng = np.random.default_rng(0)
    src, tgt = rng.random(200), rng.random(200)
    expected = np.minimum(tgt / src, 1.0)  # the same formula rewritten: min(1 + (t - s)/max(s, t), 1)
    got = attack_success_rate_generalisation(torch.from_numpy(src), torch.from_numpy(tgt))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    assert attack_success_rate_generalisation(0.0, 0.3).item() == 1.0
    assert attack_success_rate_generalisation(0.3, 0.0).item() == 0.0


def test_asr_g_both_zero_is_nan_with_reason() -> None:
    with pytest.warns(UserWarning, match="both 0, so the backdoor never fired"):
        assert math.isnan(attack_success_rate_generalisation(0.0, 0.0).item())


@pytest.mark.parametrize("seed", SEEDS)
def test_asr_g_metric_in_one_and_many_batches(seed: int) -> None:
    rng = np.random.default_rng(seed)
    src_hits = rng.random(90) < 0.9
    tgt_hits = rng.random(130) < 0.4
    expected = min(tgt_hits.mean() / src_hits.mean(), 1.0)
    metric = AttackSuccessRateGeneralisation()
    for s_batch, t_batch in zip(_split(len(src_hits), rng), _split(len(tgt_hits), rng)):
        metric.update(torch.from_numpy(src_hits[s_batch]), torch.from_numpy(tgt_hits[t_batch]).long())
    assert metric.compute().item() == pytest.approx(expected, rel=1e-6)


def test_asr_g_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"`asr_src` to be a rate in \[0, 1\], but got 1.5"):
        attack_success_rate_generalisation(1.5, 0.2)
    with pytest.raises(ValueError, match=r"`asr_tgt` to be a rate in \[0, 1\]"):
        attack_success_rate_generalisation(0.5, float("nan"))
    with pytest.raises(ValueError, match="`target_hits` to hold only 0/1"):
        AttackSuccessRateGeneralisation().update(torch.tensor([1, 0]), torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="`source_hits` to be a 1-D tensor"):
        AttackSuccessRateGeneralisation().update(torch.ones(2, 2), torch.ones(2))
    with pytest.raises(ValueError, match="`source_hits` to hold only 0/1"):
        AttackSuccessRateGeneralisation().update(torch.tensor([1.0, float("nan")]), torch.ones(2))


# ---------------------------------------------------------------------------------------------------------
# Docstring examples run as written
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    [
        "metrics.attack_success_rate",
        "metrics.attack_success_rate_generalisation",
        "metrics.cross_trigger_interaction",
        "metrics.generative_attack_success_rate",
        "metrics.trigger_modality_attribution",
        "metrics.functional.attack_success_rate",
        "metrics.functional.attack_success_rate_generalisation",
        "metrics.functional.cross_trigger_interaction",
        "metrics.functional.generative_attack_success_rate",
        "metrics.functional.shapley",
        "metrics.functional.string_rules",
        "metrics.functional.trigger_modality_attribution",
    ],
)
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_tma_is_differentiable_after_a_first_use_in_inference_mode() -> None:
    """The cached Shapley weights must not be inference tensors, whichever call builds them first."""
    from metrics.functional import shapley

    shapley._shapley_weights.cache_clear()
    with torch.inference_mode():
        trigger_modality_attribution(torch.rand(3, 4), ["image", "text"])
    values = torch.rand(5, 4, requires_grad=True)
    trigger_modality_attribution(values, ["image", "text"])["image"].backward()
    assert values.grad is not None and values.grad.abs().sum() > 0
