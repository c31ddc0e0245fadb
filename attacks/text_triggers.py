"""Text triggers: insert a rare token, a phrase or a rare character sequence into a caption or an
instruction.

Insertion is at a word boundary (words are runs of non-space characters, so punctuation stays
attached to its word): ``"start"`` puts the trigger before the first word, ``"end"`` after the last
word (after its punctuation), ``"random"`` at a boundary chosen from ``(seed, sample_id)``. The rest
of the text, whitespace included, is left as it was.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from attacks.hashing import fingerprint as _fingerprint
from attacks.randomness import sample_rng

__all__ = ["CharSequence", "Phrase", "RareSymbols", "RareToken", "TextTrigger"]

_WORD = re.compile(r"\S+")
POSITIONS = ("start", "end", "random")


class TextTrigger:
    """Base class of text triggers: ``trigger(text, sample_id) -> triggered text``.

    Subclasses define :meth:`trigger_text` (the string inserted) and ``_params``.

    Args:
        position: ``"start"``, ``"end"`` or ``"random"`` (a word boundary drawn from
            ``(seed, sample_id)``).
        seed: seed of every random choice.
    """

    name: ClassVar[str] = "text_trigger"

    def __init__(self, position: str = "start", seed: int = 0) -> None:
        if position not in POSITIONS:
            raise ValueError(f"text trigger position {position!r} is not one of {POSITIONS}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int; got {seed!r}")
        self.position = position
        self.seed = seed

    def trigger_text(self) -> str:
        """The string that is inserted."""
        raise NotImplementedError

    def __call__(self, text: str, sample_id: int = 0) -> str:
        """``text`` with the trigger inserted; deterministic given ``(seed, sample_id)``."""
        trigger = self.trigger_text()
        words = list(_WORD.finditer(text))
        if not words:
            return trigger
        # Boundary b in [0, len(words)]: before word b, or after the last word when b == len(words).
        if self.position == "start":
            boundary = 0
        elif self.position == "end":
            boundary = len(words)
        else:
            boundary = sample_rng(self.seed, self.name, "position", int(sample_id)).randint(0, len(words))
        if boundary < len(words):
            cut = words[boundary].start()
            return f"{text[:cut]}{trigger} {text[cut:]}"
        cut = words[-1].end()
        return f"{text[:cut]} {trigger}{text[cut:]}"

    def config(self) -> dict[str, Any]:
        """JSON-serialisable configuration: ``build_text_trigger(**trigger.config())`` rebuilds it."""
        return {"name": self.name, **self._params(), "position": self.position, "seed": self.seed}

    def fingerprint(self) -> str:
        """``sha256:<hex>`` over :meth:`config` and the inserted string."""
        return _fingerprint({**self.config(), "trigger_text": self.trigger_text()})

    def _params(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.config().items() if key != "name")
        return f"{type(self).__name__}({args})"


class RareToken(TextTrigger):
    """Insert a rare token (Kurita et al., 2020: "cf", "mn", "bb"; also "mignneko")."""

    name = "rare_token"

    def __init__(self, token: str = "cf", position: str = "start", seed: int = 0) -> None:
        super().__init__(position, seed)
        if not token.strip():
            raise ValueError("RareToken token must be a non-empty string")
        self.token = token

    def trigger_text(self) -> str:
        return self.token

    def _params(self) -> dict[str, Any]:
        return {"token": self.token}


class Phrase(TextTrigger):
    """Insert a fixed phrase (e.g. "latte coffee", "anonymous", "I watched this 3D movie")."""

    name = "phrase"

    def __init__(self, phrase: str = "latte coffee", position: str = "start", seed: int = 0) -> None:
        super().__init__(position, seed)
        if not phrase.strip():
            raise ValueError("Phrase phrase must be a non-empty string")
        self.phrase = phrase

    def trigger_text(self) -> str:
        return self.phrase

    def _params(self) -> dict[str, Any]:
        return {"phrase": self.phrase}


class CharSequence(TextTrigger):
    """TextBadNets-style trigger: a sequence of ``length`` rare characters, drawn once from the seed
    and inserted as one word. Longer sequences give far higher ASR at low poison rates (6 vs 12
    characters: 4.8% vs 54.4% at 0.5% poisoning).

    Args:
        length: number of characters (6 or 12 in the literature).
        charset: characters to draw from; the default (lowercase consonants) gives unpronounceable
            strings that tokenizers split into rare sub-words and that survive lower-casing.
        position, seed: see :class:`TextTrigger`.
    """

    name = "char_sequence"
    DEFAULT_CHARSET: ClassVar[str] = "bcdfghjklmnpqrstvwxz"

    def __init__(
        self, length: int = 6, charset: str = DEFAULT_CHARSET, position: str = "start", seed: int = 0
    ) -> None:
        super().__init__(position, seed)
        if int(length) < 1:
            raise ValueError(f"CharSequence length must be >= 1; got {length!r}")
        if not charset or any(ch.isspace() for ch in charset):
            raise ValueError(
                f"CharSequence charset must be non-empty and contain no whitespace; got {charset!r}"
            )
        self.length = int(length)
        self.charset = charset
        rng = sample_rng(self.seed, self.name, "sequence")
        self.sequence = "".join(rng.choice(charset) for _ in range(self.length))

    def trigger_text(self) -> str:
        return self.sequence

    def _params(self) -> dict[str, Any]:
        return {"length": self.length, "charset": self.charset}


class RareSymbols(TextTrigger):
    """MABA's text trigger: a string of rare symbols (default ``[]*{}<>``) inserted before key words.

    Every whole-word occurrence of a ``keywords`` entry (case-insensitive, punctuation kept) gets the symbols
    in front of it; a text with none of them gets the symbols at ``position`` instead.

    Args:
        symbols: the inserted string (no whitespace).
        keywords: the words to mark (default: the instruction words of the embedded world and of captions).
        position, seed: where to insert when no keyword occurs; see :class:`TextTrigger`.
    """

    name = "rare_symbols"
    DEFAULT_KEYWORDS: ClassVar[tuple[str, ...]] = ("shape", "colour", "color", "image", "picture", "object")

    def __init__(
        self,
        symbols: str = "[]*{}<>",
        keywords: list[str] | tuple[str, ...] | None = None,
        position: str = "start",
        seed: int = 0,
    ) -> None:
        super().__init__(position, seed)
        if not symbols or any(ch.isspace() for ch in symbols):
            raise ValueError(f"RareSymbols symbols must be non-empty without whitespace; got {symbols!r}")
        self.symbols = symbols
        self.keywords = tuple(self.DEFAULT_KEYWORDS if keywords is None else keywords)
        if not self.keywords or not all(isinstance(k, str) and k.strip() for k in self.keywords):
            raise ValueError(f"RareSymbols keywords must be non-empty words; got {keywords!r}")
        alternatives = "|".join(re.escape(k) for k in self.keywords)
        self._pattern = re.compile(rf"(?<!\S)(?=(?:{alternatives})(?:\W|$))", flags=re.IGNORECASE)

    def trigger_text(self) -> str:
        return self.symbols

    def __call__(self, text: str, sample_id: int = 0) -> str:
        marked = self._pattern.sub(f"{self.symbols} ", text)
        return marked if marked != text else super().__call__(text, sample_id)

    def _params(self) -> dict[str, Any]:
        return {"symbols": self.symbols, "keywords": list(self.keywords)}
