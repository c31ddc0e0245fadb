import pytest

from attacks import CharSequence, Phrase, RareToken, build_text_trigger

CAPTION = "a photo of a dog on the grass."


def test_start_and_end_positions():
    assert RareToken("cf", position="start")(CAPTION, 0) == "cf a photo of a dog on the grass."
    assert RareToken("cf", position="end")(CAPTION, 0) == "a photo of a dog on the grass. cf"
    assert (
        Phrase("latte coffee", position="start")(CAPTION, 3) == "latte coffee a photo of a dog on the grass."
    )


def test_surrounding_whitespace_is_kept():
    assert RareToken("cf", position="start")("  two  words\n", 0) == "  cf two  words\n"
    assert RareToken("cf", position="end")("  two  words\n", 0) == "  two  words cf\n"


def test_random_position_is_a_word_boundary_and_deterministic():
    trigger = RareToken("mn", position="random", seed=1)
    words = CAPTION.split()
    positions = set()
    for sample_id in range(60):
        out = trigger(CAPTION, sample_id)
        assert out == trigger(CAPTION, sample_id)
        assert out == RareToken("mn", position="random", seed=1)(CAPTION, sample_id)
        out_words = out.split()
        position = out_words.index("mn")
        assert out_words[:position] + out_words[position + 1 :] == words
        positions.add(position)
    assert positions == set(range(len(words) + 1))
    other_seed = RareToken("mn", position="random", seed=2)
    assert [other_seed(CAPTION, i) for i in range(20)] != [trigger(CAPTION, i) for i in range(20)]


def test_empty_text_gets_the_trigger_alone():
    assert Phrase("anonymous", position="random")("", 5) == "anonymous"


def test_char_sequence_is_drawn_from_the_seed():
    trigger = CharSequence(length=12, seed=4)
    assert len(trigger.sequence) == 12 and set(trigger.sequence) <= set(CharSequence.DEFAULT_CHARSET)
    assert CharSequence(length=12, seed=4).sequence == trigger.sequence
    assert CharSequence(length=12, seed=5).sequence != trigger.sequence
    assert CharSequence(length=6, charset="#", seed=0)("hi", 0) == "###### hi"
    assert trigger("hi there", 0).split()[0] == trigger.sequence


def test_argument_errors():
    with pytest.raises(ValueError, match="position 'middle'"):
        RareToken(position="middle")
    with pytest.raises(ValueError, match="length"):
        CharSequence(length=0)
    with pytest.raises(ValueError, match="charset"):
        CharSequence(charset="a b")


def test_fingerprint_and_config():
    assert RareToken("cf").fingerprint() == RareToken("cf").fingerprint()
    assert RareToken("cf").fingerprint() != RareToken("bb").fingerprint()
    assert RareToken("cf").fingerprint() != RareToken("cf", position="end").fingerprint()
    assert CharSequence(seed=1).fingerprint() != CharSequence(seed=2).fingerprint()
    for trigger in (
        RareToken("mignneko", "end"),
        Phrase("I watched this 3D movie", "random", 3),
        CharSequence(12),
    ):
        rebuilt = build_text_trigger(**trigger.config())
        assert rebuilt.fingerprint() == trigger.fingerprint()
        assert rebuilt(CAPTION, 9) == trigger(CAPTION, 9)
