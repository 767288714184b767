"""Usage quotas: the reference's licence limits as limits the administrator sets.

The reference is licensed by the number of protected users or by the mail traffic processed per
day, and tells the administrator when a limit is near or passed (guide §1.2; kmg-spec §6.2). Here
both are ``[smtpgw.quota]`` keys: ``MaximalProtectedRecipients`` (distinct recipients in
ProtectedDomains seen in a day) and ``MaximalDailyTraffic`` (MB of mail received in a day), with
``WarningThreshold`` (percent) and ``QuotaAction`` (notify, the default, or defer).

Owns: the day's counts (the protected recipients in a set of at most MaximalProtectedRecipients
addresses, beyond which only "over" matters; the bytes received), their file
``QueuePath/quota.state`` (written with the statistics, at each threshold and at stop; read back
at start when it is of the same day), the period's end at local midnight, the thresholds
(WarningThreshold %, 100 %) each logged as a ``QUOTA`` line and mailed to the policy's
AdminNotifyAddress once per day (a built-in notice, as the reference's licence notices are), and
with QuotaAction=defer the temporary replies the receiver gives.

Must never: refuse mail unless QuotaAction=defer; refuse it permanently (a quota is lifted at
midnight, so only 4xx); refuse mail to the postmaster; hold more addresses than the limit; let
an older snapshot of the counts overwrite a newer one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import date
from typing import Any, Callable, Iterable

from smtpgw import PRODUCT, __version__
from smtpgw.log import event
from smtpgw.net import smtp
from smtpgw.rules import routing
from smtpgw.spool.durable import write_durably
from smtpgw.spool.queue import QUE, new_id, Envelope, Queue, Recipient

log = logging.getLogger("smtpgw")

STATE_NAME = "quota.state"
MAX_STATE_BYTES = 64 << 20
MB = 1024 * 1024
RECIPIENTS, TRAFFIC = "recipients", "traffic"

# RFC 3463 §3.6 X.5.3 "too many recipients" (RFC 5321 §4.5.3.1.10: 452, the client retries the
# recipient later), as Postfix answers a recipient over its limits; RFC 3463 §3.8 X.7.1 "delivery
# not authorized, message refused" with 451 at end of data (RFC 5321 §4.3.2): policy, for now.
RECIPIENTS_REACHED = smtp.R(452, "4.5.3", "<{}>: daily quota of protected recipients reached, try again later")
TRAFFIC_REACHED = smtp.R(451, "4.7.1", "Daily quota of mail traffic reached, try again later")


def local_day() -> str:
    """Today in local time: the period ends at local midnight."""
    return date.today().isoformat()


@dataclass(frozen=True)
class Crossing:
    """A threshold passed: ``quota`` (recipients or traffic), ``threshold`` percent, use and limit."""

    day: str
    quota: str
    threshold: int
    used: int
    limit: int


class Quota:
    def __init__(self, queue_path: str, today: Callable[[], str] = local_day) -> None:
        self.path = os.path.join(queue_path, STATE_NAME)
        self._today = today
        self.day = today()
        self._reset()
        self._seq = 0  # snapshots taken
        self._written = 0  # the newest snapshot written
        self._lock = threading.Lock()

    def _reset(self) -> None:
        self.recipients: set[str] = set()
        self.over = False  # a protected recipient beyond the limit was seen
        self.bytes = 0
        self.notified: set[str] = set()  # "quota:threshold" mailed this period
        self.dirty = True

    # -- the period -----------------------------------------------------------------------
    def _roll(self) -> None:
        """At the first use after local midnight: log the day that ended and start again."""
        today = self._today()
        if today == self.day:
            return
        event("", "QUOTA, day=%s, period=ended, recipients=%d%s, traffic=%d", self.day, len(self.recipients),
              "+" if self.over else "", self.bytes)
        self.day = today
        self._reset()

    # -- what the receiver asks -----------------------------------------------------------
    def refuse_recipient(self, cfg: Any, address: str, client_ip: str, accepted: Iterable[str] = ()) -> smtp.Reply | None:
        """With QuotaAction=defer: the 452 for a protected recipient not yet seen today once the
        day's limit is reached, counting the new ones the transaction ``accepted`` already (other
        sessions' transactions in flight are not known: they may pass the limit by as many);
        None otherwise."""
        limit = cfg.quota.MaximalProtectedRecipients
        if cfg.quota.QuotaAction != "defer" or not limit:
            return None
        self._roll()
        key = address.lower()
        protected = cfg.network.ProtectedDomains
        if key in self.recipients or not routing.is_protected(protected, key):
            return None
        pending = {a.lower() for a in accepted} - self.recipients
        used = len(self.recipients) + sum(routing.is_protected(protected, a) for a in pending)
        if key in pending or used < limit:
            return None
        if key == cfg.network.Postmaster.lower():  # RFC 5321 §4.5.1: mail to the postmaster is accepted
            return None
        event("", "QUOTA, quota=%s, action=defer, client=[%s], rcpt=<%s>, used=%d, limit=%d", RECIPIENTS, client_ip,
              address, used, limit, level=logging.WARNING)
        return RECIPIENTS_REACHED.format(address)

    def refuse_message(self, cfg: Any, size: int, client_ip: str) -> smtp.Reply | None:
        """With QuotaAction=defer: the 451 at end of data once the day's traffic reached its limit."""
        limit = cfg.quota.MaximalDailyTraffic * MB
        if cfg.quota.QuotaAction != "defer" or not limit:
            return None
        self._roll()
        if self.bytes < limit:
            return None
        event("", "QUOTA, quota=%s, action=defer, client=[%s], size=%d, used=%d, limit=%d", TRAFFIC, client_ip, size,
              self.bytes, limit, level=logging.WARNING)
        return TRAFFIC_REACHED

    # -- counting -------------------------------------------------------------------------
    def count(self, cfg: Any, recipients: Iterable[str], size: int) -> list[Crossing]:
        """A message committed to the queue: its protected recipients and size are counted; the
        thresholds passed for the first time today are returned (the highest per quota)."""
        self._roll()
        section = cfg.quota
        limit = section.MaximalProtectedRecipients
        if limit:
            for address in recipients:
                key = address.lower()
                if key in self.recipients or not routing.is_protected(cfg.network.ProtectedDomains, key):
                    continue
                if len(self.recipients) < limit:
                    self.recipients.add(key)
                else:
                    self.over = True
        self.bytes += size
        self.dirty = True
        crossings = [self._crossed(RECIPIENTS, len(self.recipients) + self.over, limit, section.WarningThreshold),
                     self._crossed(TRAFFIC, self.bytes, section.MaximalDailyTraffic * MB, section.WarningThreshold)]
        return [c for c in crossings if c is not None]

    def _crossed(self, quota: str, used: int, limit: int, warning: int) -> Crossing | None:
        if not limit:
            return None
        thresholds = [t for t in (warning, 100) if 0 < t <= 100 and used * 100 >= t * limit]
        new = [t for t in thresholds if f"{quota}:{t}" not in self.notified]
        if not new:
            return None
        self.notified.update(f"{quota}:{t}" for t in thresholds)
        return Crossing(self.day, quota, max(new), used, limit)

    # -- the state file ---------------------------------------------------------------------
    def snapshot(self) -> tuple[int, bytes] | None:
        """The counts to write (in any thread, by ``write``), or None when nothing changed."""
        if not self.dirty:
            return None
        self.dirty = False
        self._seq += 1
        state = {"day": self.day, "recipients": sorted(self.recipients), "over": self.over, "bytes": self.bytes,
                 "notified": sorted(self.notified)}
        return self._seq, json.dumps(state).encode()

    def write(self, snapshot: tuple[int, bytes]) -> None:
        """Write a snapshot durably unless a newer one was written already. Raises OSError."""
        seq, data = snapshot
        with self._lock:
            if seq > self._written:
                write_durably(self.path, data)
                self._written = seq

    def save(self) -> None:
        """Write the counts now (at a threshold and at stop); a failure is logged."""
        snapshot = self.snapshot()
        if snapshot is None:
            return
        try:
            self.write(snapshot)
        except OSError as exc:
            self.dirty = True
            log.error("cannot save the quota counts to %s: %s", self.path, exc)

    def restore(self, limit: int) -> None:
        """The counts saved today (at most ``limit`` recipients kept); another day's are left."""
        try:
            with open(self.path, "rb") as f:
                state = json.loads(f.read(MAX_STATE_BYTES))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("quota counts in %s unreadable, counting from zero: %s", self.path, exc)
            return
        if not isinstance(state, dict) or state.get("day") != self.day:
            return
        addresses = [a for a in state.get("recipients", []) if isinstance(a, str)]
        self.recipients = set(addresses[:limit])
        self.over = bool(state.get("over")) or len(addresses) > limit
        self.bytes = int(state.get("bytes", 0)) if str(state.get("bytes", 0)).isdigit() else 0
        self.notified = {n for n in state.get("notified", []) if isinstance(n, str)}
        self.dirty = False


# --- the notice ------------------------------------------------------------------------------

_NAMES = {RECIPIENTS: "protected recipients (distinct addresses in ProtectedDomains)",
          TRAFFIC: "mail traffic (size of the messages received)"}
_DEFERRED = {RECIPIENTS: f"mail to protected recipients not yet seen today is refused temporarily "
                         f"({RECIPIENTS_REACHED.code} {RECIPIENTS_REACHED.status})",
             TRAFFIC: f"new messages are refused temporarily ({TRAFFIC_REACHED.code} {TRAFFIC_REACHED.status})"}


def _amount(quota: str, value: int) -> str:
    return f"{value / MB:.1f} MB" if quota == TRAFFIC else str(value)


def notice_text(cfg: Any, crossing: Crossing) -> tuple[str, str]:
    """(Subject, body) of the admin notice about a threshold passed."""
    quota, reached = crossing.quota, crossing.threshold >= 100
    what = "protected recipients" if quota == RECIPIENTS else "mail traffic"
    subject = (f"Quota reached: {what} at 100% of the daily limit" if reached
               else f"Quota warning: {what} at {crossing.threshold}% of the daily limit")
    if reached and cfg.quota.QuotaAction == "defer":
        action = f"QuotaAction=defer: {_DEFERRED[quota]} until midnight."
    else:
        action = "QuotaAction=notify: mail is still accepted and scanned."
    used = "more than " + _amount(quota, crossing.limit) if quota == RECIPIENTS and crossing.used > crossing.limit \
        else _amount(quota, crossing.used)
    body = (
        f"The mail gateway {cfg.network.Hostname} passed a usage quota today ({crossing.day}).\n\n"
        f"  Quota:      {_NAMES[quota]}\n"
        f"  Used:       {used} of {_amount(quota, crossing.limit)}\n"
        f"  Threshold:  {crossing.threshold}%\n"
        f"  Action:     {action}\n\n"
        f"The counts start again at local midnight. This notice is sent once a day per threshold.\n"
        f"The limits are set in [smtpgw.quota] of {cfg.source}: MaximalProtectedRecipients,\n"
        f"MaximalDailyTraffic, WarningThreshold, QuotaAction.\n\n"
        f"-- \n{PRODUCT} {__version__}\n"
    )
    return subject, body


def notice(cfg: Any, crossing: Crossing, now: float | None = None) -> bytes:
    """The admin notice as a message from NotifyFromAddress to AdminNotifyAddress ([smtpgw.policy]).
    Raises ValueError for an address unfit for a header field."""
    from smtpgw.reports import notify  # here: only the main process sends it (an incoming process saves 0.5 MiB)

    subject, body = notice_text(cfg, crossing)
    return notify.compose_text(cfg.policy.NotifyFromAddress, [cfg.policy.AdminNotifyAddress], subject, body,
                               time.time() if now is None else now)


def queue_notice(counts: Quota, queue: Queue, cfg: Any, crossing: Crossing, srcid: str) -> Envelope | None:
    """A usage quota passed a threshold (while counting the message ``srcid``): the admin's notice
    queued in QUE (once a day per threshold, as ``count`` reports each crossing once), a ``QUOTA``
    line, the counts saved; the notice's record to hand to the Sender, or None when it could
    not be made (the QUOTA line says ``notice=none``)."""
    policy = cfg.policy
    notice_env = None
    try:
        data = notice(cfg, crossing)
        notice_env = Envelope(id=new_id(), sender=policy.NotifyFromAddress,
                              recipients=[Recipient(addr=policy.AdminNotifyAddress)], helo=cfg.network.Hostname,
                              received_at=time.time(), size=len(data), srcid=srcid)
        queue.add_message(notice_env, QUE, data=data)
    except (OSError, ValueError) as exc:
        log.error("%s: cannot queue the quota notice: %s", srcid, exc)
        notice_env = None
    event("", "QUOTA, quota=%s, day=%s, threshold=%d%%, used=%d, limit=%d, action=%s, notice=%s", crossing.quota,
          crossing.day, crossing.threshold, crossing.used, crossing.limit, cfg.quota.QuotaAction,
          notice_env.id if notice_env else "none", level=logging.WARNING)
    counts.save()  # after the notice: a crash between them repeats it, never loses it
    if notice_env is not None:
        event(notice_env.id, "NOTIFICATION, kind=quota, srcid=%s, to=%s", srcid, [policy.AdminNotifyAddress])
    return notice_env
