"""Target identification that does not depend on where the trigger is: the patch at random positions,
the union of perturbations, and their config and report."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from defenses.invertune import (
    AnywherePatchUAP,
    CornerPatchUAP,
    IdentifyConfig,
    LinfUAP,
    UnionUAP,
    breadth_of,
    identify,
    identify_target,
    identify_union,
    union_max,
)
from tests.conftest import ToyLinearBackdoor, identity

NUM_CLASSES = 4
TARGET = 2
NAMES = ["red", "green", "star", "blue"]


class ToyTopLeftSpotModel(ToyLinearBackdoor):
    """Class 2 lights up when a 5 x 5 window inside the top-left 16 x 16 quadrant is bright (a trigger
    that fires away from the bottom-right corner, where AdvCLIP's patch sits)."""

    def backdoor_feature(self, x: torch.Tensor) -> torch.Tensor:
        quadrant = x[:, :, :16, :16].mean(dim=1, keepdim=True)
        spot = F.avg_pool2d(quadrant, 5, stride=1).flatten(1).amax(dim=1)
        return spot - x.mean(dim=(1, 2, 3))


class ToyBlendModel(ToyLinearBackdoor):
    """Class 2 lights up when the image's pixel-to-pixel contrast (a high-frequency blend) is high."""

    def backdoor_feature(self, x: torch.Tensor) -> torch.Tensor:
        return 4 * (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3)) - 0.2


@pytest.fixture
def clean_images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    base = 0.1 + 0.4 * torch.rand(128, 3, 1, 1, generator=generator)
    return (base + 0.02 * torch.rand(128, 3, 32, 32, generator=generator)).clamp(0, 1)


def bright(uap):
    with torch.no_grad():
        uap.patch.fill_(1.0)
    return uap.eval()


def test_the_anywhere_patch_lands_at_new_positions_in_training_and_at_seeded_ones_in_eval(clean_images):
    uap = AnywherePatchUAP(32, area_fraction=0.03, seed=4)
    assert uap.side == 5
    x = clean_images[:16]
    first, second = uap.positions(16), uap.positions(16)
    assert not torch.equal(first, second)  # training: new positions at every call
    out = uap.apply(x)
    uap.eval()
    a, b = uap.apply(x), uap.apply(x)
    torch.testing.assert_close(a, b)  # eval: the same positions at every call
    positions = uap.positions(16)
    assert len({tuple(p) for p in positions.tolist()}) > 8  # spread over the image, not one place
    for i, (top, left) in enumerate(positions.tolist()):
        torch.testing.assert_close(a[i, :, top : top + 5, left : left + 5], uap.patch.detach())
        outside = torch.ones(32, 32, dtype=torch.bool)
        outside[top : top + 5, left : left + 5] = False
        torch.testing.assert_close(a[i][:, outside], x[i][:, outside])
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="built for"):
        uap.apply(torch.zeros(1, 3, 16, 16))


def test_a_trigger_away_from_the_corner_is_found_by_the_anywhere_patch_not_the_corner_patch(clean_images):
    model, text = ToyTopLeftSpotModel(), torch.eye(NUM_CLASSES)
    corner = identify_target(model, clean_images, text, bright(CornerPatchUAP(32)), identity)
    assert corner.increase[TARGET] == 0  # the corner patch never reaches the quadrant
    anywhere = identify_target(model, clean_images, text, bright(AnywherePatchUAP(32)), identity)
    assert anywhere.target == TARGET
    assert 0.1 < anywhere.increase[TARGET] < 0.6  # only the positions inside the quadrant fire
    assert anywhere.margin == pytest.approx(
        float(anywhere.increase[TARGET] - anywhere.increase.sort().values[-2])
    )


def test_fitting_the_anywhere_patch_finds_the_target_and_keeps_it_in_range(clean_images):
    model, text = ToyTopLeftSpotModel(), torch.eye(NUM_CLASSES)
    uap = AnywherePatchUAP(32, seed=1)
    uap.fit(model, clean_images, text, identity, epochs=30, batch_size=16, seed=0, lr=0.05)
    assert 0 <= uap.patch.min() and uap.patch.max() <= 1
    assert identify_target(model, clean_images, text, uap.eval(), identity).target == TARGET


def test_union_max_is_the_elementwise_maximum_and_names_its_member():
    rises = {"anywhere": torch.tensor([0.1, -0.2, 0.3, 0.0]), "linf": torch.tensor([0.2, -0.1, 0.3, -0.5])}
    best, source = union_max(rises)
    torch.testing.assert_close(best, torch.maximum(rises["anywhere"], rises["linf"]).double())
    assert source == ["linf", "linf", "anywhere", "anywhere"]  # a tie goes to the first member


def test_the_union_ranks_each_class_by_its_larger_rise_and_applies_the_member_that_found_it(clean_images):
    text = torch.eye(NUM_CLASSES)
    for model, winner in ((ToyTopLeftSpotModel(), "anywhere"), (ToyBlendModel(), "linf")):
        linf = LinfUAP(32, eps=16 / 255, seed=0)
        with torch.no_grad():  # a fixed checkerboard of +-16/255: a strong high-frequency blend
            checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2
            linf.delta.copy_((checker * 2 - 1).float().expand(3, 32, 32) * 16 / 255)
        union = UnionUAP({"anywhere": bright(AnywherePatchUAP(32)), "linf": linf.eval()})
        with pytest.raises(RuntimeError, match="before identify_union"):
            union.apply(clean_images)
        result = identify_union(model, clean_images, text, union, identity)
        members = {
            name: identify_target(model, clean_images, text, m, identity) for name, m in union.members.items()
        }
        expected = torch.maximum(members["anywhere"].increase, members["linf"].increase)
        torch.testing.assert_close(result.increase, expected)
        assert result.target == TARGET and result.source == winner and union.selected == winner
        assert set(result.members) == {"anywhere", "linf"}
        torch.testing.assert_close(union.apply(clean_images), union.members[winner].apply(clean_images))
        # the choice travels with the saved state
        again = UnionUAP({"anywhere": AnywherePatchUAP(32), "linf": LinfUAP(32, eps=16 / 255)})
        again.load_state_dict(union.state_dict())
        assert again.selected == winner


def test_identify_config_builds_every_kind_and_names_them_on_a_typo():
    config = IdentifyConfig(uap="union", eps=16 / 255)
    union = config.build_uap((32, 32))
    assert isinstance(union, UnionUAP) and union.names == ["anywhere", "linf"]
    assert union.members["linf"].eps == pytest.approx(16 / 255)
    assert isinstance(config.build_uap((32, 32), "anywhere"), AnywherePatchUAP)
    assert isinstance(config.build_uap((32, 32), "patch"), CornerPatchUAP)
    with pytest.raises(ValueError, match="'patch', 'anywhere', 'linf', 'union'"):
        IdentifyConfig(uap="everywhere")
    with pytest.raises(ValueError, match="a union needs at least 2 members"):
        UnionUAP({"linf": LinfUAP(32)})


def test_identify_with_the_union_reports_every_member_and_the_source(clean_images):
    model, text = ToyTopLeftSpotModel(), torch.eye(NUM_CLASSES)
    config = IdentifyConfig(uap="union", epochs=10, eps=16 / 255, seed=1)
    found = identify(model, clean_images, text, identity, NAMES, (32, 32), config)
    assert found.target == TARGET and found.identification.source == "anywhere"
    assert found.confidence.target == "star"
    from defenses.invertune.artifacts import InversionOutcome
    from defenses.invertune.trigger_inversion import InvertedTrigger

    outcome = InversionOutcome(
        target=TARGET,
        target_name="star",
        trigger=InvertedTrigger((3, 32, 32)),
        identification=found.identification,
        inverted_asr=1.0,
        num_clean_images=128,
        num_reference_images=8,
        uap=found.uap,
    )
    summary = outcome.summary(NAMES)
    assert summary["uap_source"] == "anywhere"
    assert set(summary["uap_members"]) == {"anywhere", "linf"}
    rise = found.identification.members["anywhere"][TARGET]
    assert summary["uap_members"]["anywhere"]["star"] == pytest.approx(float(rise))


def test_breadth_is_the_median_over_other_source_classes_of_the_flow_into_a_class():
    # rows: clean prediction, columns: prediction under the UAP
    transitions = torch.tensor(
        [
            [10, 0, 10, 0],  # class 0: half of its images go to 2
            [0, 0, 20, 0],  # class 1: all go to 2
            [0, 0, 20, 0],
            [12, 0, 4, 4],  # class 3: 60 % fall into 0 (a neighbour), 20 % into 2
        ]
    )
    breadth = breadth_of(transitions)
    rates = transitions.double() / transitions.sum(dim=1, keepdim=True)
    for y in range(4):
        others = torch.cat([rates[:y, y], rates[y + 1 :, y]])
        assert breadth[y] == pytest.approx(float(others.median()))  # torch's lower median
    assert breadth.argmax() == 2
    # a class nobody predicts on clean images does not count as a source
    empty_source = torch.tensor([[5, 5, 0], [0, 0, 0], [0, 10, 0]])
    assert breadth_of(empty_source)[1] == pytest.approx(0.5)  # the lower median of {0.5, 1.0}
    assert breadth_of(torch.zeros(2, 2, dtype=torch.long)).tolist() == [0.0, 0.0]


def test_breadth_passes_over_a_natural_sink_that_the_rise_picks(clean_images):
    # class 2 fires on a bright top-left spot, which reaches an eighth of the images of every class (a
    # backdoor); every image of class 1 (green) turns red (a natural sink fed by one neighbour): the rise
    # favours red, the breadth the backdoor's class
    model, text = ToyTopLeftSpotModel(), torch.eye(NUM_CLASSES)

    def perturb(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        green = x.mean(dim=(2, 3)).argmax(dim=1) == 1
        out[green, 0] = 1.0
        keep = torch.arange(len(x)) % 8 == 0
        out[keep, :, 2:7, 2:7] = 1.0
        return out

    rise = identify_target(model, clean_images, text, perturb, identity, score="rise")
    breadth = identify_target(model, clean_images, text, perturb, identity, score="breadth")
    assert rise.target == 0 and breadth.target == TARGET
    assert breadth.score == "breadth" and breadth.ranked_by is breadth.breadth
    assert breadth.margin == pytest.approx(float(breadth.breadth[TARGET] - breadth.breadth.sort().values[-2]))
    torch.testing.assert_close(breadth.breadth, breadth_of(breadth.transitions))
    assert int(breadth.transitions.sum()) == 128
    torch.testing.assert_close(breadth.p_clean, breadth.transitions.sum(dim=1).double() / 128)
    torch.testing.assert_close(breadth.p_adv, breadth.transitions.sum(dim=0).double() / 128)
    with pytest.raises(ValueError, match="score must be one of"):
        identify_target(model, clean_images, text, perturb, identity, score="median")
    with pytest.raises(ValueError, match="uap_score must be one of"):
        IdentifyConfig(score="median")


def test_a_saved_uap_is_rebuilt_with_its_own_kind_geometry_and_seed(clean_images):
    fitted = IdentifyConfig(uap="union", area_fraction=0.03, eps=8 / 255, seed=5)
    union = fitted.build_uap((32, 32))
    union.select("anywhere")
    state = union.state_dict()
    saved = {"uap": "union", "uap_geometry": fitted.geometry()}
    now = IdentifyConfig(uap="linf", area_fraction=0.05, eps=16 / 255, seed=0)  # this run's (other) settings
    loaded, built = now.load_uap(state, saved, (32, 32), "run/trigger_inversion")
    assert built.geometry() == fitted.geometry() and loaded.selected == "anywhere"
    torch.testing.assert_close(loaded.eval().apply(clean_images), union.eval().apply(clean_images))
    # an older report without the geometry: its kind and this run's geometry; a misfit names the file
    with pytest.raises(ValueError, match=r"run/trigger_inversion/uap.safetensors does not fit a 'union' UAP"):
        now.load_uap(state, {"uap": "union"}, (32, 32), "run/trigger_inversion")
