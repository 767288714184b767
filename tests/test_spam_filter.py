"""SpamFilter end to end on the shipped database: GTUBE, lists, DNSBL, verdict marking."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from smtpgw.log import line
from smtpgw.mail import headers
from smtpgw.spam import SpamFilter, SpamVerdict, as_log_fields, mark
from smtpgw.spam.formalsigns import GTUBE
from smtpgw.spam.spamfilter import NO_EVIDENCE, PRIOR_LOG_ODDS, _logistic, bayes_log_odds, default_bases
from smtpgw.spam.training import read_manifest
from smtpgw.spam.verdict import THRESHOLDS

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "shared", "corpus")

HAM = b"""From: Alice Example <alice@example.net>
To: Bob <bob@example.org>
Subject: Re: patch for the build script
Date: Tue, 03 Sep 2002 10:00:00 +0100
Message-ID: <20020903090000.GA1234@example.net>
In-Reply-To: <20020902.bob@example.org>

Bob, I tried your patch against the current CVS tree and the build now
passes on my Debian box. One question though: why did you move the config
parsing into the library? I think the makefile still references the old file,
so 'make install' fails. Could you send an updated diff to the list?

Thanks,
Alice
"""

SPAM = b"""From: "Best Deals" <deals8841x@hotmail.com>
To: undisclosed-recipients:;
Subject: FREE Viagra!!! Lowest prices - ORDER NOW        xkqjzw
Content-Type: text/html

<html><body><font color="#ffffff">hidden words</font>
<center><font size=5 color=red>LIMITED TIME OFFER!!!</font></center>
<p>Click here to be removed: <a href="http://203.0.113.9/remove.php">remove</a></p>
<p>Lowest prices on Viagra, 100% money back guarantee, order now! Act now,
no obligation, risk free. Earn $5000 per week working from home!</p>
<p>This email is not spam. You received it because you opted in.</p>
<a href="http://203.0.113.9/order">http://www.paypal.com/secure</a>
</body></html>
"""


def section(**overrides: object) -> SimpleNamespace:
    values: dict[str, object] = {"Check": True, "SpamDetection": "standard", "SpamSubjectPrefix": "[SPAM] ",
                                 "ProbableSpamSubjectPrefix": "[Probable Spam] "}
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.fixture(scope="module")
def spam_filter() -> SpamFilter:
    return SpamFilter(section(), None)


def test_shipped_database_loads(spam_filter: SpamFilter) -> None:
    info = spam_filter.database.info
    assert os.path.dirname(spam_filter.path).startswith(default_bases())
    assert spam_filter.database.bayes.nham > 1000 and spam_filter.database.bayes.nspam > 1000
    manifest = read_manifest(os.path.join(default_bases(), "spam", "TRAINING_FILES.txt"))
    assert (info.version, info.date) == (manifest.version, manifest.date)
    assert any(rule.name == "GTUBE" for rule in spam_filter.database.rules)


def test_obvious_ham_and_spam(spam_filter: SpamFilter) -> None:
    ham = spam_filter.classify(HAM, "192.0.2.1", "alice@example.net", ["bob@example.org"], [])
    spam = spam_filter.classify(SPAM, "192.0.2.1", "deals8841x@hotmail.com", ["bob@example.org"], [])
    assert ham.status == "Not Detected", ham
    assert spam.status == "Spam", spam
    assert ham.score < 0.1 < 0.9 <= spam.score


def test_gtube_is_spam_even_in_ham(spam_filter: SpamFilter) -> None:
    raw = HAM.replace(b"Thanks,", GTUBE.encode("ascii") + b"\nThanks,")
    verdict = spam_filter.classify(raw, None, "alice@example.net", ["bob@example.org"], [])
    assert verdict.status == "Spam"
    assert verdict.method == "rules"
    assert verdict.score == 1.0
    assert "rule GTUBE" in verdict.reasons


def test_white_lists_win(spam_filter: SpamFilter) -> None:
    listed = SpamFilter(section(WhiteListSenders=["*@hotmail.com"], WhiteListIPs=["198.51.100.0/24"],
                                BlackListIPs=["198.51.100.7"]), None)
    by_sender = listed.classify(SPAM, None, "deals8841x@HOTMAIL.com", ["bob@example.org"], [])
    assert (by_sender.status, by_sender.method) == ("Trusted", "white list")
    by_ip = listed.classify(GTUBE.encode(), "198.51.100.7", "x@example.com", ["bob@example.org"], [])
    assert by_ip.status == "Trusted"
    assert by_ip.score == 0.0


def test_white_recipients_need_every_recipient() -> None:
    listed = SpamFilter(section(WhiteListRecipients=["postmaster@*"]), None)
    alone = listed.classify(SPAM, None, "x@example.com", ["postmaster@example.org"], [])
    assert alone.status == "Trusted"
    mixed = listed.classify(SPAM, None, "x@example.com", ["postmaster@example.org", "bob@example.org"], [])
    assert mixed.status == "Spam"


def test_black_lists() -> None:
    listed = SpamFilter(section(BlackListSenders=["*@spammer.example"], BlackListIPs=["203.0.113.0/24"],
                                BlackListRecipients=["trap@example.org"]), None)
    by_sender = listed.classify(HAM, None, "bulk@spammer.example", ["bob@example.org"], [])
    assert (by_sender.status, by_sender.method, by_sender.score) == ("Blacklisted", "black list", 1.0)
    by_ip = listed.classify(HAM, "::ffff:203.0.113.50", "alice@example.net", ["bob@example.org"], [])
    assert by_ip.status == "Blacklisted"
    by_trap = listed.classify(HAM, None, "alice@example.net", ["bob@example.org", "TRAP@example.org"], [])
    assert by_trap.status == "Blacklisted"
    clean = listed.classify(HAM, "192.0.2.9", "alice@example.net", ["bob@example.org"], [])
    assert clean.status == "Not Detected"
    tagged = mark(HAM, by_sender, section(), "tag")
    assert headers.get_raw(tagged, "Subject") == b"[SPAM] Re: patch for the build script"


def test_dnsbl_listing_adds_score(spam_filter: SpamFilter) -> None:
    unknown = (b"From: Someone <someone@example.com>\nTo: bob@example.org\nSubject: qwzx\n"
               b"Date: Tue, 03 Sep 2002 10:00:00 +0100\nMessage-ID: <abc@example.com>\n\nqwzxv plorf\n")
    plain = spam_filter.classify(unknown, "192.0.2.1", "", ["bob@example.org"], [])
    once = spam_filter.classify(unknown, "192.0.2.1", "", ["bob@example.org"], ["zen.example"])
    twice = spam_filter.classify(unknown, "192.0.2.1", "", ["bob@example.org"], ["zen.example", "bl.example"])
    assert plain.score < once.score < twice.score
    assert plain.status == "Not Detected"
    assert once.status in ("Probable Spam", "Spam") and once.method == "dnsbl"
    assert any(reason.startswith("dnsbl zen.example +2.00") for reason in once.reasons)
    off = SpamFilter(section(DNSBlackListWeight=0.0), None)
    assert off.classify(unknown, "192.0.2.1", "", ["bob@example.org"], ["zen.example"]).score == plain.score
    # A zone named twice counts once; a DNS failure never reaches classify.
    repeated = spam_filter.classify(unknown, "192.0.2.1", "", ["bob@example.org"], ["zen.example", "zen.example"])
    assert repeated.score == once.score


def test_levels_order_thresholds() -> None:
    raw = SPAM.replace(b"Viagra", b"pills")
    scores = {}
    for level in ("soft", "standard", "hard"):
        verdict = SpamFilter(section(SpamDetection=level), None).classify(raw, None, "", ["bob@example.org"], [])
        scores[level] = verdict.status
    rank = {"Not Detected": 0, "Probable Spam": 1, "Spam": 2}
    assert rank[scores["soft"]] <= rank[scores["standard"]] <= rank[scores["hard"]]
    # Each level is stricter than the one before it, and content without a
    # single known clue is never Probable Spam at any level.
    soft, standard, hard = (THRESHOLDS[level] for level in ("soft", "standard", "hard"))
    assert soft[0] >= standard[0] >= hard[0] and soft[1] >= standard[1] >= hard[1]
    assert _logistic(PRIOR_LOG_ODDS + bayes_log_odds(NO_EVIDENCE)) < hard[0]


def test_check_disabled() -> None:
    verdict = SpamFilter(section(Check=False), None).classify(SPAM, None, "", [], [])
    assert (verdict.status, verdict.method) == ("Not Detected", "not checked")


def test_mark_headers_and_tag(spam_filter: SpamFilter) -> None:
    raw = b"X-SpamTest-Status: Not Detected\r\nX-Spamtest-Rate: 0\r\n" + SPAM.replace(b"\n", b"\r\n")
    verdict = spam_filter.classify(raw, None, "", ["bob@example.org"], [])
    out = mark(raw, verdict, section(), "tag")
    assert headers.count(out, "X-SpamTest-Status") == 1
    assert headers.count(out, "X-SpamTest-Rate") == 1
    assert headers.get_raw(out, "X-SpamTest-Status") == b"Spam"
    assert headers.get_raw(out, "X-SpamTest-Method") == verdict.method.encode()
    assert headers.get_raw(out, "Subject").startswith(b"[SPAM] FREE Viagra")
    assert out.endswith(SPAM.replace(b"\n", b"\r\n").split(b"\r\n\r\n", 1)[1])
    passed = mark(raw, verdict, section(), "pass")
    assert headers.get_raw(passed, "Subject").startswith(b"FREE")
    fields, values = as_log_fields(verdict)
    assert line(fields, *values) == f'as-status="Spam", score={headers.get_raw(out, "X-SpamTest-Rate").decode()}, method="{verdict.method}"'


def test_verdict_values_are_validated() -> None:
    with pytest.raises(ValueError):
        SpamVerdict("Spam\r\nX-Evil: 1", 1.0, "content")
    with pytest.raises(ValueError):
        SpamVerdict("Spam", 1.5, "content")
    with pytest.raises(ValueError):
        SpamVerdict("Spam", 1.0, "magic")


def test_reload_keeps_old_database_on_damage(tmp_path) -> None:  # type: ignore[no-untyped-def]
    shipped = os.path.join(default_bases(), "spam", "spam.db")
    target = tmp_path / "spam.db"
    target.write_bytes(open(shipped, "rb").read())
    own = SpamFilter(section(), str(tmp_path))
    version = own.database.info.version
    target.write_bytes(target.read_bytes()[:-200])  # truncated by a failed copy
    assert own.reload() is False
    assert own.database.info.version == version
    assert own.classify(SPAM, None, "", ["bob@example.org"], []).status == "Spam"


def test_reload_swaps_in_a_new_version(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from smtpgw.spam.database import SpamDatabase

    shipped = SpamDatabase.load(os.path.join(default_bases(), "spam", "spam.db"))
    shipped.save(str(tmp_path / "spam.db"))
    own = SpamFilter(section(), str(tmp_path))
    shipped.info.version = "next"
    shipped.save(str(tmp_path / "spam.db"))
    assert own.database.info.version != "next"
    assert own.reload() is True
    assert own.database.info.version == "next"


@pytest.mark.skipif(not os.path.isdir(os.path.join(CORPUS, "spamassassin")), reason="corpus not present")
def test_every_corpus_file_classifies(spam_filter: SpamFilter) -> None:
    seen = 0
    for folder, _dirs, files in os.walk(CORPUS):
        for name in sorted(files):
            if name.endswith(".md"):
                continue
            with open(os.path.join(folder, name), "rb") as src:
                raw = src.read()
            verdict = spam_filter.classify(raw, "192.0.2.1", "a@example.com", ["b@example.org"], [])
            out = mark(raw, verdict, section(), "tag")
            assert headers.count(out, "X-SpamTest-Status") == 1
            seen += 1
    assert seen > 4000


def test_groups_get_their_own_filters_over_one_loaded_database(tmp_path) -> None:
    """A scanner worker builds one filter per distinct group anti-spam setting; every filter
    reads the same database object (it is ~130 MiB in memory: never one copy per group)."""
    from smtpgw.config import load_config
    from smtpgw.scan.job import Job
    from tests.test_config import minimal_with

    path = minimal_with(tmp_path, "[smtpgw.antispam]\nSpamDetection=soft\n"
                        "[smtpgw.group:strict]\nRecipients=*@strict.test\nSpamDetection=hard\n"
                        "[smtpgw.group:plain]\nRecipients=*@plain.test\nCheck=false\n")
    job = Job(load_config(path))
    assert job.spam["plain"] is job.spam["policy"] and job.spam["policy"].level == "soft"
    assert job.spam["strict"] is not job.spam["policy"] and job.spam["strict"].level == "hard"
    assert job.spam["strict"].database is job.spam["policy"].database
@pytest.fixture()
def site_bases(tmp_path):  # type: ignore[no-untyped-def]
    """A BasesPath whose spam.db is the shipped one (a link: only read), its site layer beside it."""
    bases = tmp_path / "bases"
    (bases / "spam").mkdir(parents=True)
    os.symlink(os.path.join(default_bases(), "spam", "spam.db"), bases / "spam" / "spam.db")
    return str(bases)


def test_learned_ham_counts_from_the_next_message_without_a_reload(site_bases, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from smtpgw.spam.database import site_file
    from smtpgw.spam.training import learn_files

    own = SpamFilter(section(), site_bases)
    before = own.classify(SPAM, None, "", ["bob@example.org"], [])
    assert before.status == "Spam"
    (tmp_path / "released.eml").write_bytes(SPAM)
    assert learn_files(site_bases, [str(tmp_path / "released.eml")], is_spam=False) == 1
    assert os.path.exists(site_file(site_bases)) and site_file(site_bases) == str(tmp_path / "site-spam.db")
    after = own.classify(SPAM, None, "", ["bob@example.org"], [])  # same filter, no reload
    assert after.score < before.score  # the content is now ham-like; the formal-sign rules still hit
    assert (before.method, after.method) == ("content", "rules")
    assert own.classify(HAM, None, "", ["bob@example.org"], []).status == "Not Detected"
    other = (b"From: Best Deals <deals@promo-offers.biz>\nTo: bob@example.org\nSubject: Cheap meds online - no "
             b"prescription needed\n\nBuy cialis cheap, no prescription needed! Lowest prices guaranteed, order now "
             b"and save 80%.\nClick here to order: http://promo-offers.biz/buy\n")
    # One release whitelists no one else: a near twin of the released message is still flagged.
    assert own.classify(other, None, "", ["bob@example.org"], []).status in ("Probable Spam", "Spam")


def test_a_damaged_site_layer_is_logged_and_left_out(site_bases, caplog, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import logging

    from smtpgw.spam.database import site_file

    monkeypatch.setattr(logging.getLogger("smtpgw"), "propagate", True)  # smtpgw.log.setup may have closed it

    own = SpamFilter(section(), site_bases)
    shipped_only = own.classify(SPAM, None, "", ["bob@example.org"], [])
    with open(site_file(site_bases), "wb") as damaged:
        damaged.write(b"smtpgw-spam-db\t2\nversion\tsite\n")  # a half-written copy
    with caplog.at_level("ERROR", logger="smtpgw.spam.filter"):
        first = own.classify(SPAM, None, "", ["bob@example.org"], [])
        second = own.classify(SPAM, None, "", ["bob@example.org"], [])
    assert (first.status, first.score) == (second.status, second.score) == (shipped_only.status, shipped_only.score)
    ignored = [r.getMessage() for r in caplog.records if "site spam database ignored" in r.getMessage()]
    assert len(ignored) == 1 and "truncated" in ignored[0]  # once per change of the file, with the reason
    assert own.reload() is True  # the shipped database reloads all the same
