"""AutoLearn: which verdicts are learned into the site spam database, the hourly bound, the journal."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pytest

from smtpgw.spam.autolearn import AutoLearner
from smtpgw.spam.database import SpamDatabase, site_file
from smtpgw.spam.spamfilter import SpamFilter, default_bases
from smtpgw.spam.verdict import SpamVerdict
from tests.e2e.test_antispam_gateway import AUTOLEARN_SPAM, HAM, SPAM

# Scored under 1e-9 by the shipped database: a confident ham.
TECH = (b"From: Alice Example <alice@example.test>\r\nTo: dev@lists.example.test\r\n"
        b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <m2@example.test>\r\n"
        b"Subject: Re: [PATCH v2] fix the build on older compilers\r\nIn-Reply-To: <m1@example.test>\r\n\r\n"
        b"On Sun, Bob wrote:\r\n> The patch breaks the build with gcc 9.\r\n\r\nThanks for the review. I think the "
        b"problem is the struct initializer in the second hunk; the attached v3 moves it into the function and the "
        b"build passes again here. Could you run the test suite on your machine too? I only tried it on Debian.\r\n"
        b"\r\nRegards,\r\nAlice\r\n")


@pytest.fixture()
def bases(tmp_path) -> str:  # type: ignore[no-untyped-def]
    """A BasesPath whose spam.db is the shipped one (linked, never written)."""
    folder = tmp_path / "bases" / "spam"
    folder.mkdir(parents=True)
    os.symlink(os.path.join(default_bases(), "spam", "spam.db"), folder / "spam.db")
    return str(tmp_path / "bases")


def section(**keys: object) -> SimpleNamespace:
    # TECH's content scores 0.022: learned as ham with a margin of 0.03, not the default 0.002.
    return SimpleNamespace(**{"SpamDetection": "standard", "AutoLearn": True, "AutoLearnHamScore": 0.03, **keys})


def verdicts_of(bases: str, raw: bytes, **keys: object) -> list[SpamVerdict]:
    return [SpamFilter(section(**keys), bases).classify(raw, None, "alice@example.test", ["bob@example.test"], [])]


def counts(bases: str) -> tuple[int, int]:
    path = site_file(bases)
    if not os.path.exists(path):
        return (0, 0)
    layer = SpamDatabase.load(path)
    return layer.bayes.nham, layer.bayes.nspam


def learn(learner: AutoLearner, bases: str, raw: bytes, dnsbl: tuple[str, ...] = (), **keys: object) -> str | None:
    return learner.consider(raw, verdicts_of(bases, raw, **keys), list(dnsbl))


def test_confident_spam_and_ham_are_learned_and_the_next_classification_counts_them(bases) -> None:  # type: ignore[no-untyped-def]
    learner = AutoLearner(section(), bases)
    before = verdicts_of(bases, AUTOLEARN_SPAM)[0].score
    assert learn(learner, bases, AUTOLEARN_SPAM) == "spam"
    assert counts(bases) == (0, 1)
    assert verdicts_of(bases, AUTOLEARN_SPAM)[0].score > before
    assert learn(learner, bases, TECH) == "ham"
    assert counts(bases) == (1, 1)
    with open(learner.journal, encoding="ascii") as journal:
        assert [line.split(" ")[2] for line in journal.read().splitlines()] == ["spam", "ham"]


def test_a_copy_differing_in_its_trace_fields_is_not_learned_twice(bases) -> None:  # type: ignore[no-untyped-def]
    learner = AutoLearner(section(), bases)
    assert learn(learner, bases, AUTOLEARN_SPAM) == "spam"
    relayed = b"Received: from relay.example.test by mx.example.test; Mon, 1 Jan 2024 10:01:00 +0000\r\n" + AUTOLEARN_SPAM
    assert learn(learner, bases, relayed) is None
    assert counts(bases) == (0, 1)


@pytest.mark.parametrize("case", ["gtube", "dnsbl", "white-list", "borderline", "too-large", "off"])
def test_what_is_never_learned(bases, case) -> None:  # type: ignore[no-untyped-def]
    keys: dict[str, object] = {}
    raw, dnsbl = AUTOLEARN_SPAM, ()
    if case == "gtube":
        raw = SPAM  # a forced rule decided (SpamAssassin's noautolearn)
    elif case == "dnsbl":
        dnsbl = ("dnsbl.test",)
    elif case == "white-list":
        keys = {"WhiteListSenders": ["*@example.test"]}
    elif case == "borderline":
        raw = HAM  # Not Detected, but far from certain (0.16)
    elif case == "too-large":
        keys = {"AutoLearnMaximalSize": 1}
        raw = AUTOLEARN_SPAM + b"x" * 1024
    elif case == "off":
        keys = {"AutoLearn": False}
    learner = AutoLearner(section(**keys), bases)
    assert learn(learner, bases, raw, dnsbl, **keys) is None
    assert not os.path.exists(site_file(bases))


def test_the_hourly_bound_is_shared_through_the_journal(bases, caplog, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(logging.getLogger("smtpgw"), "propagate", True)  # smtpgw.log.setup may have closed it
    first, second = AutoLearner(section(AutoLearnRate=1), bases), AutoLearner(section(AutoLearnRate=1), bases)
    assert learn(first, bases, AUTOLEARN_SPAM) == "spam"
    with caplog.at_level(logging.INFO, logger="smtpgw.spam.autolearn"):
        assert learn(second, bases, TECH) is None  # another worker: the journal holds the hour's one message
    assert "auto-learning paused until" in caplog.text
    assert second.full_until > 0 and counts(bases) == (0, 1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="smtpgw.spam.autolearn"):
        assert learn(second, bases, TECH) is None
    assert "paused" not in caplog.text  # remembered: not even the lock is taken again
