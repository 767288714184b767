"""The working queue: durable spool of received messages and their states.

Owns: the on-disk layout under ``QueuePath`` (see ARCHITECTURE.md), queue IDs,
envelope records, atomic state changes, and crash recovery at start-up.

Layout::

    tmp/ID             message bytes being received (never acknowledged), and finished
                       files kept empty to be written again (``Queue.recycle``)
    msg/ID             the message of record ID (written once, then immutable); a record may carry
                       a new header block (``head``) that replaces the file's up to ``body_offset``
    WFC/ID CHK/ID WFS/ID SPL/ID QUE/ID SND/ID     envelope records (JSON)
    corrupt/           records that could not be read, kept for the admin

A record is written temp → fsync → rename → fsync(dir) (`smtpgw.spool.durable`); a state change is one
rename(2) between state directories, so ``ls`` shows the queue and a crash
leaves each record in exactly one state (or, between a copy and an unlink, in
two: recovery keeps the more advanced one).

Must never: report a message as stored before its bytes and its record are on
stable storage; deliver a message whose record or file is incomplete; lose a
record it cannot parse (it goes to ``corrupt/``).
"""

from __future__ import annotations

import collections
import enum
import errno
import functools
import itertools
import json
import logging
import os
import random
import shutil
import time
import threading
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from smtpgw.spool.durable import GroupSync, fsync_dir, fsync_file, read_file, reopen, unlink_if_present, write_durably
from smtpgw.spool.iopool import IOPool

log = logging.getLogger("smtpgw.spool.queue")

# The reference's queue states (kmg-spec §4.6), in pipeline order.
WFC, CHK, WFS, SPL, QUE, SND = "WFC", "CHK", "WFS", "SPL", "QUE", "SND"
STATES = (WFC, CHK, WFS, SPL, QUE, SND)
# What a state left by a crash becomes on restart: work in progress is redone.
RECOVER_TO = {CHK: WFC, SPL: WFS, SND: QUE}
# msg/ID.staged: the new bytes of message ID, given their place once its record has moved on
# (see ``Queue.replace_and_move``); ``recover`` finishes or drops it.
STAGED = ".staged"
TMP_SUFFIX_CHARS = 6  # a tmp/ file is named after a new ID and this many random hex digits

_ID_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXZbcdfghjklmnpqrstvwxz"
_counter = itertools.count()
# The random parts of names (an ID's tag outside the gateway, a tmp/ file's suffix): they keep
# processes apart, they guard no secret, so a generator seeded once per process (from os.urandom)
# serves, without a system call per name.
_names = random.Random()
# The last character of an ID: the gateway's process index (``set_process``: 0 the main process,
# 1.. its incoming processes, IncomingProcesses) from the first half of the alphabet, so that
# processes with a counter of their own never make the same ID in the same microsecond; a random
# one from the second half in any other process (a command-line tool).
MAX_PROCESSES = len(_ID_ALPHABET) // 2
_process_tag: str | None = None


def process_tag(index: int) -> str:
    """The last character of the IDs process ``index`` makes (0 ≤ index < MAX_PROCESSES)."""
    if not 0 <= index < MAX_PROCESSES:
        raise ValueError(f"process index {index} out of range")
    return _ID_ALPHABET[index]


def set_process(index: int) -> None:
    """Make this process's IDs end in its index (``process_tag``)."""
    global _process_tag
    _process_tag = process_tag(index)


def new_id(now: float | None = None) -> str:
    """A queue ID: time-ordered (FIFO by name) and unique across restarts and processes."""
    micros = int((now if now is not None else time.time()) * 1_000_000)
    chars = []
    base = len(_ID_ALPHABET)
    while micros:
        micros, digit = divmod(micros, base)
        chars.append(_ID_ALPHABET[digit])
    suffix = next(_counter) % (base * base)
    chars.reverse()
    tag = _process_tag or _names.choice(_ID_ALPHABET[MAX_PROCESSES:])
    return "".join(chars) + _ID_ALPHABET[suffix // base] + _ID_ALPHABET[suffix % base] + tag


class RecipientState(enum.StrEnum):
    """Where a recipient's delivery stands; the value is what the record on disk holds."""

    PENDING = "pending"  # not tried yet
    SENT = "sent"  # accepted by the next hop (final)
    FAILED = "failed"  # refused for good, or its time ran out (final; a DSN follows)
    DEFERRED = "deferred"  # refused for now: tried again later


@dataclass
class Recipient:
    addr: str
    orcpt: str | None = None
    notify: list[str] | None = None
    state: RecipientState = RecipientState.PENDING
    status: str | None = None  # enhanced status code of the last attempt
    diag: str | None = None  # "smtp; 550 5.1.1 ..." (RFC 3464 Diagnostic-Code)
    remote_mta: str | None = None
    attempts: int = 0
    last_attempt: float | None = None
    relayed: bool = False  # delivered to a peer without DSN support

    def __post_init__(self) -> None:
        self.state = RecipientState(self.state)  # a record's string; an unknown one is a corrupt record

    @property
    def done(self) -> bool:
        return self.state in (RecipientState.SENT, RecipientState.FAILED)


@dataclass
class Envelope:
    id: str
    sender: str
    recipients: list[Recipient]
    client_ip: str = ""
    client_name: str | None = None
    helo: str = ""
    received_at: float = 0.0
    size: int = 0
    body: str = "7BIT"
    esmtp: bool = False
    ret: str | None = None
    envid: str | None = None
    message_id: str | None = None
    tls: bool = False
    srcid: str | None = None  # the original ID of a per-group copy
    group: str | None = None
    next_attempt: float = 0.0
    priority: int = 0  # 1 = "send ahead of the queue" (queue send ID)
    scan_attempts: int = 0  # scans that killed or hung their worker, or failed (MaximalScanAttempts)
    scan_error: str | None = None  # why the last of them failed
    dnsbl: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    # A scan that changed only the header: the new header block (its bytes as Latin-1 text, the
    # empty line that ends it included) and where the body starts in msg/ID, which keeps the
    # bytes as received. The message is ``head`` + msg/ID[body_offset:] (``open_message``).
    head: str | None = None
    body_offset: int = 0
    # Whether the header as received holds a DKIM-Signature field (the receiver sees it as it
    # writes it); None when not known (a record written before this field, a message made or
    # released here): the scanner then reads msg/ID's header for its signatures.
    dkim_signed: bool | None = None

    def as_dict(self, spool: bool = True) -> dict[str, Any]:
        """The record's fields; ``spool=False`` leaves out where the message's bytes are in the
        spool (``head``, ``body_offset``): a stored copy holds the message's effective bytes."""
        data = {name: getattr(self, name) for name in _ENVELOPE_FIELDS}
        data["recipients"] = [{name: getattr(r, name) for name in _RECIPIENT_FIELDS} for r in self.recipients]
        data["dnsbl"] = list(self.dnsbl)
        data["notes"] = dict(self.notes)
        if self.head is None or not spool:  # a record as before for a message whose file is whole
            del data["head"], data["body_offset"]
        if self.dkim_signed is None or not spool:  # not known (a record as before), or not the bytes received
            del data["dkim_signed"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Envelope":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["recipients"] = [Recipient(**r) for r in data.get("recipients", [])]
        return cls(**known)

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if not r.done]


_ENVELOPE_FIELDS = tuple(f.name for f in fields(Envelope))
_RECIPIENT_FIELDS = tuple(f.name for f in fields(Recipient))


# Finished spool files kept in tmp/ for reuse (``Queue.recycle``), at most this many:
# more than the files of the messages in flight at once vary by, so that files are neither made
# nor removed while the load holds.
MAX_FREE_FILES = 1024
# A kept file of at most this many bytes keeps them (and its disk blocks) until it is written
# again; a larger one is emptied when it is kept, so that kept files hold at most
# MAX_FREE_FILES × KEEP_BYTES (64 MiB) of the disk.
KEEP_BYTES = 64 * 1024
# Kept files of at most this many bytes (one block of the file system) are written again as
# records, larger ones as messages: a file written again shorter than it was frees the blocks
# past its new end (see ``recycle``), longer it needs new ones.
SMALL_FILE = 4096


class Queue:
    """The spool. Only the gateway process changes states; other tools ask it."""

    def __init__(self, root: str) -> None:
        self.root = root
        for sub in ("tmp", "msg", "corrupt", *STATES):
            os.makedirs(os.path.join(root, sub), mode=0o700, exist_ok=True)
        # recycled files in tmp/: [0] larger than SMALL_FILE (for messages), [1] the others (for records)
        self._free: tuple[collections.deque[str], collections.deque[str]] = (collections.deque(), collections.deque())
        self._free_lock = threading.Lock()

    # -- paths -------------------------------------------------------------
    def msg_path(self, qid: str) -> str:
        return os.path.join(self.root, "msg", qid)

    def record_path(self, state: str, qid: str) -> str:
        return os.path.join(self.root, state, qid)

    # -- writing -------------------------------------------------------------
    def write_record(self, state: str, env: Envelope, sync_dirs: bool = True) -> None:
        """Write a record durably; ``sync_dirs=False`` leaves the fsync of its folder to the
        caller's group commit (``Committer._sync_dirs``)."""
        data = json.dumps(env.as_dict(), separators=(",", ":")).encode()
        write_durably(self.record_path(state, env.id), data, sync_dir=sync_dirs, temp=self.take_free(small=True))

    # -- recycled files ----------------------------------------------------------
    def recycle(self, path: str) -> None:
        """A finished spool file (the record or message of a message that left the queue, or the
        record a scan result's new record replaced) is moved into tmp/ and kept to be written again,
        instead of removed: a new file costs an inode, and on ext4 without a journal each new inode
        is looked for past every inode freed in the last half minute, which at a few hundred
        messages a second was a quarter of the main process's CPU. In tmp/ it is what any file there
        is, never acknowledged: a crash leaves it to ``recover``. A file with another name (a
        per-group copy's message linked to its siblings) is removed from the spool instead, as are
        those past MAX_FREE_FILES. It keeps its bytes and its disk blocks until it is written
        again (its writer cuts it to what it wrote): freeing blocks can be as dear as making
        inodes (on a file system mounted with ``discard``, each freed block is discarded on its
        device at once: ≈ 70 µs of CPU and milliseconds of wait to empty a file of 4 KiB, measured
        in bench/PROFILE.md, twice for each message delivered), and a file written again over
        blocks it has needs none allocated. One larger than
        KEEP_BYTES is emptied (truncated) instead, so that kept files hold little of the disk."""
        if self.free_count() >= MAX_FREE_FILES:
            unlink_if_present(path)
            return
        target = self.tmp_name()
        try:
            os.rename(path, target)
            found = os.stat(target)
            if found.st_nlink != 1:  # in tmp/ no one can link it any more
                os.unlink(target)
                return
            size = found.st_size
            if size > KEEP_BYTES:
                os.truncate(target, 0)
                size = 0
        except FileNotFoundError:
            return
        with self._free_lock:
            self._free[size <= SMALL_FILE].append(target)

    def free_count(self) -> int:
        """How many recycled files this process keeps."""
        with self._free_lock:
            return len(self._free[0]) + len(self._free[1])

    def take_free(self, small: bool = False) -> str | None:
        """A recycled file in tmp/ to write again from its start (``write_durably``'s temp, a
        session's tmp file; its old bytes stay past what is written until the writer cuts it to
        its length: ``durable.reopen``), or None; a ``small`` one (a record's) when there is one."""
        with self._free_lock:
            for pool in (self._free[small], self._free[not small]):
                if pool:
                    return pool.popleft()
            return None

    def spare_free(self, keep: int, small: bool = False) -> list[str]:
        """The recycled files (``small`` ones, or the others) beyond ``keep``, taken from this
        process's list to be handed to another process of the gateway (the delivery process frees
        the files of the messages it delivers; the main process's sessions and records write them
        again)."""
        with self._free_lock:
            pool = self._free[small]
            spared = []
            while len(pool) > keep:
                spared.append(pool.pop())
            return spared

    def adopt_free(self, paths: list[str], small: bool = False) -> None:
        """Recycled files another process of the gateway handed over (``spare_free``, of the same
        ``small``): kept up to MAX_FREE_FILES, the rest removed."""
        tmp = os.path.join(self.root, "tmp")
        with self._free_lock:
            room = max(0, MAX_FREE_FILES - len(self._free[0]) - len(self._free[1]))
            taken = [p for p in paths if os.path.dirname(p) == tmp][:room]
            self._free[small].extend(taken)
        kept = set(taken)
        for path in paths:
            if path not in kept:  # beyond the limit, or not a file of this queue's tmp/
                unlink_if_present(path)

    def tmp_name(self) -> str:
        """A new name in tmp/: a queue ID of this process and random hex digits."""
        return os.path.join(self.root, "tmp", new_id() + f"{_names.getrandbits(4 * TMP_SUFFIX_CHARS):0{TMP_SUFFIX_CHARS}x}")

    def add_message(self, env: Envelope, state: str, data: bytes | None = None, link_from: str | None = None) -> None:
        """Store a new record (a per-group copy, a DSN, a notification) with its message.

        ``link_from`` hard-links an existing message file instead of writing bytes; the record
        states the size of its message as read (``message_size``: with the header it may carry).
        """
        path = self.msg_path(env.id)
        if link_from is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            try:
                os.link(link_from, path)
                fsync_dir(os.path.dirname(path))
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                with open(link_from, "rb") as f:  # another file system: copy instead
                    write_durably(path, f.read())
        else:
            assert data is not None
            write_durably(path, data)
        env.size = self.message_size(env)
        self.write_record(state, env)

    def move(self, qid: str, src: str, dst: str) -> None:
        """A state change: one atomic rename (durability of the rename is not needed:
        a lost rename only makes recovery redo the step)."""
        os.rename(self.record_path(src, qid), self.record_path(dst, qid))

    def replace_and_move(self, env: Envelope, src: str, dst: str, new_message: str,
                         sync_folder: Callable[[str], None] | None = None) -> None:
        """Give ``env`` the message in ``new_message`` (a file on this file system, fsync'd here)
        and move its record from ``src`` to ``dst``, as one step a crash cannot split: the
        record is in ``dst`` with the new bytes, or still in ``src`` with the old ones.

        The new bytes wait as msg/ID.staged until the record in ``dst`` is durable (the commit
        point); ``recover`` gives a staged file its place when the record got past ``src``,
        and removes it otherwise. ``sync_folder(name)`` makes the renames in a spool folder
        durable (``Committer.sync_folder`` shares one fsync between threads); by default each
        call fsyncs the folder itself.
        """
        sync = sync_folder or (lambda name: fsync_dir(os.path.join(self.root, name)))
        staged = self.msg_path(env.id) + STAGED
        env.head, env.body_offset = None, 0  # the new file is the whole message
        fsync_file(new_message)
        os.replace(new_message, staged)
        sync("msg")  # the staged bytes are in place before any record can point at them
        env.size = os.path.getsize(staged)
        self.write_record(dst, env, sync_dirs=False)
        sync(dst)  # commit point: recovery keeps the later of two states
        self.recycle(self.record_path(src, env.id))  # the next record's temp file (no new inode)
        os.replace(staged, self.msg_path(env.id))

    def replace_head_and_move(self, env: Envelope, src: str, dst: str, head: str, body_offset: int,
                              sync_folder: Callable[[str], None] | None = None) -> None:
        """Give ``env`` the header block ``head`` (Latin-1 text, its empty line included) over the
        body of msg/ID from ``body_offset`` on, and move its record from ``src`` to ``dst``, as one
        step a crash cannot split: msg/ID is not touched, the header travels in the record. The
        record is written in ``dst`` (fsync, rename, then ``dst``'s fsync: the commit point), then
        the one in ``src`` is moved into tmp/ to be written again (``recycle``: the record written
        here took a kept file, and this one takes its place, so that a scanned message costs no
        new inode); before the commit point a crash leaves the record in ``src`` with the message
        as it was (the step is done again), after it recovery keeps the record in ``dst`` (the
        later of two states). Two fsyncs, where ``replace_and_move`` needs four. ``sync_folder``
        as for ``replace_and_move``."""
        sync = sync_folder or (lambda name: fsync_dir(os.path.join(self.root, name)))
        env.head, env.body_offset = head, body_offset
        env.size = self.message_size(env)
        self.write_record(dst, env, sync_dirs=False)
        sync(dst)  # commit point
        self.recycle(self.record_path(src, env.id))

    def message_size(self, env: Envelope) -> int:
        """The size of ``env``'s message as its readers get it (``open_message``)."""
        size = os.path.getsize(self.msg_path(env.id))
        return size if env.head is None else len(env.head) + size - env.body_offset

    def open_message(self, env: Envelope) -> "MessageFile":
        """``env``'s message as every reader must get it: the header block its record carries, if
        any, then its file (``MessageFile``). Raises OSError when the file cannot be read."""
        return MessageFile(self.msg_path(env.id), env.head.encode("latin-1") if env.head is not None else b"",
                           env.body_offset if env.head is not None else 0)

    def read_message(self, env: Envelope, limit: int = -1) -> bytes:
        """``env``'s message (``open_message``), whole or its first ``limit`` bytes."""
        with self.open_message(env) as message:
            return message.read(limit)

    def update(self, state: str, env: Envelope) -> None:
        """Rewrite a record in place (per-recipient delivery state)."""
        self.write_record(state, env)

    def remove(self, qid: str, state: str, keep_files: bool = False) -> None:
        """A record is finished: drop the record, then its message — removed, or with
        ``keep_files`` kept empty for reuse (``recycle``: the gateway's own I/O threads only;
        another process's kept files would wait in tmp/ for the next start)."""
        drop = self.recycle if keep_files else unlink_if_present
        drop(self.record_path(state, qid))
        drop(self.msg_path(qid))

    def take_out(self, qid: str, state: str) -> bool:
        """Remove a record and its message only if the record is still in ``state``, which
        another process of the gateway may move on at the same moment (the delivery process
        takes QUE records into SND): one rename to a hidden name claims it, so either the
        other process finds it gone or this one does (False: nothing removed). A claimed record
        left by a crash is removed by ``recover``, and its message with it."""
        claimed = os.path.join(self.root, state, f".{qid}.removed")
        try:
            os.rename(self.record_path(state, qid), claimed)
        except FileNotFoundError:
            return False
        unlink_if_present(claimed)
        unlink_if_present(self.msg_path(qid))
        return True

    def sync_state_dirs(self) -> None:
        for state in (*STATES, "msg"):
            fsync_dir(os.path.join(self.root, state))

    # -- reading --------------------------------------------------------------
    def load(self, state: str, qid: str) -> Envelope | None:
        path = self.record_path(state, qid)
        try:
            return Envelope.from_dict(json.loads(read_file(path)))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as exc:
            self._quarantine_corrupt(path, qid, f"unreadable record: {exc}")
            return None

    def ids(self, state: str) -> list[str]:
        try:
            names = os.listdir(os.path.join(self.root, state))
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not n.startswith("."))

    def find(self, qid: str) -> str | None:
        """The state a record is in, or None."""
        for state in STATES:
            if os.path.exists(self.record_path(state, qid)):
                return state
        return None

    # -- recovery ---------------------------------------------------------------
    def _quarantine_corrupt(self, path: str, qid: str, why: str) -> None:
        """Keep an unreadable record and its message aside for the admin, never delete them."""
        log.error("%s: corrupt queue record moved to corrupt/: %s", qid, why)
        stamp = int(time.time())
        for src, suffix in ((path, "record"), (self.msg_path(qid), "msg")):
            if os.path.exists(src):
                try:
                    shutil.move(src, os.path.join(self.root, "corrupt", f"{qid}.{stamp}.{suffix}"))
                except OSError as exc:
                    log.error("%s: cannot move %s aside: %s", qid, src, exc)

    def recover(self) -> dict[str, int]:
        """Bring the spool back to a consistent state after a crash; returns counts."""
        counts = {"tmp_removed": 0, "requeued": 0, "orphans_removed": 0, "duplicates": 0, "no_message": 0}
        for sub in ("tmp", *STATES):
            folder = os.path.join(self.root, sub)
            for name in os.listdir(folder):
                if sub == "tmp" or name.startswith("."):
                    os.unlink(os.path.join(folder, name))  # never acknowledged
                    counts["tmp_removed"] += 1
        seen: dict[str, str] = {}
        for state in STATES:  # pipeline order: a later state wins
            for qid in self.ids(state):
                if qid in seen:
                    os.unlink(self.record_path(seen[qid], qid))
                    counts["duplicates"] += 1
                seen[qid] = state
        counts["unfinished_copies"] = self._drop_unfinished_copies(seen)
        for qid, state in seen.items():
            if not os.path.exists(self.msg_path(qid)):
                self._quarantine_corrupt(self.record_path(state, qid), qid, "message file missing")
                counts["no_message"] += 1
                continue
            if state in RECOVER_TO:
                self.move(qid, state, RECOVER_TO[state])
                counts["requeued"] += 1
        for name in os.listdir(os.path.join(self.root, "msg")):
            if name.endswith(STAGED) and not name.startswith("."):
                self._recover_staged(name[: -len(STAGED)], seen.get(name[: -len(STAGED)]))
        for qid in os.listdir(os.path.join(self.root, "msg")):
            if qid not in seen and not qid.startswith("."):
                # A message whose record was never written was never acknowledged.
                os.unlink(self.msg_path(qid))
                counts["orphans_removed"] += 1
            elif qid.startswith("."):
                os.unlink(self.msg_path(qid))
        self.sync_state_dirs()
        return counts

    def _drop_unfinished_copies(self, seen: dict[str, str]) -> int:
        """Per-group copies (``ID-N`` in QUE, srcid ID) whose message is still in CHK: the scan
        result that made them was cut short, and the message is scanned again from WFC, which
        makes them anew. They were never handed to the sender (that happens only once the
        original has left CHK), so removing them loses nothing and delivers nothing twice."""
        dropped = 0
        for qid, state in list(seen.items()):
            parent = qid.rpartition("-")[0]
            if state != QUE or seen.get(parent) != CHK:
                continue
            env = self.load(QUE, qid)
            if env is None:  # unreadable: moved to corrupt/ with its message
                del seen[qid]
                continue
            if env.srcid != parent:
                continue
            log.warning("%s: copy of %s made by an unfinished scan removed; the message is scanned again", qid, parent)
            os.unlink(self.record_path(QUE, qid))
            if os.path.exists(self.msg_path(qid)):
                os.unlink(self.msg_path(qid))
            del seen[qid]
            dropped += 1
        return dropped

    def drop_unacknowledged(self, tag: str) -> int:
        """What a process of the gateway that died (an incoming process) left of messages it never
        acknowledged: its files in tmp/ and its message files without a record (renamed into msg/,
        the record not yet written), by the last character of its IDs (``process_tag``); returns
        how many were removed. Only for a process that is gone: nothing of it is in progress."""
        tmp = [os.path.join(self.root, "tmp", name) for name in os.listdir(os.path.join(self.root, "tmp"))
               if name[:-TMP_SUFFIX_CHARS].endswith(tag)]
        msg = [self.msg_path(name) for name in os.listdir(os.path.join(self.root, "msg"))
               if name.endswith(tag) and "-" not in name and not name.startswith(".") and self.find(name) is None]
        for path in tmp + msg:
            unlink_if_present(path)
        return len(tmp) + len(msg)

    def _recover_staged(self, qid: str, state: str | None) -> None:
        """A ``replace_and_move`` cut short: past its commit point when the record left CHK."""
        staged = self.msg_path(qid) + STAGED
        if state is not None and STATES.index(state) > STATES.index(CHK):
            os.replace(staged, self.msg_path(qid))
        else:
            os.unlink(staged)  # the record is still before the step: it is done again


class MessageFile:
    """A queued message's bytes, read from its start: the header block ``head`` (a scan's new
    header, from the record), then the file ``path`` from ``body_offset`` on (the whole file when
    there is no such header). The one way the message of a record is read (``Queue.open_message``:
    the sender's transaction opens it so): sending, the 7-bit downgrade, DSNs,
    archive and quarantine copies, a rescan. ``size`` is the number of bytes ``read`` gives."""

    def __init__(self, path: str, head: bytes = b"", body_offset: int = 0) -> None:
        self._file = open(path, "rb", buffering=0)  # chunks are read whole: no buffer, no ioctl/lseek
        try:
            if body_offset:
                self._file.seek(body_offset)
            self.size = len(head) + os.fstat(self._file.fileno()).st_size - body_offset
        except BaseException:
            self._file.close()
            raise
        self._head = head

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all that is left when negative); b"" at the end."""
        head = self._head
        if not head:
            return self._file.read(size)
        if 0 <= size < len(head):
            self._head = head[size:]
            return head[:size]
        self._head = b""
        return head + (self._file.read(-1 if size < 0 else size - len(head)) or b"")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MessageFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class TmpFile:
    """A file in tmp/ being written by a session; its name is not the queue ID."""

    fd: int
    path: str
    reused: bool = False  # a recycled file: bytes of its last use may follow what is written


class Committer(IOPool):
    """The spool's group commit, in the I/O threads of `IOPool` (which it is).

    ``submit`` returns at once; ``done(error)`` runs on the loop once the
    message file and its WFC record are on stable storage (the receiver answers
    250 only then). Directory fsyncs are group-committed: the commits an I/O thread
    takes at once are written one after the other, then share one fsync of msg/ and
    one of WFC/ (``_commit_renames``, their batch's finishing step); and one fsync of
    a folder (``sync_folder``) covers every rename made before it started, so
    concurrent threads (and scan results, ``Queue.replace_and_move``) share them.
    Empty tmp/ files are created ahead of need (``take_tmp``), and finished records
    are unlinked here too.
    """

    SPARES = 32

    def __init__(self, queue: Queue, call_soon_threadsafe: Callable[..., None], threads: int = 4) -> None:
        super().__init__(call_soon_threadsafe, threads, name="commit")
        self.queue = queue
        self._folders = {name: GroupSync(os.path.join(queue.root, name)) for name in ("msg", *STATES)}
        self._spares: list[TmpFile] = []
        self._spares_lock = threading.Lock()
        self._refilling = False

    # -- tmp files -------------------------------------------------------------
    def _create_tmp(self) -> TmpFile:
        recycled = self.queue.take_free()
        fd = reopen(recycled)
        if fd >= 0 and recycled is not None:
            return TmpFile(fd, recycled, reused=True)
        path = self.queue.tmp_name()
        return TmpFile(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), path)

    def take_tmp(self) -> TmpFile:
        """A new empty file in tmp/ (made ahead of time when possible)."""
        with self._spares_lock:
            spare = self._spares.pop() if self._spares else None
            refill = len(self._spares) < self.SPARES // 2 and not self._refilling
            if refill:
                self._refilling = True
        if refill:
            self.run(self._refill)
        return spare if spare is not None else self._create_tmp()

    def spare_count(self) -> int:
        """How many empty files made ahead of need are open (bounded: refilled by SPARES when
        fewer than half of SPARES are left, one refill at a time)."""
        with self._spares_lock:
            return len(self._spares)

    def _refill(self) -> None:
        fresh: list[TmpFile] = []
        try:
            for _ in range(self.SPARES):
                fresh.append(self._create_tmp())
        except OSError as exc:  # out of descriptors or space: keep what was made
            log.warning("cannot make spare queue files: %s", exc)
        finally:
            with self._spares_lock:
                self._refilling = False
                self._spares.extend(fresh)

    def discard_tmp(self, tmp: TmpFile) -> None:
        """A message that will not be queued: drop its bytes."""
        os.close(tmp.fd)
        self.run(functools.partial(unlink_if_present, tmp.path))

    # -- commits ---------------------------------------------------------------------
    def submit(self, env: Envelope, tmp: TmpFile, done: Callable[[BaseException | None], None]) -> None:
        """Commit a received message: ``done(error)`` on the loop once it is durable. The commits
        an I/O thread takes at once share the fsyncs of msg/ and WFC/ (``_commit_renames``)."""
        self.call(functools.partial(self._commit, env, tmp), lambda _result, error: done(error),
                  then=self._commit_renames)

    def remove(self, qid: str, state: str, before: Callable[[], None] | None = None) -> None:
        """Drop a finished record and its message (no durability needed: see ``Queue.recover``);
        ``before`` runs first in the same thread (an archive copy of the message)."""
        self.run(functools.partial(self._remove, qid, state, before))

    def _remove(self, qid: str, state: str, before: Callable[[], None] | None) -> None:
        if before is not None:
            self._logged(before)
        self.queue.remove(qid, state, keep_files=True)

    def _commit(self, env: Envelope, tmp: TmpFile) -> None:
        try:
            if tmp.reused:  # the message is what was written: the end of the file's last use goes
                os.ftruncate(tmp.fd, os.lseek(tmp.fd, 0, os.SEEK_CUR))
            os.fsync(tmp.fd)
        except OSError:
            os.close(tmp.fd)
            unlink_if_present(tmp.path)
            raise
        os.close(tmp.fd)
        os.rename(tmp.path, self.queue.msg_path(env.id))
        self.queue.write_record(WFC, env, sync_dirs=False)

    def _commit_renames(self) -> None:
        """The renames of the commits before it made durable: the messages into msg/, then their
        records into WFC/ (the finishing step of a batch of commits, before their callbacks)."""
        self.sync_folder("msg")
        self.sync_folder(WFC)

    def sync_folder(self, name: str) -> None:
        """Make the renames already made in the spool folder ``name`` (msg, WFC, QUE...) durable,
        with one fsync shared by the threads asking at the same time."""
        self._folders[name].sync()

    def close(self) -> None:
        super().close()
        for folder in self._folders.values():
            folder.close()
        with self._spares_lock:
            spares, self._spares = self._spares, []
        for tmp in spares:
            os.close(tmp.fd)
            unlink_if_present(tmp.path)

