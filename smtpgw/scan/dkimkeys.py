"""The DKIM keys of one message, looked up on the event loop before its scan.

Owns: reading the key names of a queued message's DKIM signatures (``smtpgw.mail.dkim.key_names``:
the first ``MAX_SIGNATURES``, from the first 64 KB of the message), asking the gateway's resolver
for their TXT records (RFC 6376 §3.6.2.2) at once, and handing the answers, as
``smtpgw.mail.dkim.KeyAnswers``, to a callback exactly once: when all are in, or at the deadline
(an unanswered name is then a temporary failure of the DNS when its question was out to a
nameserver, and "not looked up" when it still waited behind this gateway's own queries: a flood of
the gateway must not turn forged signatures into temperrors, which the signs count as read).
And the negative cache of the key names whose lookup failed (``FailedKeys``): a SERVFAIL, a timeout
of the resolver or of the lookup's deadline is the answer for that name during ``FAILED_TTL``
seconds (RFC 2308 §7: a server failure or a dead server may be cached, 5 minutes at most), so that
each message signed with a selector whose DNS is broken does not ask again and wait for it. An
NXDOMAIN or NODATA is cached by the resolver itself for its SOA's negative TTL (RFC 2308 §5).

Must never: block the loop (one bounded read of the message head, queries through the resolver),
call back more than once or after ``cancel``, or turn a lookup failure into anything but an
answer that says so (the verification makes it a temperror; the message is never deferred for
it); remember a failure of this gateway's own resolver ("local: ...": its load, not their DNS)
or any failure longer than ``FAILED_TTL``, or more than ``FAILED_SIZE`` names.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from smtpgw.mail import dkim
from smtpgw.net.dns import ERROR_BAD_NAME, ERROR_CLOSED, ERROR_OVERLOADED, TXT, Answer, Lookup, Resolver
from smtpgw.net.loop import EventLoop
from smtpgw.spool.durable import read_file

log = logging.getLogger("smtpgw.scan.dkimkeys")

MAX_RECORDS = 4  # TXT records kept per key name
MAX_RECORD = 4096  # characters kept of one

FAILED_TTL = 60.0  # seconds a failed key lookup is answered from FailedKeys (RFC 2308 §7: at most 300)
FAILED_SIZE = 1024  # key names FailedKeys remembers (the oldest forgotten first)

KeysCallback = Callable[[dict[str, dict[str, Any]]], None]


def key_answer(answer: Answer) -> dict[str, Any]:
    """One resolver answer as the verification reads it: the TXT strings, or why there are none —
    "nxdomain"/"nodata" (no key), "bad-name" (no name to ask: permerrors), "temp: ..." (no answer
    now: a temperror), "local: ..." (our resolver asked nobody: neutral)."""
    if answer.error == ERROR_BAD_NAME:
        return {"error": "bad-name"}  # the signature names no domain: a permerror, not the DNS's failure
    if answer.error in (ERROR_OVERLOADED, ERROR_CLOSED):
        # a temperror of the brand's own DNS counts as the signature read (modernsigns); one a flood
        # of this gateway's resolver can cause must not, or forged signatures would count under load
        return {"error": f"local: {answer.error}"}
    if answer.error is not None:
        return {"error": f"temp: {answer.error}"}
    if answer.nxdomain:
        return {"error": "nxdomain"}
    if not answer.records:
        return {"error": "nodata"}
    return {"txt": [str(record)[:MAX_RECORD] for record in answer.records[:MAX_RECORDS]]}


class FailedKeys:
    """Key names whose lookup failed lately (a temporary failure of their DNS), with that answer
    until it is ``ttl`` seconds old: a negative cache, bounded to ``size`` names."""

    def __init__(self, loop: EventLoop, ttl: float = FAILED_TTL, size: int = FAILED_SIZE) -> None:
        self.loop = loop
        self.ttl = ttl
        self.size = size
        self.entries: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    def get(self, name: str) -> dict[str, Any] | None:
        entry = self.entries.get(name)
        if entry is None:
            return None
        if entry[0] <= self.loop.time():
            del self.entries[name]
            return None
        return entry[1]

    def remember(self, name: str, answer: dict[str, Any]) -> None:
        """Keep ``answer`` when it says the DNS failed ("temp: ..."): no answer of ours ("local:"),
        no key ("nxdomain", "nodata": the resolver's negative cache) and no key found are kept."""
        if not str(answer.get("error", "")).startswith("temp:"):
            return
        self.entries[name] = (self.loop.time() + self.ttl, answer)
        self.entries.move_to_end(name)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


class KeyFetch:
    """The lookups of the keys ``names``; ``done(answers)`` runs once, on the loop. A name in
    ``failed`` is answered from it without a query (and a new failure goes into it)."""

    def __init__(self, loop: EventLoop, resolver: Resolver, names: list[str], timeout: float,
                 done: KeysCallback, failed: FailedKeys | None = None) -> None:
        self.names = names
        self.resolver = resolver
        self.done = done
        self.failed = failed
        self.answers: dict[str, dict[str, Any]] = {}
        self.finished = False
        for name in names:
            known = failed.get(name) if failed is not None else None
            if known is not None:
                self.answers[name] = known
        # the resolver calls back later on the loop, never from inside query
        self.lookups: list[Lookup] = [
            resolver.query(name, TXT, lambda answer, name=name: self._answered(name, answer))
            for name in names if name not in self.answers]
        self.timer = loop.call_later(0 if not self.lookups else timeout, self._finish)

    def _answered(self, name: str, answer: Answer) -> None:
        self._answer(name, key_answer(answer))
        if len(self.answers) == len(self.names):
            self._finish()

    def _answer(self, name: str, answer: dict[str, Any]) -> None:
        self.answers[name] = answer
        if self.failed is not None:
            self.failed.remember(name, answer)

    def _finish(self) -> None:
        if self.finished:
            return
        for name in self.names:  # a question still queued behind others is our load, not their DNS
            if name not in self.answers:
                asked = self.resolver.asking(name, TXT)
                self._answer(name, {"error": "temp: lookup timeout" if asked else "local: lookup not sent in time"})
        self.cancel()
        self.done(self.answers)

    def cancel(self) -> None:
        """No callback after this."""
        self.finished = True
        self.timer.cancel()
        for lookup in self.lookups:
            lookup.cancel()


def fetch_keys(loop: EventLoop, resolver: Resolver, message_path: str, timeout: float,
               done: KeysCallback, failed: FailedKeys | None = None) -> KeyFetch | None:
    """Start the key lookups of the message at ``message_path`` (those in ``failed`` answered from
    it); None when it has no signature to verify (or cannot be read now: the worker reading it
    says so), and ``done`` is not called."""
    try:
        head = read_file(message_path, dkim.KEY_HEAD)  # one read: the header's first KEY_HEAD bytes
    except OSError as exc:
        log.warning("cannot read %s for its DKIM keys: %s", message_path, exc)
        return None
    names = dkim.key_names(head)
    if not names:
        return None
    return KeyFetch(loop, resolver, names, timeout, done, failed)
