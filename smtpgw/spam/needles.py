"""Regular expression searches with a cheap test first: the literal strings a match must contain.

Owns: ``Needled`` — a compiled pattern and the strings (its "needles") one of which every match
of it holds, read from the pattern's parse tree — and its ``search``, which answers None at
once when the text holds none of them and otherwise runs the pattern itself. Python's ``re``
tries a pattern that starts with ``\\b`` or a group of words at every position of the text (35
ns a character), while ``str.__contains__`` skips through it; most rules and signs look for
words that most mail does not contain, so the test decides most searches alone.

Must never: answer differently from ``pattern.search`` (the needles are only a necessary
condition: a pattern with case-insensitive parts, or whose parse tree holds anything not read
here, gets none, and is always run), or raise for any pattern ``re`` compiled.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

try:
    from re import _constants as _sre, _parser as _sre_parse  # Python 3.11+
except ImportError:  # pragma: no cover - older names of the same modules
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

MIN_NEEDLE = 3  # shorter needles are in nearly every text: no test at all is cheaper
MAX_NEEDLES = 24  # beyond that many, the tests would cost what the search costs
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", _sre.MAX_REPEAT)}
_ATOMIC = getattr(_sre, "ATOMIC_GROUP", None)

Needles = frozenset[str]


def required(pattern: re.Pattern[str]) -> tuple[str, ...] | None:
    """Strings one of which every match of ``pattern`` contains (longest first), or None."""
    if not isinstance(pattern.pattern, str) or pattern.flags & (re.IGNORECASE | re.LOCALE):
        return None
    try:
        tree = _sre_parse.parse(pattern.pattern, pattern.flags)
    except Exception:  # an internal parser that moved on: no test, the pattern still runs
        return None
    found = _sequence(list(tree))
    if not found or len(found) > MAX_NEEDLES or min(map(len, found)) < MIN_NEEDLE:
        return None
    return tuple(sorted(found, key=lambda needle: (-len(needle), needle)))


def _better(a: Needles | None, b: Needles | None) -> Needles | None:
    """The more selective of two requirements: the longer shortest needle, then fewer needles."""
    if a is None:
        return b
    if b is None:
        return a
    return a if (min(map(len, a)), -len(a)) >= (min(map(len, b)), -len(b)) else b


def _sequence(items: Sequence[tuple]) -> Needles | None:
    """What a sequence of parse items requires: its longest run of literal characters (matched
    side by side), or the requirement of one of its items, whichever is the more selective."""
    best: Needles | None = None
    run: list[str] = []
    for op, arg in items:
        if op is _sre.LITERAL:
            run.append(chr(arg))
            continue
        if run:
            best = _better(best, frozenset({"".join(run)}))
            run = []
        best = _better(best, _item(op, arg))
    if run:
        best = _better(best, frozenset({"".join(run)}))
    return best


def _item(op: object, arg: object) -> Needles | None:
    """What one parse item other than a literal requires, or None."""
    if op is _sre.SUBPATTERN:
        _group, add_flags, _del_flags, sub = arg  # type: ignore[misc]
        return None if add_flags & (re.IGNORECASE | re.LOCALE) else _sequence(list(sub))
    if op is _sre.BRANCH:
        union: set[str] = set()
        for branch in arg[1]:  # type: ignore[index]
            needles = _sequence(list(branch))
            if needles is None:
                return None  # one branch can match without any needle
            union |= needles
        return frozenset(union)
    if op in _REPEATS:
        low, _high, sub = arg  # type: ignore[misc]
        return _sequence(list(sub)) if low >= 1 else None
    if _ATOMIC is not None and op is _ATOMIC:
        return _sequence(list(arg))  # type: ignore[call-overload]
    return None


class Needled:
    """``pattern`` with its needles: ``search`` answers as ``pattern.search`` does."""

    __slots__ = ("pattern", "needles")

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self.needles = required(pattern)

    def search(self, text: str) -> re.Match[str] | None:
        needles = self.needles
        if needles is not None:
            for needle in needles:
                if needle in text:
                    break
            else:
                return None
        return self.pattern.search(text)
