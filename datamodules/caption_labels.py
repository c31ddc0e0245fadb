"""Class labels parsed from captions: the class a caption names, by normalised word matching.

A caption names a class when the class name's words appear in it as consecutive words (lower case, split on
anything that is not a letter or digit, so ``T-shirt`` is the words ``t shirt``), the last word optionally
with a plural ``s`` / ``es``. Longer names are matched first and their words are used up, so ``a t-shirt``
names ``t-shirt`` and not also ``shirt``. A caption naming no class, or several different classes, gets no
label (:data:`NO_CLASS`, :data:`SEVERAL_CLASSES`): the defender's labelled clean folder
(``scripts/clean_folder_from_captions.py``) and the BadCLIP attacker's images skip those rows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

NO_CLASS = -1
SEVERAL_CLASSES = -2


def caption_words(text: str) -> list[str]:
    """Lower-case words of ``text`` (runs of letters and digits)."""
    return re.findall(r"[a-z0-9]+", text.lower())


class CaptionLabeler:
    """Maps captions to class indices into ``class_names`` (see the module docstring)."""

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        words = [tuple(caption_words(name)) for name in self.class_names]
        for name, w in zip(self.class_names, words, strict=True):
            if not w:
                raise ValueError(f"class name {name!r} has no letters or digits to match in captions")
        # longest first, so that "t shirt" is matched before "shirt"
        self.patterns = sorted(((w, i) for i, w in enumerate(words)), key=lambda p: -len(p[0]))

    @staticmethod
    def _matches(candidate: list[str], pattern: tuple[str, ...]) -> bool:
        *head, last = pattern
        *chead, clast = candidate
        return list(head) == chead and clast in (last, last + "s", last + "es")

    def classes_named(self, caption: str) -> set[int]:
        """The indices of every class the caption names."""
        words = caption_words(caption)
        used = [False] * len(words)
        found: set[int] = set()
        for pattern, index in self.patterns:
            n = len(pattern)
            for start in range(len(words) - n + 1):
                if any(used[start : start + n]) or not self._matches(words[start : start + n], pattern):
                    continue
                found.add(index)
                used[start : start + n] = [True] * n
        return found

    def label(self, caption: str) -> int:
        """The class index, or :data:`NO_CLASS` / :data:`SEVERAL_CLASSES`."""
        found = self.classes_named(caption)
        if not found:
            return NO_CLASS
        return found.pop() if len(found) == 1 else SEVERAL_CLASSES
