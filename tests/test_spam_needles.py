"""Regex searches with a literal test first answer exactly as the regex alone: for the shipped
rules, the signs' patterns and constructs the needle reader must get right or leave alone."""

from __future__ import annotations

import random
import re
import zlib

import pytest

from smtpgw.spam import modernsigns
from smtpgw.spam.database import database_file
from smtpgw.spam.dbindex import open_database
from smtpgw.spam.needles import Needled, required
from smtpgw.spam.spamfilter import default_bases

TRICKY = [
    r"abc|xyz",  # either branch
    r"(?:ab)?cdef",  # an optional group requires nothing, the run after it does
    r"x(?:abc)+y",  # a repeat of at least one requires its body
    r"(?:abc)*def",
    r"(?:abc){0,3}",  # nothing required
    r"foo|b",  # one branch too short: no test
    r"(?i)viagra",  # case-insensitive: no test
    r"(?i:free) money",  # a case-insensitive part: the rest still holds a needle
    r"\bon\w+ casino\b",
    r"(?=abc)\w+",  # lookahead: read as nothing
    r"(a)bc\1def",
    r"[ab]cde|fgh",
    r"(?>abc)d",
    r"caf\u00e9|na\u00efve",
    r"a.c",  # runs of one or two characters: no test
]
ALPHABET = ["abc", "def", "xyz", "ab", "cd", "ef", "x", "y", " ", "on", "line", "casino", "FREE", "free",
            " money", "viagra", "VIAGRA", "café", "naïve", "fgh", "b", "\n", "1"]


def shipped_patterns() -> list[re.Pattern[str]]:
    database = open_database(database_file(default_bases()))
    return [rule.pattern for rule in database.rules if rule.pattern is not None]


def sign_patterns() -> list[re.Pattern[str]]:
    return [value.pattern for value in vars(modernsigns).values() if isinstance(value, Needled)]


def texts(seed: int, count: int = 300) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 12))) for _ in range(count)]


def same_answer(pattern: re.Pattern[str], text: str) -> bool:
    fast, slow = Needled(pattern).search(text), pattern.search(text)
    return (fast is None and slow is None) or (fast is not None and slow is not None and fast.span() == slow.span())


@pytest.mark.parametrize("source", TRICKY)
def test_tricky_patterns_answer_as_the_regex(source: str) -> None:
    pattern = re.compile(source)
    assert all(same_answer(pattern, text) for text in texts(zlib.crc32(source.encode())) + ALPHABET + [source])


def test_what_is_required_and_what_is_left_alone() -> None:
    assert required(re.compile(r"abc|xyz")) == ("abc", "xyz")
    assert required(re.compile(r"(?:ab)?cdef")) == ("cdef",)
    assert required(re.compile(r"x(?:abcd)+y")) == ("abcd",)
    assert required(re.compile(r"\b(?:viagra|cialis)\b")) == ("cialis", "viagra")
    assert required(re.compile(r"(?i:free) money")) == (" money",)
    for source in (r"(?i)viagra", r"foo|b", r"(?:abc){0,3}", r"a.c", r"\w+", r"(?:abc)*"):
        assert required(re.compile(source)) is None, source


def test_the_shipped_rules_and_the_signs_answer_as_their_regexes() -> None:
    patterns = shipped_patterns() + sign_patterns()
    assert sum(required(p) is not None for p in patterns) >= 15  # the body rules and the signs' texts
    samples = [
        "click here to be removed from our mailing list", "this message is not spam", "bill s. 1618 section 301",
        "100% guarantee", "earn $5,000 per week working from home", "limited time offer act now",
        "no credit check risk-free", "lower your mortgage rates today", "buy viagra online", "viagras",
        "10,000 fresh e-mail addresses", "dear friend", "transfer of the sum of us $10 next of kin fund",
        "you have been selected", "online casino", "verify your account", "your mailbox is full",
        "unusual sign-in activity", "enter your password", "unsubscribe", "manage your email preferences",
        "opt-out of", "claim your free eth tokens", "connect wallet", "seed phrase", "airdrop",
        "tag:img web-bug", "nothing to see here at all", "",
    ]
    mixed = samples + [" ".join(random.Random(i).sample(samples, 3)) for i in range(200)]
    for pattern in patterns:
        for text in mixed:
            assert same_answer(pattern, text), (pattern.pattern, text)
