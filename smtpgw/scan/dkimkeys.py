"""The DKIM keys of one message, looked up on the event loop before its scan.

Owns: reading the key names of a queued message's DKIM signatures (``smtpgw.mail.dkim.key_names``:
the first ``MAX_SIGNATURES``, from the first 64 KB of the message), asking the gateway's resolver
for their TXT records (RFC 6376 §3.6.2.2) at once, and handing the answers, as
``smtpgw.mail.dkim.KeyAnswers``, to a callback exactly once: when all are in, or at the deadline
(an unanswered name is then a temporary failure of the DNS when its question was out to a
nameserver, and "not looked up" when it still waited behind this gateway's own queries: a flood of
the gateway must not turn forged signatures into temperrors, which the signs count as read).

Must never: block the loop (one bounded read of the message head, queries through the resolver),
call back more than once or after ``cancel``, or turn a lookup failure into anything but an
answer that says so (the verification makes it a temperror; the message is never deferred for
it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from smtpgw.mail import dkim
from smtpgw.net.dns import ERROR_BAD_NAME, ERROR_CLOSED, ERROR_OVERLOADED, TXT, Answer, Lookup, Resolver
from smtpgw.net.loop import EventLoop

log = logging.getLogger("smtpgw.scan.dkimkeys")

MAX_RECORDS = 4  # TXT records kept per key name
MAX_RECORD = 4096  # characters kept of one

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


class KeyFetch:
    """The lookups of the keys ``names``; ``done(answers)`` runs once, on the loop."""

    def __init__(self, loop: EventLoop, resolver: Resolver, names: list[str], timeout: float,
                 done: KeysCallback) -> None:
        self.names = names
        self.resolver = resolver
        self.done = done
        self.answers: dict[str, dict[str, Any]] = {}
        self.finished = False
        # the resolver calls back later on the loop, never from inside query
        self.lookups: list[Lookup] = [
            resolver.query(name, TXT, lambda answer, name=name: self._answered(name, answer)) for name in names]
        self.timer = loop.call_later(timeout, self._finish)

    def _answered(self, name: str, answer: Answer) -> None:
        self.answers[name] = key_answer(answer)
        if len(self.answers) == len(self.names):
            self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        for name in self.names:  # a question still queued behind others is our load, not their DNS
            why = "temp: lookup timeout" if self.resolver.asking(name, TXT) else "local: lookup not sent in time"
            self.answers.setdefault(name, {"error": why})
        self.cancel()
        self.done(self.answers)

    def cancel(self) -> None:
        """No callback after this."""
        self.finished = True
        self.timer.cancel()
        for lookup in self.lookups:
            lookup.cancel()


def read_head(path: str, size: int) -> bytes:
    """The first ``size`` bytes of a file: one read, without a buffered file object's fstat,
    ioctl and lseek (a regular file is read whole up to ``size`` unless it ends first)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def fetch_keys(loop: EventLoop, resolver: Resolver, message_path: str, timeout: float,
               done: KeysCallback) -> KeyFetch | None:
    """Start the key lookups of the message at ``message_path``; None when it has no signature to
    verify (or cannot be read now: the worker reading it says so), and ``done`` is not called."""
    try:
        head = read_head(message_path, dkim.KEY_HEAD)
    except OSError as exc:
        log.warning("cannot read %s for its DKIM keys: %s", message_path, exc)
        return None
    names = dkim.key_names(head)
    if not names:
        return None
    return KeyFetch(loop, resolver, names, timeout, done)
