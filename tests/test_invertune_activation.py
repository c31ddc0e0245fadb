"""InverTune activation tuning: layer/neuron selection, k-means, losses, restricted updates."""

from __future__ import annotations

import math
import warnings

import numpy as np
import open_clip
import pytest
import torch
from torch import nn

from defenses.invertune import (
    ActivationTuner,
    InvertedTrigger,
    activation_loss,
    candidate_layers,
    capture_activations,
    kmeans,
    kmeans_1d_two_clusters,
    layer_divergence,
    neuron_parameter_masks,
    preserve_loss,
    select_layers,
    select_neurons,
)
from defenses.invertune.activation_tuning import NeuronSelection, spare_target_selective, tuning_schedule

TEXT_CFG = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 4, "layers": 1}
RN_CFG = {"image_size": 32, "layers": (1, 1, 1, 1), "width": 16}
VIT_CFG = {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread avoids oversubscribing shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_clip(kind: str, seed: int = 0) -> open_clip.model.CLIP:
    """``rn`` (one bottleneck per stage), ``rn2`` (two per stage) or ``vit`` (two blocks)."""
    torch.manual_seed(seed)
    vision = {"rn": RN_CFG, "rn2": {**RN_CFG, "layers": (2, 2, 2, 2)}, "vit": VIT_CFG}[kind]
    return open_clip.model.CLIP(32, vision, TEXT_CFG)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.25


def corner_trigger(size: int = 32) -> InvertedTrigger:
    trigger = InvertedTrigger((3, size, size), seed=0)
    with torch.no_grad():
        trigger.mask_param.zero_()
        trigger.mask_param[:, -8:, -8:] = 1.0
    return trigger


def clean_batch(n: int = 8, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------
# candidate layers and activations
# ------------------------------------------------------------------------------------------------


def test_candidate_layers_cover_resnet_stages_and_vit_blocks() -> None:
    assert list(candidate_layers(tiny_clip("rn"))) == [f"visual.layer{i}" for i in range(1, 5)]
    vit = tiny_clip("vit")
    assert list(candidate_layers(vit)) == ["visual.transformer.resblocks.0", "visual.transformer.resblocks.1"]
    assert list(candidate_layers(vit.visual)) == ["transformer.resblocks.0", "transformer.resblocks.1"]
    with pytest.raises(ValueError, match="no candidate layers"):
        candidate_layers(nn.Linear(2, 2))


def test_activations_are_batch_first_for_seq_first_vit_blocks() -> None:
    x = clean_batch(3)
    batch_first = tiny_clip("vit")
    acts_bf, feats_bf = capture_activations(batch_first, x, normalize)
    seq_first = tiny_clip("vit")  # same weights, run sequence-first as older open_clip versions do
    seq_first.visual.transformer.batch_first = False
    for block in seq_first.visual.transformer.resblocks:
        block.attn.batch_first = False
    acts_sf, feats_sf = capture_activations(seq_first, x, normalize)
    torch.testing.assert_close(feats_sf, feats_bf, atol=1e-5, rtol=1e-5)
    for name, act in acts_bf.items():
        assert act.shape == (3, 17, 32)
        torch.testing.assert_close(acts_sf[name], act, atol=1e-5, rtol=1e-5)


def test_layer_divergence_and_selection_match_formula() -> None:
    clean = {"a": torch.tensor([[1.0, 2.0], [3.0, 2.0]]), "b": torch.tensor([[0.0, 4.0], [0.0, 4.0]])}
    triggered = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([[3.0, 4.0], [3.0, 4.0]])}
    divergences = layer_divergence(clean, triggered)
    assert divergences["a"] == pytest.approx(1 / math.sqrt(8))  # means (2, 2) vs (2, 3)
    assert divergences["b"] == pytest.approx(3 / 4)  # means (0, 4) vs (3, 4)
    assert select_layers(divergences, k=1) == ["b"]
    assert select_layers({"x": 0.1, "y": 0.3, "z": 0.3}, k=2) == ["y", "z"]


# ------------------------------------------------------------------------------------------------
# k-means
# ------------------------------------------------------------------------------------------------


def numpy_lloyd(points: np.ndarray, centers: np.ndarray, iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    def assign(c: np.ndarray) -> np.ndarray:
        return ((points[:, None, :] - c[None, :, :]) ** 2).sum(-1).argmin(1)

    labels = assign(centers)
    for _ in range(iters):
        for j in range(centers.shape[0]):
            if np.any(labels == j):
                centers[j] = points[labels == j].mean(0)
        new = assign(centers)
        if np.array_equal(new, labels):
            break
        labels = new
    return labels, centers


def test_kmeans_matches_numpy_reference_1d_minmax() -> None:
    values = np.random.default_rng(0).gamma(2.0, 1.0, size=200)
    result = kmeans(torch.from_numpy(values), 2, init="minmax")
    labels, centers = numpy_lloyd(values[:, None], np.array([[values.min()], [values.max()]]))
    np.testing.assert_array_equal(result.labels.numpy(), labels)
    np.testing.assert_allclose(result.centers.numpy(), centers, rtol=1e-12)


def test_kmeans_matches_numpy_reference_2d_explicit_init() -> None:
    points = np.random.default_rng(1).normal(size=(150, 2))
    init = points[[0, 1, 2]].copy()
    result = kmeans(torch.from_numpy(points), 3, init=torch.from_numpy(init))
    labels, centers = numpy_lloyd(points, init.copy())
    np.testing.assert_array_equal(result.labels.numpy(), labels)
    np.testing.assert_allclose(result.centers.numpy(), centers, rtol=1e-12)


def test_kmeans_separates_two_obvious_clusters() -> None:
    generator = torch.Generator().manual_seed(0)
    low = 0.1 * torch.rand(50, generator=generator)
    high = 5 + 0.1 * torch.rand(7, generator=generator)
    values = torch.cat([low, high])[torch.randperm(57, generator=generator)]
    mask = kmeans_1d_two_clusters(values)
    assert torch.equal(mask, values > 1)
    plus = kmeans(values, 2, init="kmeans++", seed=3)
    again = kmeans(values, 2, init="kmeans++", seed=3)
    assert torch.equal(plus.labels, again.labels)
    high_cluster = int(plus.centers[:, 0].argmax())
    assert torch.equal(plus.labels == high_cluster, values > 1)
    assert torch.all(kmeans_1d_two_clusters(torch.full((4,), 2.0)))
    with pytest.raises(ValueError, match="minmax"):
        kmeans(torch.rand(5, 2), 2, init="minmax")


# ------------------------------------------------------------------------------------------------
# neuron selection and losses
# ------------------------------------------------------------------------------------------------


def test_select_neurons_per_channel_and_per_element() -> None:
    clean = torch.zeros(2, 4, 3, 3)
    triggered = clean.clone()
    triggered[:, 1] = 5.0  # channel 1 reacts to the trigger
    triggered[:, 2, 0, 0] = 0.5
    selection = select_neurons(clean, triggered)
    assert selection.channel_mask.tolist() == [False, True, False, False]
    assert selection.loss_mask.shape == (4, 1, 1)
    element = select_neurons(clean, triggered, granularity="element")
    assert (
        element.loss_mask.shape == (4, 3, 3)
        and element.loss_mask[1].all()
        and element.loss_mask[2].sum() == 0
    )
    tokens_clean = torch.zeros(2, 5, 6)
    tokens_triggered = tokens_clean.clone()
    tokens_triggered[..., 4] = 3.0  # hidden unit 4 of every token
    unit = select_neurons(tokens_clean, tokens_triggered)
    assert unit.channel_mask.tolist() == [False] * 4 + [True, False]
    assert unit.loss_mask.shape == (1, 6)  # broadcasts over the tokens


def test_spare_target_selective_drops_the_neurons_the_target_class_drives() -> None:
    # 4 images, the first labelled with the target; 3 channels of 1 x 2 elements, all selected
    clean = torch.zeros(4, 3, 1, 2)
    clean[0, 0] = 4.0  # channel 0: target images 4, others 0 -> s = 4
    clean[0, 1] = 1.0  # channel 1: s = 1
    clean[1:, 2] = 2.0  # channel 2: the target drives it less than the others -> s = -2
    triggered = clean.clone()
    triggered[:, :, :, 0] += 2.0  # the trigger moves element 0 of every channel by 2 -> |g| = 2
    triggered[:, :, :, 1] += 8.0  # and element 1 by 8 -> |g| = 8
    rows = torch.tensor([True, False, False, False])
    element = NeuronSelection(torch.ones(3, dtype=torch.bool), torch.ones(3, 1, 2), torch.zeros(3, 1, 2))
    spared = spare_target_selective(element, clean, triggered, rows, ratio=0.5)
    # kept unless s > 0 and s >= 0.5 |g|: channel 0 (s 4) loses both elements (4 >= 1, 4 >= 4),
    # channel 1 (s 1) loses element 0 (1 >= 1) but not element 1 (1 < 4), channel 2 (s < 0) keeps both
    assert spared.loss_mask[:, 0].tolist() == [[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    assert spared.channel_mask.tolist() == [False, True, True]
    # per channel: s and |g| averaged over the elements (s 4 / 1 / -2, |g| 5 for all): only channel 0 goes
    channel = NeuronSelection(torch.ones(3, dtype=torch.bool), torch.ones(3, 1, 1), torch.zeros(3))
    spared = spare_target_selective(channel, clean, triggered, rows, ratio=0.5)
    assert spared.channel_mask.tolist() == [False, True, True]
    assert spared.loss_mask.flatten().tolist() == [0.0, 1.0, 1.0]
    # an unselected neuron stays unselected
    partly = NeuronSelection(
        torch.tensor([True, False, True]), torch.tensor([1.0, 0.0, 1.0]).reshape(3, 1, 1), None
    )
    assert spare_target_selective(partly, clean, triggered, rows, 0.5).channel_mask.tolist() == [
        False,
        False,
        True,
    ]
    with pytest.raises(ValueError, match="needs tuning images labelled with the target and others; 0 of 4"):
        spare_target_selective(channel, clean, triggered, torch.zeros(4, dtype=torch.bool), 0.5)


@pytest.mark.parametrize(("kind", "granularity"), [("rn", "channel"), ("rn", "element"), ("vit", "channel")])
def test_spared_neurons_keep_their_parameters_bit_identical(kind, granularity) -> None:
    x = clean_batch()
    rows = torch.arange(x.shape[0]) < 3
    plain = ActivationTuner(tiny_clip(kind), normalize, num_layers=2, iterations=1, granularity=granularity)
    _, _, selected = plain.select(x, corner_trigger()(x))
    model = tiny_clip(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuner = ActivationTuner(
        model, normalize, num_layers=2, iterations=3, lr=1e-2, granularity=granularity, spare_target_ratio=0.0
    )
    result = tuner.fit(x, corner_trigger(), target_rows=rows)
    dropped = sum(
        int(selected[n].channel_mask.sum() - result.neurons[n].channel_mask.sum()) for n in selected
    )
    assert dropped > 0, "ratio 0 spares every selected neuron the target images drive more than the others"
    assert all((result.neurons[n].channel_mask <= selected[n].channel_mask).all() for n in selected)
    for name, mask in result.parameter_masks.items():
        param = dict(model.named_parameters())[name]
        assert torch.equal(param[~mask], before[name][~mask]), (
            f"spared or unselected entries of {name} changed"
        )
    with pytest.raises(ValueError, match="spare_target_ratio needs target_rows"):
        ActivationTuner(tiny_clip("rn"), normalize, spare_target_ratio=0.5).fit(x, corner_trigger())
    with pytest.raises(ValueError, match=r"spare_target_ratio must be >= 0 or None \(off\), got -1"):
        ActivationTuner(tiny_clip("rn"), normalize, spare_target_ratio=-1)


def test_activation_loss_matches_formula() -> None:
    clean = {
        "a": torch.tensor([[[1.0, 2.0]], [[3.0, 2.0]]]),
        "b": torch.tensor([[1.0, 1.0, 1.0], [1.0, 3.0, 1.0]]),
    }
    triggered = {
        "a": torch.tensor([[[1.0, 5.0]], [[1.0, 5.0]]]),
        "b": torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 4.0]]),
    }
    masks = {"a": torch.tensor([[0.0, 1.0]]), "b": torch.tensor([1.0, 0.0, 1.0])}
    # a: clean mean [[2, 2]], triggered mean [[1, 5]] -> ||(0, -3)|| / ||(0, 2)|| = 1.5
    # b: clean mean (1, 2, 1), triggered mean (0, 0, 2) -> ||(1, 0, -1)|| / ||(1, 0, 1)|| = 1
    assert activation_loss(clean, triggered, masks).item() == pytest.approx(2.5)


def test_constant_denominator_has_the_same_value_and_no_denominator_gradient() -> None:
    # L = ||m (c - t)|| / ||m c|| with c = (3, 4), t = (0, 0), m = 1: the value is 1 either way.
    # d/dc of the tuned ratio is 0 (scaling c scales both norms); with the denominator constant it
    # is the numerator's gradient / ||c|| = (c / ||c||) / ||c|| = (0.12, 0.16).
    mask = {"a": torch.ones(2)}
    for denominator, expected in (("tuned", [0.0, 0.0]), ("constant", [0.12, 0.16])):
        clean = torch.tensor([[3.0, 4.0]], requires_grad=True)
        loss = activation_loss({"a": clean}, {"a": torch.zeros(1, 2)}, mask, denominator=denominator)
        loss.backward()
        assert loss.item() == pytest.approx(1.0)
        assert clean.grad[0].tolist() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="denominator must be 'tuned' or 'constant', got 'frozen'"):
        activation_loss({"a": clean}, {"a": torch.zeros(1, 2)}, mask, denominator="frozen")


def test_preserve_loss_matches_formula() -> None:
    features = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    reference = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    assert preserve_loss(features, reference).item() == pytest.approx(math.sqrt(0.6**2 + 0.2**2))
    assert preserve_loss(features, reference, normalize=False).item() == pytest.approx(math.sqrt(9 + 4))


def test_neuron_parameter_masks_cover_output_rows() -> None:
    rn = tiny_clip("rn")
    channels = torch.zeros(256, dtype=torch.bool)
    channels[[3, 7]] = True
    masks = neuron_parameter_masks(rn, "visual.layer3", channels)
    assert set(masks) == {
        "visual.layer3.0.conv3.weight",
        "visual.layer3.0.bn3.weight",
        "visual.layer3.0.bn3.bias",
        "visual.layer3.0.downsample.0.weight",
        "visual.layer3.0.downsample.1.weight",
        "visual.layer3.0.downsample.1.bias",
    }
    conv = masks["visual.layer3.0.conv3.weight"]
    assert conv.shape == rn.visual.layer3[0].conv3.weight.shape
    assert conv[3].all() and conv[7].all() and conv.sum() == 2 * conv[0].numel()
    vit = tiny_clip("vit")
    units = torch.zeros(32, dtype=torch.bool)
    units[5] = True
    masks = neuron_parameter_masks(vit, "visual.transformer.resblocks.1", units)
    prefix = "visual.transformer.resblocks.1."
    assert set(masks) == {
        prefix + n
        for n in ("attn.out_proj.weight", "attn.out_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
    }
    assert masks[prefix + "mlp.c_proj.weight"][5].all() and masks[prefix + "mlp.c_proj.weight"].sum() == 128


def test_all_writers_cover_every_block_adding_into_the_residual_channels() -> None:
    rn = tiny_clip("rn2")
    channels = torch.zeros(256, dtype=torch.bool)
    channels[4] = True
    last = neuron_parameter_masks(rn, "visual.layer3", channels)
    assert set(last) == {
        "visual.layer3.1.conv3.weight",
        "visual.layer3.1.bn3.weight",
        "visual.layer3.1.bn3.bias",
    }
    every = neuron_parameter_masks(rn, "visual.layer3", channels, writers="all")
    assert set(every) == set(last) | {
        "visual.layer3.0.conv3.weight",
        "visual.layer3.0.bn3.weight",
        "visual.layer3.0.bn3.bias",
        "visual.layer3.0.downsample.0.weight",
        "visual.layer3.0.downsample.1.weight",
        "visual.layer3.0.downsample.1.bias",
    }
    assert all(mask[4].all() and mask.sum() == mask[4].numel() for mask in every.values())
    vit = tiny_clip("vit")
    units = torch.zeros(32, dtype=torch.bool)
    units[5] = True
    every = neuron_parameter_masks(vit, "visual.transformer.resblocks.1", units, writers="all")
    assert {name.split(".")[3] for name in every} == {"0", "1"} and len(every) == 8
    assert set(neuron_parameter_masks(vit, "visual.transformer.resblocks.0", units, writers="all")) == {
        n for n in every if ".resblocks.0." in n
    }
    with pytest.raises(ValueError, match="writers must be 'last' or 'all', got 'first'"):
        neuron_parameter_masks(vit, "visual.transformer.resblocks.0", units, writers="first")


# ------------------------------------------------------------------------------------------------
# tuning
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "writers"), [("rn", "last"), ("vit", "last"), ("rn2", "all"), ("vit", "all")]
)
def test_restricted_updates_leave_everything_else_bit_identical(kind, writers) -> None:
    model = tiny_clip(kind)
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers_before = {n: b.detach().clone() for n, b in model.named_buffers()}
    flags_before = {n: p.requires_grad for n, p in model.named_parameters()}
    tuner = ActivationTuner(
        model, normalize, num_layers=2, iterations=4, lr=1e-2, weight_decay=0.1, update_writers=writers
    )
    result = tuner.fit(clean_batch(), corner_trigger())
    if kind == "rn2":  # the stages' first bottlenecks are writers too
        assert any(".0.conv3." in name for name in result.parameter_masks)
    assert result.best_iteration > 0, "the tuned state must be kept for this test to be meaningful"
    assert len(result.selected_layers) == 2 and set(result.selected_layers) <= set(candidate_layers(model))
    for name, param in model.named_parameters():
        before = params_before[name]
        mask = result.parameter_masks.get(name)
        if name not in result.parameter_masks:
            assert torch.equal(param, before), f"{name} changed outside the selection"
        else:
            assert torch.equal(param[~mask], before[~mask]), f"unselected entries of {name} changed"
            assert not torch.equal(param[mask], before[mask]), f"selected entries of {name} did not change"
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers_before[name]), f"buffer {name} moved with frozen BN statistics"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags_before
    assert model.training


def test_tuning_keeps_the_lowest_loss_state() -> None:
    model = tiny_clip("rn")
    records = []
    tuner = ActivationTuner(model, normalize, iterations=5, lr=1e-2, callback=records.append)
    result = tuner.fit(clean_batch(), corner_trigger())
    assert len(records) == 5 and records == result.history
    assert set(records[0]) >= {"iteration", "lr", "loss", "activation", "preserve", "grad_norm"}
    assert records[0]["lr"] == pytest.approx(1e-2) and records[-1]["lr"] < records[0]["lr"]
    assert result.best_loss <= min(r["loss"] for r in records)
    assert records[0]["preserve"] == pytest.approx(0.0, abs=1e-6)
    x = clean_batch()
    layers = {n: candidate_layers(model)[n] for n in result.selected_layers}
    masks = {n: result.neurons[n].loss_mask for n in result.selected_layers}
    untuned = tiny_clip("rn").eval()
    model.eval()
    with torch.no_grad():
        reference = untuned.encode_image(normalize(x))  # F_theta0(X)
        losses = tuner.compute_losses(x, corner_trigger()(x), layers, masks, reference)
    assert losses["loss"].item() == pytest.approx(result.best_loss, rel=1e-5)


def _schedule_lrs(iterations: int, min_lr: float, warmup: int, lr: float = 0.1) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = tuning_schedule(optimizer, iterations, min_lr, warmup)
    lrs = []
    for _ in range(iterations):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_tuning_schedule_is_the_cosine_after_a_linear_warmup() -> None:
    lr, min_lr, iterations = 0.1, 1e-3, 10
    plain = _schedule_lrs(iterations, min_lr, 0)
    for i, value in enumerate(plain):  # CosineAnnealingLR's closed form
        assert value == pytest.approx(min_lr + (lr - min_lr) * (1 + math.cos(math.pi * i / iterations)) / 2)
    warm = _schedule_lrs(iterations, min_lr, 4)
    assert warm[:4] == pytest.approx([lr * (i + 1) / 5 for i in range(4)])
    for i in range(4, iterations):
        progress = (i - 4) / (iterations - 4)
        assert warm[i] == pytest.approx(min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2)
    assert warm[4] == pytest.approx(lr) and max(warm) == pytest.approx(lr)
    records = []
    ActivationTuner(
        tiny_clip("rn"), normalize, iterations=6, lr=1e-2, warmup_iterations=2, callback=records.append
    ).fit(clean_batch(), corner_trigger())
    assert [r["lr"] for r in records] == pytest.approx(_schedule_lrs(6, 1e-7, 2, lr=1e-2))


def test_model_code_scope_updates_the_whole_image_tower_only() -> None:
    model = tiny_clip("rn")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = ActivationTuner(model, normalize, iterations=3, lr=1e-3, update_scope="model_code").fit(
        clean_batch(), corner_trigger()
    )
    assert result.best_iteration > 0, "the tuned state must be kept for this test to be meaningful"
    assert all(mask is None for mask in result.parameter_masks.values())
    assert not torch.equal(model.visual.conv1.weight, before["visual.conv1.weight"])
    for name, param in model.named_parameters():
        if not name.startswith("visual."):
            assert torch.equal(param, before[name]), f"{name} outside the image tower changed"


def test_unfrozen_bn_statistics_move() -> None:
    model = tiny_clip("rn")
    before = model.visual.layer4[0].bn3.running_mean.clone()
    ActivationTuner(model, normalize, iterations=2, lr=1e-3, freeze_bn_stats=False).fit(
        clean_batch(), corner_trigger()
    )
    assert not torch.equal(model.visual.layer4[0].bn3.running_mean, before)


def test_tuner_argument_errors() -> None:
    model = tiny_clip("rn")
    with pytest.raises(ValueError, match="update_scope"):
        ActivationTuner(model, normalize, update_scope="everything")
    with pytest.raises(ValueError, match="images is empty"):
        ActivationTuner(model, normalize).fit(torch.empty(0, 3, 32, 32), corner_trigger())
    with pytest.raises(ValueError, match="pairing must be 'batch_mean' or 'per_sample', got 'pairs'"):
        ActivationTuner(model, normalize, pairing="pairs")
    with pytest.raises(ValueError, match=r"invariance_weight must be >= 0, got -0\.5"):
        ActivationTuner(model, normalize, invariance_weight=-0.5)
    with pytest.raises(ValueError, match="act_denominator must be 'tuned' or 'constant', got 'x'"):
        ActivationTuner(model, normalize, act_denominator="x")
    with pytest.raises(ValueError, match="update_writers must be 'last' or 'all', got 'x'"):
        ActivationTuner(model, normalize, update_writers="x")
    with pytest.raises(ValueError, match=r"warmup_iterations must be >= 0 and below iterations \(5\), got 5"):
        ActivationTuner(model, normalize, iterations=5, warmup_iterations=5)


# ------------------------------------------------------------------------------------------------
# real-scale architectures (random weights)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("name", "expected"), [("RN50", 4), ("ViT-B-32", 12)])
def test_layer_selection_on_real_architectures(name, expected) -> None:
    model = open_clip.create_model(name, pretrained=None)
    model.eval()
    assert len(candidate_layers(model)) == expected
    x = clean_batch(2, 224)
    tuner = ActivationTuner(model, normalize, iterations=1)
    divergences, selected, neurons = tuner.select(x, corner_trigger(224)(x))
    assert set(divergences) == set(candidate_layers(model)) and len(selected) == 3
    for layer in selected:
        assert 0 < int(neurons[layer].channel_mask.sum()) < neurons[layer].channel_mask.numel()
        last = neuron_parameter_masks(model, layer, neurons[layer].channel_mask)
        every = neuron_parameter_masks(model, layer, neurons[layer].channel_mask, writers="all")
        # RN50 stages have 3-6 bottlenecks and ViT-B-32 12 blocks: "all" adds the earlier writers
        assert set(last) < set(every) or (name == "ViT-B-32" and layer.endswith(".0"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["RN50", "ViT-B-32"])
def test_restricted_updates_on_real_architectures(name) -> None:
    model = open_clip.create_model(name, pretrained=None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = ActivationTuner(model, normalize, iterations=2, lr=1e-3).fit(
        clean_batch(2, 224), corner_trigger(224)
    )
    for param_name, param in model.named_parameters():
        mask = result.parameter_masks.get(param_name)
        if mask is None:
            assert torch.equal(param, before[param_name]), f"{param_name} changed outside the selection"
        else:
            assert torch.equal(param[~mask], before[param_name][~mask]), (
                f"unselected entries of {param_name} changed"
            )


def test_session_steps_equal_fit_and_survive_mode_switches() -> None:
    """A LightningModule drives the tuner one step at a time and Lightning switches modes in between:
    the result must be bit-identical to ``fit``."""
    reference, stepped = tiny_clip("rn"), tiny_clip("rn")
    ActivationTuner(reference, normalize, iterations=4, lr=1e-2).fit(clean_batch(), corner_trigger())
    session = ActivationTuner(stepped, normalize, iterations=4, lr=1e-2).begin(
        clean_batch(), corner_trigger()
    )
    while not session.done:
        stepped.train()  # what Lightning does before training steps
        session.step()
        stepped.eval()
    result = session.finish()
    assert len(result.history) == 4
    for (name, a), b in zip(reference.state_dict().items(), stepped.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(RuntimeError, match="finished"):
        session.step()


def test_tuning_augment_flips_and_shifts_are_exact() -> None:
    from defenses.invertune.tuning_augment import TuningAugment

    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    flipped = TuningAugment(flip_p=1.0, max_shift=0)(images, torch.Generator().manual_seed(0))
    assert torch.equal(flipped, images.flip(-1))
    assert torch.equal(TuningAugment(flip_p=0.0, max_shift=0)(images, torch.Generator()), images)
    shifted = TuningAugment(flip_p=0.0, max_shift=2)(images, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="reflect")
    offsets = set()
    for b in range(images.shape[0]):
        crops = [
            (i, j)
            for i in range(5)
            for j in range(5)
            if torch.equal(padded[b, :, i : i + 8, j : j + 8], shifted[b])
        ]
        assert crops, f"image {b} is not a shifted crop"
        offsets.add(crops[0])
    assert len(offsets) > 1  # per-image shifts
    again = TuningAugment(flip_p=0.0, max_shift=2)(images, torch.Generator().manual_seed(1))
    assert torch.equal(again, shifted)  # seeded


def test_tuning_augment_config_errors() -> None:
    from defenses.invertune.tuning_augment import TuningAugment

    assert TuningAugment.from_dict(None) is None
    with pytest.raises(ValueError, match="unknown keys \\['rotate'\\]"):
        TuningAugment.from_dict({"rotate": 10})
    with pytest.raises(ValueError, match="flip_p must be in"):
        TuningAugment.from_dict({"flip_p": 2})
    with pytest.raises(ValueError, match="max_shift must be >= 0"):
        TuningAugment.from_dict({"max_shift": -1})


@pytest.mark.parametrize("trigger_first", [False, True])
def test_augmented_views_place_the_trigger_before_or_after_the_view(trigger_first) -> None:
    from defenses.invertune.tuning_augment import TuningAugment

    augment = TuningAugment(flip_p=1.0, max_shift=0, trigger_first=trigger_first)
    tuner = ActivationTuner(tiny_clip("rn"), normalize, iterations=1, lr=1e-3, augment=augment)
    trigger, x = corner_trigger(), clean_batch()
    session = tuner.begin(x, trigger)
    seen = {}

    def capture(images, triggered, *args):
        seen["clean"], seen["triggered"] = images, triggered
        return {"loss": torch.zeros((), requires_grad=True)}

    tuner.compute_losses = capture
    session.augmented_losses()
    session.close()
    assert torch.equal(seen["clean"], x.flip(-1))
    expected = trigger(x).flip(-1) if trigger_first else trigger(x.flip(-1))
    assert torch.allclose(seen["triggered"][0], expected)
    assert not torch.allclose(trigger(x).flip(-1), trigger(x.flip(-1)))  # the corner trigger is not symmetric


def test_several_trigger_estimates_average_the_activation_and_invariance_terms() -> None:
    model = tiny_clip("rn").eval()
    tuner = ActivationTuner(model, normalize, invariance_weight=0.3, preserve_weight=0.5)
    x = clean_batch()
    first, second = corner_trigger()(x), (x + 0.1).clamp(0, 1)
    layers = candidate_layers(model)
    masks = {name: torch.ones(()) for name in layers}
    with torch.no_grad():
        reference = model.encode_image(normalize(x)) * 1.01
        one = tuner.compute_losses(x, first, layers, masks, reference)
        two = tuner.compute_losses(x, second, layers, masks, reference)
        both = tuner.compute_losses(x, [first, second], layers, masks, reference)
    for key in ("activation", "invariance"):
        assert both[key].item() == pytest.approx((one[key].item() + two[key].item()) / 2, rel=1e-5)
    assert both["preserve"].item() == pytest.approx(one["preserve"].item(), rel=1e-6)
    expected = both["activation"] + 0.5 * both["preserve"] + 0.3 * both["invariance"]
    assert both["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_target_preserve_term_matches_its_formula_on_the_marked_rows() -> None:
    model = tiny_clip("rn").eval()
    x = clean_batch()
    layers = candidate_layers(model)
    masks = {name: torch.ones(()) for name in layers}
    rows = torch.tensor([True, False, False, True, False, False, False, False])
    with torch.no_grad():
        features = model.encode_image(normalize(x))
        reference = tiny_clip("rn", seed=1).eval().encode_image(normalize(x))  # another model: L > 0
        tuner = ActivationTuner(model, normalize, preserve_weight=0.5, target_preserve_weight=2.0)
        got = tuner.compute_losses(x, corner_trigger()(x), layers, masks, reference, rows)
        without = tuner.compute_losses(x, corner_trigger()(x), layers, masks, reference)
    expected = preserve_loss(features[rows], reference[rows])
    assert got["target_preserve"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert got["loss"].item() == pytest.approx(without["loss"].item() + 2.0 * expected.item(), rel=1e-5)
    assert "target_preserve" not in without
    with pytest.raises(ValueError, match=r"target_preserve_weight must be >= 0, got -1"):
        ActivationTuner(model, normalize, target_preserve_weight=-1)
    with pytest.raises(ValueError, match=r"target_rows must hold one flag per image \(8\), got shape \(3,\)"):
        tuner.begin(x, corner_trigger(), target_rows=torch.ones(3, dtype=torch.bool))


def test_label_term_is_the_zero_shot_cross_entropy_of_the_clean_images() -> None:
    model = tiny_clip("rn").eval()
    x = clean_batch()
    layers = candidate_layers(model)
    masks = {name: torch.ones(()) for name in layers}
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    text = torch.randn(4, model.text_projection.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = model.encode_image(normalize(x))
        reference = features.clone()
        tuner = ActivationTuner(model, normalize, label_weight=0.5, label_temperature=0.1)
        got = tuner.compute_losses(x, corner_trigger()(x), layers, masks, reference, None, labels, text)
        without = tuner.compute_losses(x, corner_trigger()(x), layers, masks, reference)
    # reference formula, written out: -mean_i log softmax_c(cos(f_i, t_c) / T)[y_i]
    cos = torch.stack([torch.stack([torch.cosine_similarity(f, t, dim=0) for t in text]) for f in features])
    expected = -(cos / 0.1).log_softmax(dim=1)[torch.arange(8), labels].mean()
    assert got["label"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert got["loss"].item() == pytest.approx(without["loss"].item() + 0.5 * expected.item(), rel=1e-5)
    assert "label" not in without
    with pytest.raises(ValueError, match=r"label_weight must be >= 0, got -1"):
        ActivationTuner(model, normalize, label_weight=-1)
    with pytest.raises(ValueError, match=r"label_temperature must be > 0, got 0"):
        ActivationTuner(model, normalize, label_temperature=0)
    with pytest.raises(ValueError, match=r"label_weight > 0 needs the tuning images' labels"):
        tuner.begin(x, corner_trigger())
    with pytest.raises(ValueError, match=r"labels must hold one class per image \(8\), got shape \(2,\)"):
        tuner.begin(x, corner_trigger(), labels=torch.zeros(2, dtype=torch.long), class_text_embeds=text)


def test_trigger_first_with_element_masks_warns() -> None:
    from defenses.invertune.tuning_augment import TuningAugment

    model = tiny_clip("rn")
    views = TuningAugment(flip_p=0.5, trigger_first=True)
    with pytest.warns(UserWarning, match="trigger_first with granularity='element'"):
        ActivationTuner(model, normalize, granularity="element", augment=views)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ActivationTuner(model, normalize, granularity="channel", augment=views)
