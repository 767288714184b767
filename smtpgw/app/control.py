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

import json
import logging
import os
import stat
from typing import TYPE_CHECKING, Callable

from smtpgw.app import memory
from smtpgw.spam.database import DatabaseError, site_file
from smtpgw.spam.spamfilter import default_bases
from smtpgw.spam.training import learn_files
from smtpgw.spool.durable import write_durably
from smtpgw.spool.queue import CHK, QUE, STAGED, STATES, WFC, WFS

if TYPE_CHECKING:
    from smtpgw.app.gateway import Gateway
    from smtpgw.spool.queue import Queue

log = logging.getLogger("smtpgw.app.control")

# kmg-spec §4.6 allows WFC, WFS and QUE; this project adds CHK (``queue remove ID`` only): a
# message whose scan hangs can be taken out without stopping the gateway, and the result of
# its scan is discarded when it comes back. SPL and SND are short steps the gateway finishes.
REMOVABLE = (WFC, CHK, WFS, QUE)
REMOVED_BY_ALL = (WFC, WFS, QUE)  # ``queue remove-all``: what is not being processed
# A request is one JSON object: an operation and a queue ID, or a release with its recipients
# (MaximalRecipients addresses of at most 256 octets, RFC 5321 §4.5.3.1.3). Larger is not ours.
MAX_REQUEST = 1024 * 1024
LEARN_PREFIXES = (".l_ham_", ".l_spam_")  # learning files: ``spam learn --ham|--spam`` of the file
MAX_LEARN_BYTES = 64 * 1024 * 1024  # a learning file larger than this is refused (and removed)
# klmailq / klmaila return codes (kmg-spec §4.7)
DONE, BAD_ARGS, UNREADABLE, SYSTEM_ERROR, NOT_PERFORMED = 0, 1, 2, 3, 4


class Control:
    def __init__(self, gateway: "Gateway") -> None:
        self.gw = gateway
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
            ".c_db_reload": self.gw.reload_databases,
            ".c_digest": lambda: self.gw.digest.send_now(),  # not in the reference: see smtpgw/reports/digest.py
            ".c_memory": lambda: memory.dump(self.gw),  # not in the reference: see smtpgw/app/memory.py
        }

    @property
    def folder(self) -> str:
        return self.gw.cfg.path.ControlPath

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
            self.timer = self.gw.loop.call_later(self.gw.cfg.options.ControlPollInterval, self.poll)

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
        bases = self.gw.cfg.base.BasesPath or default_bases()
        future = self.gw.committer.pool.submit(learn_file, bases, path, name.startswith(".l_spam_"))

        def done(_future: object) -> None:
            self.learning.discard(name)

        future.add_done_callback(lambda f: self.gw.loop.call_soon_threadsafe(done, f))

    def _switch(self, what: str, on: bool) -> None:
        gw = self.gw
        if what == "receiving":
            gw.receiving = on
        elif what == "sending":
            gw.sender.enabled = on
            if on:
                gw.sender.kick()
        else:
            gw.scanner.enabled = on
            if on:
                gw.scanner.pump()
        log.info("%s %s", what, "on" if on else "off")

    def dump_stats(self) -> None:
        gw = self.gw
        gw.stats.set("mta_stored_messages_current", sum(len(gw.queue.ids(s)) for s in STATES))
        try:
            gw.stats.dump(gw.cfg.options.StatFilename)
        except OSError as exc:
            log.error("cannot write statistics to %s: %s", gw.cfg.options.StatFilename, exc)

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
        gw = self.gw
        queue = gw.queue
        if op == "send-all":
            count = gw.sender.send_all() + gw.scanner.rescan_all()
            return DONE, f"{count} message(s) scheduled for immediate delivery"
        if op in ("remove", "remove-all"):
            return remove_request(queue, op, qid, gw.remove_queued)
        state, code, why = locate(queue, qid)
        if state is None:
            return code, why
        assert isinstance(qid, str)
        if op == "send":
            if state == QUE:
                gw.sender.send_now(qid)
            elif state in (WFC, WFS):
                gw.scanner.prioritise(qid)
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
        qid = self.gw.inject(message, sender, recipients, check)
        os.unlink(message)
        return DONE, f"released as {qid}" + ("" if check else " (without checks)")


def locate(queue: Queue, qid: object) -> tuple[str | None, int, str]:
    """(state, DONE, "") of the record ``qid``, or (None, code, why): ``qid`` must be a plain
    queue ID, never a path or a hidden name (``../msg``, ``.lock``), and name a record."""
    if not isinstance(qid, str) or not qid or "/" in qid or "\0" in qid or qid.startswith("."):
        return None, BAD_ARGS, "a queue ID is needed"
    state = queue.find(qid)
    if state is None:
        return None, NOT_PERFORMED, f"{qid}: no such message in the queue"
    return state, DONE, ""


def removal_refused(qid: str, state: str) -> str | None:
    """Why the record ``qid`` in ``state`` cannot be removed (kmg-spec §4.6), or None."""
    if state in REMOVABLE:
        return None
    return f"{qid}: is {state} (being processed); only {', '.join(REMOVABLE)} can be removed"


def remove_request(queue: Queue, op: str, qid: object, remove: Callable[[str, str], None]) -> tuple[int, str]:
    """``queue remove ID`` and ``queue remove-all``, the same for the running gateway (``remove``
    is ``Gateway.remove_queued``) and with none running (``remove_record`` under the queue's lock)."""
    if op == "remove-all":
        removed = 0
        for state in REMOVED_BY_ALL:
            for item in queue.ids(state):
                remove(item, state)
                removed += 1
        return DONE, f"{removed} message(s) removed"
    state, code, why = locate(queue, qid)
    if state is None:
        return code, why
    assert isinstance(qid, str)
    refused = removal_refused(qid, state)
    if refused:
        return NOT_PERFORMED, refused
    remove(qid, state)
    return DONE, f"{qid}: removed"


def remove_record(queue: Queue, qid: str, state: str) -> None:
    """Take a message out of the spool: its record and message, and for one in CHK what a
    scan result cut short by a crash left of it (the staged rewrite, per-group copies in QUE
    that recovery would otherwise remove only while the message is still in CHK)."""
    queue.remove(qid, state)
    if state != CHK:
        return
    try:
        os.unlink(queue.msg_path(qid) + STAGED)
    except FileNotFoundError:
        pass
    for copy in queue.ids(QUE):
        if copy.rpartition("-")[0] == qid:
            env = queue.load(QUE, copy)
            if env is not None and env.srcid == qid:
                queue.remove(copy, QUE)


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
