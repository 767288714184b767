"""Applying a scan result: every crash point leaves a message the restart handles right."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Callable

import pytest

from smtpgw.scan.job import CopyResult, ScanResult, header_change, not_scanned
from smtpgw.scan.scanner import Scanner
from smtpgw.spool.queue import CHK, QUE, WFC, Envelope, Queue, Recipient, fsync_dir, new_id

ORIGINAL = b"Subject: s\r\n\r\nbody\r\n"
REWRITTEN = b"Subject: s\r\n\r\nbody\r\n-- \r\ndisclaimer\r\n"


class Crash(BaseException):
    """kill -9 at this file operation: nothing after it happens."""


class InlineCommitter:
    """``Committer.call`` and ``sync_folder`` run at once in the caller's thread: a crash point
    inside the I/O job stops the caller, as a kill -9 stops everything."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def call(self, job: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        try:
            result = job()
        except Exception as exc:
            done(None, exc)
            return
        done(result, None)

    def sync_folder(self, name: str) -> None:
        fsync_dir(os.path.join(self.queue.root, name))


def scanner_on(queue: Queue) -> tuple[Scanner, list[Envelope]]:
    scanned: list[Envelope] = []
    cfg = SimpleNamespace(ave=SimpleNamespace(ScanTimeout=10), limits=SimpleNamespace(AntiviralSessions=1))
    gateway = SimpleNamespace(loop=None, queue=queue, cfg=cfg, config_path="/nonexistent",
                              stats=SimpleNamespace(inc=lambda *a: None, set=lambda *a: None),
                              message_scanned=scanned.append, committer=InlineCommitter(queue))
    return Scanner(gateway), scanned  # type: ignore[arg-type]


def crash_at(monkeypatch: pytest.MonkeyPatch, n: int) -> Callable[[], int]:
    """Make the ``n``-th rename/replace/link/unlink raise Crash; returns a counter of operations."""
    count = [0]

    def wrap(real: Callable[..., Any]) -> Callable[..., Any]:
        def op(*args: Any, **kw: Any) -> Any:
            count[0] += 1
            if count[0] == n:
                raise Crash()
            return real(*args, **kw)
        return op

    for name in ("rename", "replace", "link", "unlink"):
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    return lambda: count[0]


def scanned_and_rewritten(queue: Queue, recipients: tuple[str, ...] = ("x@example.test",)) -> tuple[str, str]:
    """A message in CHK (ORIGINAL) and the rewritten bytes a scan left for it in tmp/ (REWRITTEN)."""
    env = Envelope(id=new_id(), sender="a@b.test", recipients=[Recipient(r) for r in recipients], size=len(ORIGINAL))
    with open(queue.msg_path(env.id), "wb") as f:
        f.write(ORIGINAL)
    queue.write_record(CHK, env)
    rewritten = os.path.join(queue.root, "tmp", f"{env.id}.scan1")
    with open(rewritten, "wb") as f:
        f.write(REWRITTEN)
    return env.id, rewritten


def applied_with_a_crash(monkeypatch: pytest.MonkeyPatch, queue: Queue, qid: str, crash: int,
                         result: ScanResult) -> bool:
    """Apply ``result`` with a kill -9 at file operation ``crash``; False when _apply makes fewer."""
    scanner, _ = scanner_on(queue)
    counter = crash_at(monkeypatch, crash)
    try:
        scanner._apply(qid, result)
    except Crash:
        pass
    monkeypatch.undo()
    return counter() >= crash


TWO_GROUPS = ("x@example.test", "y@lab.test")


def two_groups(rewritten: str) -> ScanResult:
    """A scan result splitting TWO_GROUPS: the first group's copy rewritten, the second's not."""
    return ScanResult([
        CopyResult(group="policy", recipients=["x@example.test"], rewritten=rewritten),
        CopyResult(group="lab", recipients=["y@lab.test"]),
    ])


HEADED = b"X-Anti-Virus: clean\r\nSubject: [SPAM] s\r\n\r\nbody\r\n"  # ORIGINAL with only its header changed
NEW_HEAD = HEADED[: HEADED.index(b"\r\n\r\n") + 4].decode("latin-1")
BODY_OFFSET = ORIGINAL.index(b"\r\n\r\n") + 4


def header_only(recipients: list[str] | None = None, group: str = "policy") -> CopyResult:
    return CopyResult(group=group, recipients=recipients or ["x@example.test"], head=NEW_HEAD, body_offset=BODY_OFFSET)


def read(queue: Queue, qid: str, state: str = QUE) -> bytes:
    env = queue.load(state, qid)
    assert env is not None
    return queue.read_message(env)


def test_a_rewritten_message_moves_on_with_its_new_bytes(tmp_path):
    queue = Queue(str(tmp_path))
    qid, rewritten = scanned_and_rewritten(queue)
    scanner, scanned = scanner_on(queue)
    scanner._apply(qid, ScanResult([CopyResult(group="policy", recipients=["x@example.test"], rewritten=rewritten)]))
    assert queue.find(qid) == QUE and [e.id for e in scanned] == [qid]
    with open(queue.msg_path(qid), "rb") as f:
        assert f.read() == REWRITTEN
    assert queue.load(QUE, qid).size == len(REWRITTEN)
    assert sorted(os.listdir(os.path.join(queue.root, "msg"))) == [qid]


@pytest.mark.parametrize("change", ["rewrite", "header"])
def test_a_crash_while_applying_a_change_leaves_it_applied_or_the_message_as_received(tmp_path, monkeypatch, change):
    """After a crash at any file operation the record is either in QUE with the changed message
    (a rewrite: its new file; a header change: the record's header over the unchanged body), or
    back in WFC with the message as received, scanned again (a disclaimer or a spam tag is never
    added twice, nor lost)."""
    for crash in range(1, 50):  # every operation of _apply in turn, until one run has no crash point left
        queue = Queue(str(tmp_path / f"crash{crash}"))
        qid, rewritten = scanned_and_rewritten(queue)
        if change == "header":  # a header change writes no file: the record written in QUE is the commit point
            os.unlink(rewritten)
            copy, new = header_only(), HEADED
        else:
            copy, new = CopyResult(group="policy", recipients=["x@example.test"], rewritten=rewritten), REWRITTEN
        if not applied_with_a_crash(monkeypatch, queue, qid, crash, ScanResult([copy])):
            break
        queue.recover()
        state = queue.find(qid)
        assert (state, read(queue, qid, state)) in ((QUE, new), (WFC, ORIGINAL)), (crash, state)
        assert sorted(os.listdir(os.path.join(queue.root, "msg"))) == [qid]
        if state == QUE:
            assert queue.load(QUE, qid).size == len(new)
    assert crash > (3 if change == "rewrite" else 2), "each file operation of the step is tried as a crash point"


def test_per_group_copies_record_the_size_of_their_own_message(tmp_path):
    queue = Queue(str(tmp_path))
    qid, rewritten = scanned_and_rewritten(queue, TWO_GROUPS)
    scanner, scanned = scanner_on(queue)
    scanner._apply(qid, two_groups(rewritten))
    sizes = {e.id: e.size for e in scanned}
    assert sizes == {f"{qid}-1": len(REWRITTEN), f"{qid}-2": len(ORIGINAL)}
    for qid, size in sizes.items():
        assert queue.load(QUE, qid).size == size  # the record on disk, not only the one in memory


def test_a_crash_while_making_per_group_copies_leaves_the_copies_or_the_message(tmp_path, monkeypatch):
    """A scan result for two groups makes ID-1 and ID-2 in QUE, then removes ID from CHK. After a
    crash at any file operation the restart has either both copies (and not the original) or the
    original back in WFC and no copy: never a copy beside an original that is scanned again."""
    for crash in range(1, 80):
        queue = Queue(str(tmp_path / f"crash{crash}"))
        qid, rewritten = scanned_and_rewritten(queue, TWO_GROUPS)
        if not applied_with_a_crash(monkeypatch, queue, qid, crash, two_groups(rewritten)):
            break
        queue.recover()
        states = {name: queue.find(name) for name in (qid, f"{qid}-1", f"{qid}-2")}
        messages = sorted(os.listdir(os.path.join(queue.root, "msg")))
        if states[qid] is None:
            assert states == {qid: None, f"{qid}-1": QUE, f"{qid}-2": QUE}, (crash, states)
            with open(queue.msg_path(f"{qid}-1"), "rb") as f:
                assert f.read() == REWRITTEN
            assert messages == [f"{qid}-1", f"{qid}-2"]
        else:
            assert states == {qid: WFC, f"{qid}-1": None, f"{qid}-2": None}, (crash, states)
            assert messages == [qid]
    assert crash > 5, "making two copies takes several file operations, each one tried as a crash point"


def test_a_header_change_moves_on_in_its_record_and_leaves_the_message_file_as_received(tmp_path):
    queue = Queue(str(tmp_path))
    qid, rewritten = scanned_and_rewritten(queue)
    os.unlink(rewritten)  # a header change writes no file
    scanner, scanned = scanner_on(queue)
    scanner._apply(qid, ScanResult([header_only()]))
    assert queue.find(qid) == QUE and [e.id for e in scanned] == [qid]
    with open(queue.msg_path(qid), "rb") as f:
        assert f.read() == ORIGINAL
    assert read(queue, qid) == HEADED and scanned[0].size == queue.load(QUE, qid).size == len(HEADED)
    assert sorted(os.listdir(os.path.join(queue.root, "msg"))) == [qid]
    with queue.open_message(queue.load(QUE, qid)) as message:  # read in chunks, as the client does
        assert message.size == len(HEADED)
        chunks = [message.read(5) for _ in range(len(HEADED) // 5 + 2)]
    assert b"".join(chunks) == HEADED and chunks[-1] == b""


def test_per_group_copies_with_a_header_change_share_the_message_file(tmp_path):
    queue = Queue(str(tmp_path))
    qid, rewritten = scanned_and_rewritten(queue, TWO_GROUPS)
    scanner, scanned = scanner_on(queue)
    scanner._apply(qid, ScanResult([header_only(["x@example.test"]), CopyResult(group="lab", recipients=["y@lab.test"],
                                                                                  rewritten=rewritten)]))
    assert {e.id: e.size for e in scanned} == {f"{qid}-1": len(HEADED), f"{qid}-2": len(REWRITTEN)}
    assert read(queue, f"{qid}-1") == HEADED and read(queue, f"{qid}-2") == REWRITTEN
    assert os.stat(queue.msg_path(f"{qid}-1")).st_size == len(ORIGINAL)  # the message as received, linked


@pytest.mark.parametrize("change", ["header", "rewrite", "two groups"])
def test_the_record_a_scan_result_leaves_behind_is_kept_to_be_written_again(tmp_path, change):
    """The record left in CHK once the result's record is in QUE is not removed but kept as it is
    in tmp/ (``Queue.recycle``) and written again as a later record or session file: the record
    written in QUE took a kept file, so a scanned message costs no new inode, no freed one (nor
    freed disk blocks)."""
    queue = Queue(str(tmp_path))
    qid, rewritten = scanned_and_rewritten(queue, TWO_GROUPS if change == "two groups" else ("x@example.test",))
    if change == "header":
        os.unlink(rewritten)
        result = ScanResult([header_only()])
    elif change == "rewrite":
        result = ScanResult([CopyResult(group="policy", recipients=["x@example.test"], rewritten=rewritten)])
    else:
        result = two_groups(rewritten)
    record, size = os.stat(queue.record_path(CHK, qid)).st_ino, os.path.getsize(queue.record_path(CHK, qid))
    scanner, scanned = scanner_on(queue)
    scanner._apply(qid, result)
    assert queue.find(qid) in (QUE, None) and len(scanned) == (2 if change == "two groups" else 1)
    kept = [*queue._free[0], *queue._free[1]]  # a message linked to its per-group copies is never kept
    assert len(kept) == 1 and os.path.dirname(kept[0]) == os.path.join(queue.root, "tmp")
    assert os.stat(kept[0]).st_ino == record and os.path.getsize(kept[0]) == size
    again = Envelope(id=new_id(), sender="c@d.test", recipients=[Recipient("z@example.test")])
    with open(queue.msg_path(again.id), "wb") as f:
        f.write(ORIGINAL)
    queue.write_record(WFC, again)  # through the kept file
    assert os.stat(queue.record_path(WFC, again.id)).st_ino == record and queue.load(WFC, again.id) == again
    assert os.listdir(os.path.join(queue.root, "tmp")) == []


def test_a_worker_sends_a_header_change_as_a_header_and_a_body_change_as_a_new_file():
    env = Envelope(id=new_id(), sender="a@b.test", recipients=[Recipient("x@example.test")])
    assert header_change(env, ORIGINAL, HEADED) == (NEW_HEAD, BODY_OFFSET)
    assert header_change(env, ORIGINAL, REWRITTEN) is None  # a disclaimer: the body changed
    assert header_change(env, ORIGINAL, HEADED.replace(b"body", b"bodY")) is None
    # scanned again with a header from its record: the offset stays one in msg/ID
    env.head, env.body_offset = NEW_HEAD, BODY_OFFSET
    again = b"X-Extra: 1\r\n" + HEADED
    assert header_change(env, HEADED, again) == (again[: again.index(b"\r\n\r\n") + 4].decode("latin-1"), BODY_OFFSET)
    # a header of 8-bit bytes survives the record's text
    eight = b"Subject: \xe9t\xe9\r\n\r\nbody\r\n"
    env.head = None
    head, offset = header_change(env, ORIGINAL, eight)
    assert head.encode("latin-1") + ORIGINAL[offset:] == eight


def test_a_record_with_a_header_reads_and_round_trips_as_its_message(tmp_path):
    queue = Queue(str(tmp_path))
    env = Envelope(id=new_id(), sender="a@b.test", recipients=[Recipient("x@example.test")])
    with open(queue.msg_path(env.id), "wb") as f:
        f.write(ORIGINAL)
    env.head, env.body_offset = "Subject: \xe9\r\n\r\n", BODY_OFFSET
    queue.write_record(QUE, env)
    again = queue.load(QUE, env.id)
    expected = b"Subject: \xe9\r\n\r\nbody\r\n"
    assert queue.read_message(again) == expected and queue.message_size(again) == len(expected)
    assert queue.read_message(again, 4) == b"Subj"
    assert "head" not in again.as_dict(spool=False) and "head" not in Envelope(id="x", sender="", recipients=[]).as_dict()


class HeldCommitter(InlineCommitter):
    """``Committer.call`` whose job runs only when the test says so (an I/O thread still busy)."""

    def __init__(self, queue: Queue) -> None:
        super().__init__(queue)
        self.held: list[tuple[Callable[[], Any], Callable[[Any, BaseException | None], None]]] = []

    def call(self, job: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        self.held.append((job, done))

    def finish(self) -> None:
        for job, done in self.held:
            super().call(job, done)


def test_a_message_removed_while_its_rewrite_is_being_applied_leaves_nothing(tmp_path):
    """``queue remove`` of a message whose scan result an I/O thread is writing: the result is
    discarded when that job ends, and nothing of the message stays in the spool."""
    from smtpgw.spool.ops import remove_record

    queue = Queue(str(tmp_path))
    qid, rewritten = scanned_and_rewritten(queue)
    scanner, scanned = scanner_on(queue)
    scanner.host.committer = held = HeldCommitter(queue)
    scanner._apply(qid, ScanResult([CopyResult(group="policy", recipients=["x@example.test"], rewritten=rewritten)]))
    assert qid in scanner.inflight and queue.find(qid) == CHK  # the I/O job has not run yet
    scanner.cancel(qid)  # as Gateway.remove_queued does, then the files
    remove_record(queue, qid, CHK)
    held.finish()
    assert scanned == [] and queue.find(qid) is None and not scanner.inflight
    assert os.listdir(os.path.join(queue.root, "msg")) == []


def test_a_message_nothing_scans_goes_from_wfc_to_que_in_one_rename_or_through_chk_when_split(tmp_path, monkeypatch):
    """Check=false: the message as it came moves on WFC → QUE at once; one split between two
    groups still leaves CHK as a scanned one does (per-group copies, the original gone)."""
    queue = Queue(str(tmp_path))
    scanner, scanned = scanner_on(queue)
    env = Envelope(id=new_id(), sender="a@b.test", recipients=[Recipient("x@example.test")], size=len(ORIGINAL))
    with open(queue.msg_path(env.id), "wb") as f:
        f.write(ORIGINAL)
    queue.write_record(WFC, env)
    renames: list[tuple[str, str]] = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (renames.append((a, b)), real_rename(a, b))[1])
    scanner._apply(env.id, ScanResult([not_scanned("policy", ["x@example.test"])]), env, WFC)
    assert renames == [(queue.record_path(WFC, env.id), queue.record_path(QUE, env.id))]
    assert queue.find(env.id) == QUE and [e.id for e in scanned] == [env.id]

    split = Envelope(id=new_id(), sender="a@b.test", recipients=[Recipient(r) for r in TWO_GROUPS], size=len(ORIGINAL))
    with open(queue.msg_path(split.id), "wb") as f:
        f.write(ORIGINAL)
    queue.write_record(WFC, split)
    scanner._apply(split.id, ScanResult([not_scanned("policy", ["x@example.test"]), not_scanned("lab", ["y@lab.test"])]),
                   split, WFC)
    assert queue.find(split.id) is None
    assert sorted(e.id for e in scanned[1:]) == [f"{split.id}-1", f"{split.id}-2"]
    assert all(queue.find(e.id) == QUE for e in scanned[1:])
