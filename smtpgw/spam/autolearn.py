"""Auto-learning: confident verdicts learned into the site spam database (``[smtpgw.antispam] AutoLearn=yes``).

Owns: the choice of which scanned messages are learned without an
administrator, the learning itself (``training.learn_tokens`` under the site
layer's write lock, so workers pick it up at their next message, as after
``spam learn``) and the hourly bound shared by every scanner worker.

The safety margins follow SpamAssassin's auto-learning (Mail::SpamAssassin::
Plugin::AutoLearnThreshold: ham under 0.1 points, spam from 12 points where the
spam threshold is 5, never on a rule marked ``noautolearn`` such as GTUBE): a
message is learned only when

* the content decided every verdict made for it: no white or black list, no
  forced rule (GTUBE), no DNSBL listing of the client (a listing says where the
  mail came from, not what it says, and a listed ham would teach spam);
* all of them agree: every verdict Spam with both the final score and the
  content's own score at or above ``AutoLearnSpamScore`` (rules or headers
  alone never carry a message into the database), or every verdict Not
  Detected with both at or under ``AutoLearnHamScore``;
* it is no larger than ``AutoLearnMaximalSize`` KB (a big message is mostly
  attachment and teaches little but noise);
* fewer than ``AutoLearnRate`` messages were auto-learned in the hour before,
  by any worker, and this very message (the SHA-256 of its tokens: trace fields
  left out) was not among them.

The hour's learning is kept in the journal ``.site-spam.db.autolearn`` beside
the site database (one ``EPOCH SHA256 KIND`` line per message learned, only the
last hour's), read and rewritten under the same lock as the database.

Must never: learn a message a list, a forced rule or a DNSBL decided; let a
failure to learn reach the scan of the message (it is logged, the mail goes on);
hold the write lock when the hour's bound is reached (the time the next slot
frees is remembered, so a worker then costs nothing per message).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass

from smtpgw.spam import training
from smtpgw.spam.database import DatabaseError, site_file, write_lock
from smtpgw.spam.verdict import NOT_DETECTED, SPAM, SpamVerdict
from smtpgw.spool.queue import write_durably

log = logging.getLogger("smtpgw.spam.autolearn")

WINDOW = 3600.0  # seconds over which AutoLearnRate counts
# On the held-out content scores of bench/spam_combination.py (every set, each judged by a database
# that never saw its source): 0.5% of spam reaches 0.997 and no ham 0.986; 3.6% of ham is at or
# under 0.002 and no spam under 0.008.
DEFAULT_SPAM_SCORE = 0.997
DEFAULT_HAM_SCORE = 0.002
DEFAULT_MAXIMAL_SIZE = 256  # KB
DEFAULT_RATE = 100  # messages an hour


@dataclass(frozen=True)
class Margins:
    spam: float  # a spam is learned from this score on (final and content alone)
    ham: float  # a ham is learned up to this score
    max_bytes: int
    per_hour: int

    @classmethod
    def of(cls, section: object) -> Margins:
        def value(key: str, default: float) -> float:
            found = getattr(section, key, None)
            return default if found is None else float(found)

        return cls(value("AutoLearnSpamScore", DEFAULT_SPAM_SCORE), value("AutoLearnHamScore", DEFAULT_HAM_SCORE),
                   int(value("AutoLearnMaximalSize", DEFAULT_MAXIMAL_SIZE)) * 1024,
                   int(value("AutoLearnRate", DEFAULT_RATE)))


def confident(verdicts: list[SpamVerdict], dnsbl_listed: list[str], margins: Margins) -> bool | None:
    """True to learn as spam, False as ham, None not to learn: the margins of the module docstring."""
    contents = [v.content for v in verdicts]
    if not verdicts or dnsbl_listed or None in contents:
        return None
    low = min(min(v.score for v in verdicts), *contents)  # type: ignore[type-var]
    high = max(max(v.score for v in verdicts), *contents)  # type: ignore[type-var]
    statuses = {v.status for v in verdicts}
    if statuses == {SPAM} and low >= margins.spam:
        return True
    if statuses == {NOT_DETECTED} and high <= margins.ham:
        return False
    return None


class AutoLearner:
    """One per scanner worker: learns the confident verdicts of ``[smtpgw.antispam]`` into the site layer."""

    def __init__(self, antispam_section: object, bases_path: str) -> None:
        self.enabled = bool(getattr(antispam_section, "AutoLearn", False))
        self.margins = Margins.of(antispam_section)
        self.bases = bases_path
        self.site = site_file(bases_path)
        folder, name = os.path.split(self.site)
        self.journal = os.path.join(folder, f".{name}.autolearn")
        self.full_until = 0.0  # the hour's bound was reached: nothing is tried before this time

    def consider(self, raw: bytes, verdicts: list[SpamVerdict], dnsbl_listed: list[str]) -> str | None:
        """Learn ``raw`` when its verdicts are confident; "spam" or "ham" when learned, else None."""
        if not self.enabled or len(raw) > self.margins.max_bytes or self.margins.per_hour <= 0:
            return None
        is_spam = confident(verdicts, dnsbl_listed, self.margins)
        now = time.time()
        if is_spam is None or now < self.full_until:
            return None
        kind = "spam" if is_spam else "ham"
        try:
            return kind if self._learn(raw, is_spam, kind, now) else None
        except (DatabaseError, OSError, ValueError) as exc:
            log.error("auto-learning as %s into %s failed, message not learned: %s", kind, self.site, exc)
            return None

    def _learn(self, raw: bytes, is_spam: bool, kind: str, now: float) -> bool:
        tokens = training.message_tokens(raw)
        # The digest of what is learned: a copy that only differs in its trace fields (a Received
        # line of its own) is the same message.
        digest = hashlib.sha256("\n".join(sorted(tokens)).encode("utf-8", "surrogatepass")).hexdigest()
        with write_lock(self.site):
            recent = self._recent(now)
            if len(recent) >= self.margins.per_hour:
                self.full_until = float(recent[0].split(" ", 1)[0]) + WINDOW
                log.info("auto-learning paused until %s: %d messages learned in the last hour (AutoLearnRate)",
                         time.strftime("%H:%M:%S", time.localtime(self.full_until)), len(recent))
                return False
            if any(line.split(" ")[1:2] == [digest] for line in recent):
                return False
            training.learn_tokens(self.bases, [tokens], is_spam)
            recent.append(f"{now:.3f} {digest} {kind}")
            write_durably(self.journal, ("\n".join(recent) + "\n").encode("ascii"))
        return True

    def _recent(self, now: float) -> list[str]:
        """The journal's lines of the last hour, oldest first (a damaged line is dropped)."""
        try:
            with open(self.journal, encoding="ascii", errors="replace") as src:
                lines = src.read(1 << 20).splitlines()
        except FileNotFoundError:
            return []
        recent = []
        for line in lines:
            stamp = line.split(" ", 1)[0]
            try:
                if now - WINDOW < float(stamp) <= now + 60:
                    recent.append(line)
            except ValueError:
                continue
        return recent
