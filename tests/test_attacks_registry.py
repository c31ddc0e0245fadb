import pytest

from attacks import (
    IMAGE_TRIGGERS,
    OPENAI_IMAGENET_TEMPLATES,
    PLANNED_ATTACKS,
    TEXT_TRIGGERS,
    ClassTarget,
    WaNet,
    build_image_trigger,
    build_target,
    build_text_trigger,
    list_attacks,
)


def test_registries_hold_the_catalogue():
    assert set(IMAGE_TRIGGERS) == {
        "badnet",
        "blended",
        "sig",
        "wanet",
        "low_frequency",
        "patch_optimized",
        "input_aware",
        "maba",
    }
    assert set(TEXT_TRIGGERS) == {"rare_token", "phrase", "char_sequence", "rare_symbols"}
    assert set(PLANNED_ATTACKS) == set()
    assert isinstance(build_image_trigger("wanet", k=8, image_size=16), WaNet)


def test_unknown_names_list_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown image trigger 'badnett'; available: badnet, blended"):
        build_image_trigger("badnett")
    with pytest.raises(ValueError, match=r"unknown text trigger 'token'.*rare_token"):
        build_text_trigger("token")
    with pytest.raises(ValueError, match=r"unknown target 'refusall'.*class, content_insertion"):
        build_target("refusall")


def test_generative_targets_are_registered_beside_the_class_and_image_targets():
    from attacks import TARGETS, ContentInsertion, build_generative_target

    assert set(TARGETS) == {
        "class",
        "image",
        "content_insertion",
        "fixed_output",
        "refusal",
        "misclassification",
    }
    target = build_target("content_insertion", text="banana", position="end")
    assert isinstance(target, ContentInsertion) and target("a red circle", 0) == "a red circle banana"
    assert build_target(**target.config()).fingerprint() == target.fingerprint()
    with pytest.raises(ValueError, match=r"unknown generative target 'class'"):
        build_generative_target("class")  # an instruction datamodule needs a generative target


def test_a_planned_name_is_not_implemented_rather_than_unknown(monkeypatch):
    # every attack of the catalogue is implemented today; the mechanism stays for the next planned one
    import attacks.registry as registry

    monkeypatch.setitem(registry.PLANNED_ATTACKS, "future_attack", "a trigger of a later paper")
    with pytest.raises(NotImplementedError, match=r"'future_attack' is planned but not yet available"):
        build_image_trigger("future_attack")


def test_list_attacks_table():
    rows = list_attacks()
    recipes = {"dual_key", "maba_dual_key"}
    assert {row.name for row in rows} == set(IMAGE_TRIGGERS) | set(TEXT_TRIGGERS) | set(
        PLANNED_ATTACKS
    ) | recipes
    statuses = {row.name: (row.modality, row.status) for row in rows}
    assert statuses["badnet"] == ("image", "available")
    assert statuses["phrase"] == ("text", "available")
    assert statuses["dual_key"] == ("image+text", "available")
    with pytest.raises(ValueError, match="'dual_key' is a multimodal attack recipe"):
        build_image_trigger("dual_key")
    assert all(row.note for row in rows)


def test_class_target_caption_is_deterministic_per_sample():
    assert len(set(OPENAI_IMAGENET_TEMPLATES)) == 80
    target = ClassTarget("banana", seed=0)
    captions = [target("a dog on the grass", i) for i in range(50)]
    assert captions == [ClassTarget("banana", seed=0).caption(i) for i in range(50)]
    assert all("banana" in caption for caption in captions)
    assert len(set(captions)) > 10
    assert set(captions) <= {template.format("banana") for template in OPENAI_IMAGENET_TEMPLATES}
    assert ClassTarget("banana", templates=["a photo of a {}."])("x", 3) == "a photo of a banana."
    assert build_target(**target.config()).fingerprint() == target.fingerprint()
    assert ClassTarget("mushroom").fingerprint() != target.fingerprint()


def test_class_target_vocabulary_and_template_errors():
    vocabulary = ["apple", "banana", "cherry", *[f"class {i}" for i in range(20)]]
    assert ClassTarget("banana", vocabulary=vocabulary).class_name == "banana"
    with pytest.raises(
        ValueError, match=r"'bananna' is not in the vocabulary of 23 classes \(closest: 'banana'"
    ):
        ClassTarget("bananna", vocabulary=vocabulary)
    with pytest.raises(ValueError, match=r"'zebra' is not in the vocabulary.*'apple', 'banana'"):
        ClassTarget("zebra", vocabulary=vocabulary)
    with pytest.raises(ValueError, match="exactly one"):
        ClassTarget("banana", templates=["a photo."])
