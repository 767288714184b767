"""Control directory commands (kmg-spec §4.4) and queue requests from the CLI.

Owns: polling ``ControlPath`` every ``ControlPollInterval`` seconds for the
reference's command files (``.c_stats``, ``.c_recv_on``/``.c_recv_off``,
``.c_send_on``/``.c_send_off``, ``.c_avir_on``/``.c_avir_off``,
``.c_db_reload``, and, our own, ``.c_memory``: a memory report, ``.c_digest``: the quarantine
digest now), executing each and deleting it; and answering queue
requests (``.q_<nonce>`` JSON files written by ``smtpgw.py queue ...``) with an
answer file ``.a_<nonce>``, so that only the gateway changes queue states; and
learning files, our own: a message (or mbox) dropped as ``.l_ham_NAME`` or
``.l_spam_NAME`` is learned into the site spam database (``spam learn``) in an
I/O thread, then deleted, and the log says what was learned or why not.

Must never: execute a file twice (it is deleted before the command runs), act
on a request it cannot parse (it answers with an error instead), or block the
event loop on a control file: a command file is never read, a request is read
only when it is a regular file of at most ``MAX_REQUEST`` bytes (opened without
following a link and without waiting, so a FIFO put there cannot stall it).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import stat
from typing import Callable, Protocol

from smtpgw.config import Config
from smtpgw.net.loop import EventLoop
from smtpgw.spam.database import DatabaseError, site_file
from smtpgw.spam.spamfilter import default_bases
from smtpgw.spam.training import learn_files
from smtpgw.spool.durable import write_durably
from smtpgw.spool.ops import BAD_ARGS, DONE, NOT_PERFORMED, SYSTEM_ERROR, locate, remove_request
from smtpgw.spool.queue import STATES, Committer, Queue
from smtpgw.stats import Stats

log = logging.getLogger("smtpgw.app.control")

# A request is one JSON object: an operation and a queue ID, or a release with its recipients
# (MaximalRecipients addresses of at most 256 octets, RFC 5321 §4.5.3.1.3). Larger is not ours.
MAX_REQUEST = 1024 * 1024
LEARN_PREFIXES = (".l_ham_", ".l_spam_")  # learning files: ``spam learn --ham|--spam`` of the file
MAX_LEARN_BYTES = 64 * 1024 * 1024  # a learning file larger than this is refused (and removed)


class Operations(Protocol):
    """What the control directory needs from the running gateway: its configuration, loop, spool,
    counters and I/O threads, and the operations its files ask for (each carried out by the stage
    that owns it; control only names them)."""

    cfg: Config
    loop: EventLoop
    queue: Queue
    stats: Stats
    committer: Committer

    def switch(self, what: str, on: bool) -> None:
        """``receiving``, ``sending`` or ``scanning`` on or off (``.c_recv_on`` ...)."""

    def reload_databases(self) -> None:
        """``.c_db_reload``."""

    def send_digest_now(self) -> None:
        """``.c_digest``."""

    def dump_memory(self) -> None:
        """``.c_memory``."""

    def remove_queued(self, qid: str, state: str) -> str | None:
        """``queue remove``: the message out of its stage and the spool; or why it is not (it
        moved on meanwhile)."""

    def send_all(self) -> int:
        """``queue send-all``: how many messages were scheduled."""

    def send_now(self, qid: str, state: str) -> None:
        """``queue send ID``: ahead of the queue, in the stage its state names."""

    def release(self, path: str, sender: str, recipients: list[str], check: bool) -> str:
        """``store release``: the message file into the queue; its new queue ID."""


class Control:
    def __init__(self, ops: Operations) -> None:
        self.ops = ops
        self.timer = None
        self.ignored: set[str] = set()  # names of control entries already reported as not regular files
        self.learning: set[str] = set()  # learning files handed to an I/O thread, not yet done
        self.commands: dict[str, Callable[[], None]] = {
            ".c_stats": self.dump_stats,
            ".c_recv_on": lambda: self._switch("receiving", True),
            ".c_recv_off": lambda: self._switch("receiving", False),
            ".c_send_on": lambda: self._switch("sending", True),
            ".c_send_off": lambda: self._switch("sending", False),
            ".c_avir_on": lambda: self._switch("scanning", True),
            ".c_avir_off": lambda: self._switch("scanning", False),
            ".c_db_reload": lambda: self.ops.reload_databases(),
            ".c_digest": lambda: self.ops.send_digest_now(),  # not in the reference: see smtpgw/reports/digest.py
            ".c_memory": lambda: self.ops.dump_memory(),  # not in the reference: see smtpgw/app/memory.py
        }

    @property
    def folder(self) -> str:
        return self.ops.cfg.path.ControlPath

    def start(self) -> None:
        os.makedirs(self.folder, mode=0o750, exist_ok=True)
        self.poll()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def poll(self) -> None:
        try:
            names = sorted(os.listdir(self.folder))
        except OSError as exc:
            log.error("cannot read control directory %s: %s", self.folder, exc)
            names = []
        self.ignored.intersection_update(names)  # one taken away and made again is reported again
        try:
            for name in names:
                path = os.path.join(self.folder, name)
                if (name in self.commands or name.startswith((".q_", *LEARN_PREFIXES))) and not self._regular(path, name):
                    continue
                try:
                    if name in self.commands:
                        self._remove(path)
                        log.info("control command %s", name)
                        self.commands[name]()
                    elif name.startswith(".q_"):
                        self._request(path, name[3:])
                    elif name.startswith(LEARN_PREFIXES) and name not in self.learning:
                        self._learn(path, name)
                except Exception:  # one bad command must not stop the others, now or later
                    log.exception("control file %s failed", name)
                    if name.startswith(".q_"):
                        self._answer(path, name[3:], SYSTEM_ERROR, "the gateway could not carry this out; see its log")
        finally:
            self.timer = self.ops.loop.call_later(self.ops.cfg.options.ControlPollInterval, self.poll)

    def _regular(self, path: str, name: str) -> bool:
        """Only a regular file (not a symlink) is a command or a request: a directory cannot
        be deleted once acted on, and a link would read a file outside ControlPath. Anything
        else is reported once and left alone, and the poll goes on with the other names."""
        regular = _is_regular(path)
        if regular:
            self.ignored.discard(name)
        elif name not in self.ignored:
            self.ignored.add(name)
            log.error("control entry %s ignored: not a regular file; remove it", name)
        return regular

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _learn(self, path: str, name: str) -> None:
        """A learning file goes to an I/O thread (the shipped database is read there); the name is
        held until it is done, so a poll meanwhile does not hand it over twice."""
        self.learning.add(name)
        bases = self.ops.cfg.base.BasesPath or default_bases()

        def done(_result: None, error: BaseException | None) -> None:
            self.learning.discard(name)
            if error is not None:
                log.error("control learning file %s not learned: %s", name, error)

        self.ops.committer.call(functools.partial(learn_file, bases, path, name.startswith(".l_spam_")), done,
                                alone=True)

    def _switch(self, what: str, on: bool) -> None:
        self.ops.switch(what, on)
        log.info("%s %s", what, "on" if on else "off")

    def dump_stats(self) -> None:
        ops = self.ops
        ops.stats.set("mta_stored_messages_current", sum(len(ops.queue.ids(s)) for s in STATES))
        try:
            ops.stats.dump(ops.cfg.options.StatFilename)
        except OSError as exc:
            log.error("cannot write statistics to %s: %s", ops.cfg.options.StatFilename, exc)

    # -- queue requests -----------------------------------------------------------
    def _request(self, path: str, nonce: str) -> None:
        try:
            request = json.loads(read_request(path))
            op = request["op"]
            qid = request.get("id")
        except RequestTooLarge as exc:
            log.error("control request .q_%s refused and removed: %s", nonce, exc)
            self._answer(path, nonce, BAD_ARGS, f"request refused: {exc}")
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            self._answer(path, nonce, BAD_ARGS, f"unreadable request: {exc}")
            return
        if op == "release":
            code, output = self.release(request)
        else:
            code, output = self.handle(op, qid)
        self._answer(path, nonce, code, output)

    def _answer(self, path: str, nonce: str, code: int, output: str) -> None:
        self._remove(path)
        answer = os.path.join(self.folder, f".a_{nonce}")
        try:
            write_durably(answer, json.dumps({"code": code, "output": output}).encode())
        except OSError as exc:
            log.error("cannot answer queue request %s: %s", nonce, exc)

    def handle(self, op: str, qid: str | None) -> tuple[int, str]:
        """One queue operation, as the gateway owner of queue states performs it."""
        ops = self.ops
        queue = ops.queue
        if op == "send-all":
            count = ops.send_all()
            return DONE, f"{count} message(s) scheduled for immediate delivery"
        if op in ("remove", "remove-all"):
            return remove_request(queue, op, qid, ops.remove_queued)
        state, code, why = locate(queue, qid)
        if state is None:
            return code, why
        assert isinstance(qid, str)
        if op == "send":
            ops.send_now(qid, state)
            return DONE, f"{qid}: scheduled ahead of the queue"
        return BAD_ARGS, f"unknown operation {op!r}"

    def release(self, request: dict) -> tuple[int, str]:
        """``store release``: a stored message goes back into the queue, scanned again or not."""
        try:
            message = os.path.join(self.folder, os.path.basename(str(request["message"])))
            sender = str(request["sender"])
            recipients = [str(r) for r in request["recipients"]]
            check = bool(request.get("check", True))
        except (KeyError, TypeError) as exc:
            return BAD_ARGS, f"bad release request: {exc}"
        if not recipients or not _is_regular(message):  # a link could name any file the gateway can read
            return NOT_PERFORMED, "nothing to release"
        qid = self.ops.release(message, sender, recipients, check)
        os.unlink(message)
        return DONE, f"released as {qid}" + ("" if check else " (without checks)")


class RequestTooLarge(ValueError):
    """A request file larger than any request the command line writes."""


def read_request(path: str, limit: int = MAX_REQUEST) -> bytes:
    """The bytes of the request file ``path``: at most ``limit`` of them are ever read.

    Opened without following a symlink (O_NOFOLLOW) and without waiting (O_NONBLOCK: a FIFO
    or device swapped in after the listing must not block the loop), then checked on the
    open descriptor: it must be a regular file no larger than ``limit``."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{os.path.basename(path)} is not a regular file")
        if info.st_size > limit:
            raise RequestTooLarge(f"{info.st_size} bytes, more than {limit}")
        data = os.read(fd, limit + 1)  # one read: a regular file is read at once, and never blocks
        if len(data) > limit:  # grown since fstat
            raise RequestTooLarge(f"more than {limit} bytes")
        return data
    finally:
        os.close(fd)


def _is_regular(path: str) -> bool:
    """``path`` is a regular file itself (a symlink is not followed)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:  # gone since the listing, or unreachable
        return False


def learn_file(bases: str, path: str, is_spam: bool) -> None:
    """Learn one learning file into the site layer of ``bases`` and delete it, learned or not
    (a file that cannot be learned is reported once, not tried at every poll)."""
    name, kind = os.path.basename(path), "spam" if is_spam else "ham"
    try:
        size = os.stat(path).st_size
        if size > MAX_LEARN_BYTES:
            log.error("control learning file %s refused and removed: %d bytes, more than %d", name, size, MAX_LEARN_BYTES)
        else:
            count = learn_files(bases, [path], is_spam)
            log.info("control learning file %s: learned %d %s message(s) into %s", name, count, kind, site_file(bases))
    except (DatabaseError, OSError, ValueError) as exc:
        log.error("control learning file %s not learned as %s, removed: %s", name, kind, exc)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
