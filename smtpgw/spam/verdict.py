"""Spam verdicts, the SpamDetection thresholds, and marking a message with them.

Owns: the five statuses (``Spam``, ``Probable Spam``, ``Not Detected``,
``Trusted``, ``Blacklisted``), the method names of ``X-SpamTest-Method``, the
score thresholds of ``SpamDetection=soft|standard|hard``, the
``X-SpamTest-Status`` / ``X-SpamTest-Method`` / ``X-SpamTest-Rate`` headers, the
Subject tag of action ``tag`` (Spam and Blacklisted are tagged as spam), and the
fields of the ``AS-SCANNED`` log line.

Must never: let a sender's own ``X-SpamTest-*`` fields through (clients filter
on them, so forged ones are removed before ours are added), write a header
value that is not one of the known statuses/methods, or put CR, LF or NUL in a
header (a configured prefix carrying them is cleaned here and refused again by
``headers.prefix_subject``).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

from smtpgw.mail import headers
from smtpgw.rules.policy import SpamAction

log = logging.getLogger("smtpgw.spam.verdict")

SPAM = "Spam"
PROBABLE_SPAM = "Probable Spam"
NOT_DETECTED = "Not Detected"
TRUSTED = "Trusted"
BLACKLISTED = "Blacklisted"
STATUSES = (SPAM, PROBABLE_SPAM, NOT_DETECTED, TRUSTED, BLACKLISTED)

METHODS = ("white list", "black list", "dnsbl", "headers", "content", "rules", "not checked")

# (Probable Spam from, Spam from) on the final score, chosen on mail of other sources and eras than
# the database was trained on: the pooled scores of bench/spam_accuracy.py's leave-one-source-out
# protocol (a database of the other sources judges each of SpamAssassin 2002 and 2003-05, TREC 2007
# and modern-mixed 2025-26; the one of every source judges the mailing-list ham 2019-26 and the
# phishing 2022-26), never one set. Spam: the lowest score that calls at most 0.1% of the ham of
# every one of those five ham sets Spam (0.05% for "soft"; "hard" keeps 0.995). Probable Spam at
# "standard": 0.5, log-odds 0, the content and rules saying spam more than ham. Database 2026.12.07-3
# (the site's own relays are no longer the entry hop) and spamfilter's factors of that version, at
# ham→Spam / ham→Probable / caught (bench/spam_accuracy.py, each level with its own rules):
#   standard  sa-2002 0.00% / 10.1% / 89.3%   sa-2003-05 0.00% / 3.56% / 92.5%   trec-2007 0.05% / 5.32% / 81.0%
#             modern-mixed 0.00% / 12.9% / 84.8%   lists 0.10% / 0.70% / -   phishing caught 93.4%
#   soft      sa-2002 0.00% / 4.29% / 75.2%   sa-2003-05 0.00% / 0.73% / 77.9%   trec-2007 0.02% / 0.98% / 64.2%
#             modern-mixed 0.00% / 7.53% / 73.3%   lists 0.05% / 0.35% / -   phishing caught 81.8%
#   hard      sa-2002 0.10% / 15.2% / 93.7%   sa-2003-05 0.00% / 5.55% / 94.8%   trec-2007 0.22% / 9.23% / 84.3%
#             modern-mixed 2.15% / 17.2% / 88.6%   lists 0.10% / 0.85% / -   phishing caught 95.2%
#   ("hard" counts more rules and calls more Spam by design: at 0.99 it called 3.2% of modern-mixed ham Spam.)
# (the factors in spamfilter and these thresholds were chosen on those pooled held-out scores, so
# they are tuned on all four trained sources at once; the modern-mixed 5-fold gives 0.00% / 4.30% /
# 88.6% at "standard".) Database 2026.12.07-2 with the former factors and (0.40, 0.998) gave at
# "standard": sa-2002 0.00% / 9.62% / 85.4%, sa-2003-05 0.00% / 3.87% / 88.2%, trec-2007 0.03% /
# 5.67% / 80.9%, modern-mixed 0.00% / 24.7% / 81.9%, lists 0.10% / 0.75%, phishing 91.9%.
# Keeping ham→Probable at or under 3% on every held-out set still needs a Probable threshold that
# catches only 64-78% (soft): the ranking across sources ((1-AUC)% 1.5-3.9, modern 7.7) does not yet
# allow both, and "standard" keeps the catch. Every Probable threshold is above the score of a
# message without a known clue (then 0.333, spamfilter.NO_EVIDENCE). Database 2026.12.07-4 (the same
# counting, with the signs of a disguised sender and of a sender that signs for its own name) at
# "standard": sa-2002 0.00% / 8.63% / 86.5%, sa-2003-05 0.00% / 2.51% / 90.1%, trec-2007 0.07% /
# 5.17% / 81.8%, modern-mixed 0.00% / 8.60% / 84.8% (5-fold 0.00% / 3.23% / 89.5%), lists 0.05% /
# 0.75%, phishing caught 92.7%; (1-AUC)% 4.52 / 1.71 / 2.87 / 4.60.
# Spamfilter's fitted combination (bench/spam_combination.py) made the score a probability with a
# prior of its own; each level's thresholds were then moved to where the former ones stood in ham
# calls, averaged over the four held-out sources (the Spam one also at or under 0.1% of each
# trained source's ham: the lowest such is 0.984), with the standard level's rules. Database
# 2026.12.07-4 with the hand-set factors and (0.50, 0.997) at "standard", ham→Spam / ham→Probable /
# caught per set: sa-2002 0.00 / 8.63 / 86.5, sa-2003-05 0.00 / 2.51 / 90.1, trec-2007 0.07 / 5.23 /
# 81.8, modern-mixed 0.00 / 8.60 / 84.8, lists 0.05 / 0.80, phishing caught 92.7. Database
# 2026.12.07-5 and the fitted factors (spam_combination's held-out evidence):
#   standard (0.62, 0.987)  sa-2002 0.00 / 8.83 / 87.6   sa-2003-05 0.00 / 3.46 / 90.3
#     trec-2007 0.05 / 5.92 / 85.1   modern-mixed 0.00 / 5.38 / 84.8   lists 0.05 / 0.90   phishing 91.8
#   soft (0.78, 0.988)  ham→Probable 4.65 / 1.05 / 1.52 / 4.30, caught 81.0 / 84.7 / 75.1 / 81.0, phishing 85.8
#   hard (0.57, 0.973)  ham→Probable 10.1 / 5.24 / 7.55 / 8.60, caught 91.5 / 91.3 / 87.3 / 85.7, phishing 92.8
#     (ham→Spam 0.10 / 0.00 / 0.17 / 1.08: "hard" calls more Spam by design)
# (the combination and these thresholds are tuned on the three trained sources; lists and phishing
# are untouched by both). A message without a known clue scores about 0.55, under every Probable
# threshold. Database 2026.12.07-6 (EMBEDDED_IMAGE_LURE), the same factors and thresholds, at
# "standard": trec-2007 0.05 / 5.92 / 92.2 ((1-AUC)% 2.74 -> 1.67; the sign was designed on its
# missed spam), every other set unchanged. Database 2026.12.07-7 (fields stamped by collectors and
# relays on the way, such as TREC's X-Miltered, no longer learned), same factors and thresholds:
#   standard  sa-2002 0.00 / 8.47 / 88.7   sa-2003-05 0.00 / 3.25 / 90.9   trec-2007 0.05 / 6.15 / 92.5
#     modern-mixed 0.00 / 5.38 / 85.7   lists 0.05 / 0.85   phishing 91.9   ((1-AUC)% 3.48 / 1.38 / 1.68 / 4.26)
# Database 2026.12.07-8 (IMAGE_ONLY_LINK no longer fires on a plain-text note with a link; HTML_FORM only
# at hard; CLICK_HERE_REMOVE no longer matches "click here to unsubscribe"), same factors and thresholds:
#   standard  sa-2002 0.00 / 6.43 / 89.0   sa-2003-05 0.00 / 3.56 / 91.3   trec-2007 0.05 / 5.78 / 92.5
#     modern-mixed 0.00 / 6.45 / 85.7 (5-fold 0.00 / 3.23 / 89.5)   lists 0.05 / 0.85   phishing 92.0
#     ((1-AUC)% 3.02 / 1.40 / 1.59 / 4.07)
# A Probable threshold moved along these scores trades the two: 0.63 calls 6.2 / 3.4 / 5.6 / 6.5% of the
# ham Probable but catches 88.4 / 91.2 / 92.1 / 84.8%; so 0.62 stays. Database 2026.12.07-10 (-8 with
# the throw-away senders' signs TOKEN_PATH_LINKS, FROM_TENANT_DOMAIN, SUBJECT_PADDING, designed on
# modern-mixed's and sa-2002's missed spam), same factors and thresholds:
#   standard  sa-2002 0.00 / 6.43 / 90.1   sa-2003-05 0.00 / 3.56 / 91.7   trec-2007 0.05 / 5.78 / 92.5
#     modern-mixed 0.00 / 6.45 / 90.5 (5-fold 0.00 / 3.23 / 92.4)   lists 0.05 / 0.85   phishing 92.9
#     ((1-AUC)% 2.91 / 1.34 / 1.60 / 3.00)
# Database 2026.12.08-1 (no "rdns-none" hint: the receiving software's format; the marks of legitimate
# bulk mail no longer count for a sender on a throw-away top-level domain; more brand names), same
# factors and thresholds:
#   standard  sa-2002 0.00 / 4.08 / 90.6   sa-2003-05 0.00 / 1.15 / 89.9   trec-2007 0.05 / 5.78 / 91.8
#     modern-mixed 0.00 / 7.53 / 93.3 (5-fold 0.00 / 3.23 / 95.2)   lists 0.05 / 0.85   phishing 93.1
#     ((1-AUC)% 2.39 / 0.92 / 1.71 / 2.34, 5-fold 1.20)
# On these scores a Probable threshold of 0.60 gives 4.3 / 1.5 / 6.3 / 7.5% ham Probable for 90.9 / 91.2 /
# 92.3 / 93.3% caught, 0.64 3.5 / 1.1 / 5.5 / 6.5% for 89.3 / 89.4 / 91.1 / 93.3%; a refit of the factors
# (bench/spam_combination.py) ranked worse held out (sa-2002 2.48, trec-2007 1.96): both stay. With the
# rules STOCK_PROMOTION and MALE_ENHANCEMENT (designed on trec-2007's missed spam), same thresholds:
#   standard  sa-2002 0.00 / 4.08 / 90.6   sa-2003-05 0.00 / 1.15 / 90.1   trec-2007 0.05 / 5.78 / 93.4
#     modern-mixed 0.00 / 7.53 / 93.3 (5-fold 0.00 / 3.23 / 95.2)   lists 0.05 / 0.85   phishing 93.1
#     ((1-AUC)% 2.39 / 0.91 / 1.55 / 2.34, 5-fold 1.20)
# URL_TEXT_MISMATCH comparing registered domains (a link showing the owner's www host that goes to its
# mail or click host is no disguise), on 2026.12.08-1's input, same factors and thresholds:
#   standard  sa-2002 0.00 / 3.35 / 88.4   sa-2003-05 0.00 / 1.05 / 88.3   trec-2007 0.05 / 5.97 / 93.4
#     modern-mixed 0.00 / 6.45 / 93.3   lists 0.05 / 0.85   phishing 93.1   ((1-AUC)% 2.75 / 1.06 / 1.57 / 2.37)
# The SpamAssassin sets' drop is the seeded descent of the term weights (terms.SEED): with SEED 1,
# ham→Probable / caught without then with the change: sa-2002 3.24 / 88.2 then 3.71 / 89.3, sa-2003-05
# 1.05 / 87.2 then 1.15 / 89.9, trec-2007 5.77 / 93.2 then 5.75 / 93.3, modern-mixed 7.53 / 93.3 then
# 6.45 / 93.3 (terms.py has the spread).
# Database 2026.12.08-4 (-3 with that change), same factors and thresholds, at the shipped seed:
#   standard  sa-2002 0.00 / 3.35 / 90.9   sa-2003-05 0.00 / 1.05 / 91.9   trec-2007 0.05 / 5.97 / 95.0
#     modern-mixed 0.00 / 6.45 / 95.2 (5-fold 0.00 / 3.23 / 95.2, (1-AUC)% 1.16)   lists 0.10 / 0.80   phishing 93.2
#     ((1-AUC)% 2.20 / 0.75 / 1.14 / 2.02)
# -3 gave 0.00 / 4.08 / 92.3, 0.00 / 1.15 / 93.0, 0.05 / 5.78 / 95.1, 0.00 / 7.53 / 95.2, lists 0.10 /
# 0.80, phishing 93.15 at the shipped seed and sa-2002 3.24 / 90.9, sa-2003-05 1.05 / 91.3, trec-2007
# 5.77 / 94.9, modern-mixed 7.53 / 95.2, phishing 93.05 at SEED 1: the SpamAssassin sets' catch is
# within that spread. Judged without the seed's noise (the term weights fitted at a rate falling over
# the passes, terms.py, the same seed, without then with the change): sa-2002 3.71 / 91.7 then 3.45 /
# 91.5, sa-2003-05 1.05 / 92.3 then 1.05 / 92.1, trec-2007 6.43 / 95.3 then 6.40 / 95.3, modern-mixed
# 7.53 / 95.2 both, phishing 93.00 then 92.95: seven ham fewer in the Probable band (sa-2002 5,
# trec-2007 2) for three SpamAssassin spam (of 1,328) and one phishing mail more missed.
# What holds TREC 2007's ham in the Probable band (347 of 6,000 held out, two thirds the alerts of two
# senders, broadcast.shareholder.com and CNN): a Bayes score of 0.5 (strong clues both ways), term
# weights of +0.2..+0.7 and the prior put them at 0.62-0.75; the HTML structure tokens, the era's
# format tokens, a stronger Robinson prior and a minimum count for Bayes clues do not move them
# without costing another set (tokenizer.py, bayes.py have the figures).
# Database 2026.12.08-6 (term weights fitted at a rate falling over the passes, terms.py; the
# combination refitted on it, spamfilter.py): "standard"'s Spam threshold 0.987 -> 0.993 and "soft"'s
# 0.988 -> 0.994 (the refit's scores are steeper: at 0.990 the held-out evidence put 3 of lists' ham and
# 5 of TREC 2007's at Spam, at 0.993 2 and 1); Probable thresholds as they were. At seeds 20050311 / 1:
#   standard  sa-2002 0.00 / 3.55 / 94.5, 0.00 / 3.61 / 94.2   sa-2003-05 0.00 / 0.94 / 93.3, 0.00 / 0.94 / 93.5
#     trec-2007 0.02 / 5.77 / 95.3, 0.02 / 5.58 / 95.3   modern-mixed 0.00 / 7.53 / 95.2 both (5-fold 0.00 /
#     3.23 / 95.2)   lists 0.10 / 0.80 both   phishing 93.35, 93.30
#     ((1-AUC)% 0.95 / 0.61 / 1.06 / 1.84, 5-fold 1.14; at seed 1 0.92 / 0.61 / 1.03 / 1.83)
# "hard"'s Spam threshold 0.973 -> 0.985, where its ham called Spam is what it was (held-out scores:
# sa-2002 1, trec-2007 22, modern-mixed 2, lists 3; at 0.973 3 / 30 / 2 / 4). Seed 20050311, before then after:
#   soft  sa-2002 0.00 / 1.15 / 82.4 then 0.00 / 1.15 / 84.3   sa-2003-05 0.00 / 0.63 / 82.7 then 0.00 / 0.31 / 85.2
#     trec-2007 0.02 / 1.20 / 88.2 then 0.02 / 1.05 / 89.1   modern-mixed 0.00 / 4.30 / 89.5 then 0.00 / 4.30 / 91.4
#     lists 0.10 / 0.45 then 0.05 / 0.45   phishing 88.35 then 88.25
#   hard (caught) sa-2002 95.6 then 95.9, sa-2003-05 94.2 then 95.0, trec-2007 96.3 both, modern-mixed 95.2
#     both, phishing 94.55 then 94.35; its Probable band holds more ham (sa-2002 5.07 -> 5.91%, trec-2007
#     10.25 -> 10.67%, modern-mixed 6.45 -> 8.60%: the Probable threshold was matched to the old scores).
THRESHOLDS: dict[str, tuple[float, float]] = {
    "soft": (0.78, 0.994),
    "standard": (0.62, 0.993),
    "hard": (0.57, 0.985),
}
DEFAULT_LEVEL = "standard"

HEADER_STATUS = "X-SpamTest-Status"
HEADER_METHOD = "X-SpamTest-Method"
HEADER_RATE = "X-SpamTest-Rate"
_OWN_PREFIX = "x-spamtest-"
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class SpamVerdict:
    status: str
    score: float  # 0.0 (ham) .. 1.0 (spam)
    method: str
    reasons: list[str] = field(default_factory=list)
    # The score of the content alone (Bayes, clue vote, term weights), None when a list or a
    # forced rule decided: what auto-learning (``autolearn``) may trust.
    content: float | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown spam status {self.status!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown spam method {self.method!r}")
        if not (0.0 <= self.score <= 1.0) or math.isnan(self.score):
            raise ValueError(f"spam score {self.score!r} outside 0..1")

    @property
    def is_spam(self) -> bool:
        """Spam, Probable Spam or Blacklisted: the statuses a policy acts on."""
        return self.status in (SPAM, PROBABLE_SPAM, BLACKLISTED)


def level_of(section: object) -> str:
    level = str(getattr(section, "SpamDetection", DEFAULT_LEVEL) or DEFAULT_LEVEL).strip().lower()
    return level if level in THRESHOLDS else DEFAULT_LEVEL


def status_for(score: float, level: str) -> str:
    probable, spam = THRESHOLDS.get(level, THRESHOLDS[DEFAULT_LEVEL])
    if score >= spam:
        return SPAM
    if score >= probable:
        return PROBABLE_SPAM
    return NOT_DETECTED


def format_score(score: float) -> str:
    """Four decimals, rounded down so a shown rate never reaches a threshold the score did not."""
    return f"{math.floor(score * 10000) / 10000:.4f}"


def as_log_fields(verdict: SpamVerdict) -> tuple[str, list[object]]:
    """``as-status="Spam", score=0.9999, method="content"`` for the AS-SCANNED log line:
    its template and values (``smtpgw.log.line`` escapes them)."""
    return 'as-status="%s", score=%s, method="%s"', [verdict.status, format_score(verdict.score), verdict.method]


def clean_prefix(prefix: str) -> str:
    """A configured Subject prefix with control characters (CR, LF, NUL ...) made spaces."""
    cleaned = _UNSAFE.sub(" ", prefix)
    if cleaned != prefix:
        log.warning("subject prefix %r contains control characters; they were replaced by spaces", prefix)
    return cleaned


def mark(raw: bytes, verdict: SpamVerdict, antispam_section: object, action: str) -> bytes:
    """The message with our X-SpamTest-* fields and, for action ``tag``, the Subject prefix.

    Spam and Blacklisted get SpamSubjectPrefix, Probable Spam gets
    ProbableSpamSubjectPrefix; Not Detected and Trusted are never tagged.
    """
    out = raw
    for name in _own_fields(raw):
        out = headers.remove(out, name)
    out = headers.prepend(
        out,
        [
            (HEADER_STATUS, verdict.status),
            (HEADER_METHOD, verdict.method),
            (HEADER_RATE, format_score(verdict.score)),
        ],
    )
    if action == SpamAction.TAG and verdict.status in (SPAM, PROBABLE_SPAM, BLACKLISTED):
        if verdict.status != PROBABLE_SPAM:
            prefix = getattr(antispam_section, "SpamSubjectPrefix", None)
            prefix = "[SPAM] " if prefix is None else prefix
        else:
            prefix = getattr(antispam_section, "ProbableSpamSubjectPrefix", None)
            prefix = "[Probable Spam] " if prefix is None else prefix
        out = headers.prefix_subject(out, clean_prefix(str(prefix)))
    return out


def _own_fields(raw: bytes) -> list[str]:
    """The names of the message's X-SpamTest-* fields (as written), in order of name."""
    if _OWN_PREFIX.encode() not in raw[:headers.header_end(raw)].lower():
        return []  # a field name is one run of bytes in the header: none of ours, no header split
    names = set()
    for name in headers.field_names(raw):
        if name.lower().startswith(_OWN_PREFIX):
            names.add(name)
    return sorted(names)
