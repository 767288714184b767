"""The spool: durable writes and recovery from every state a crash can leave."""

from __future__ import annotations

import functools
import itertools
import json
import os
import threading

import pytest

from smtpgw.net.loop import EventLoop
from smtpgw.spool.durable import unlink_if_present, write_durably
from smtpgw.spool.iopool import BATCH, IOPool
from smtpgw.spool.queue import CHK, QUE, SND, WFC, Committer, Envelope, Queue, Recipient, RecipientState, new_id
from tests.support.net import wait_until


def make(queue: Queue, state: str, qid: str | None = None, with_message: bool = True) -> Envelope:
    env = Envelope(id=qid or new_id(), sender="a@b.test", recipients=[Recipient("x@example.test")])
    if with_message:
        with open(queue.msg_path(env.id), "wb") as f:
            f.write(b"Subject: s\r\n\r\nbody\r\n")
    queue.write_record(state, env)
    return env


def test_ids_are_unique_and_time_ordered():
    ids = [new_id(1_700_000_000 + i / 1000) for i in range(200)]
    assert len(set(ids)) == 200
    assert ids == sorted(ids)


def test_processes_with_the_same_counter_never_make_the_same_id(monkeypatch):
    """IncomingProcesses: each process counts from its own start, so two processes can reach
    the same counter value in the same microsecond; the last character (the process index)
    keeps their IDs apart, without changing the length or the order by time."""
    from smtpgw.spool import queue as spool

    when = 1_700_000_000.25
    made = {}
    for index in (0, 1, 2):
        monkeypatch.setattr(spool, "_counter", itertools.count())  # a fresh process's counter
        spool.set_process(index)
        made[index] = [spool.new_id(when) for _ in range(3)]
    monkeypatch.setattr(spool, "_process_tag", None)  # a command-line tool: a random tag of the other half
    untagged = {spool.new_id(when) for _ in range(200)}
    ids = [qid for batch in made.values() for qid in batch]
    assert len(set(ids)) == len(ids) and not untagged & set(ids)
    assert {len(qid) for qid in ids} | {len(qid) for qid in untagged} == {len(ids[0])}
    assert [qid[-1] for qid in made[1]] == [spool.process_tag(1)] * 3
    assert all(qid < spool.new_id(when + 0.000001) for qid in ids)  # FIFO by name across processes
    with pytest.raises(ValueError):
        spool.set_process(spool.MAX_PROCESSES)


def test_recovery_puts_work_in_progress_back(tmp_path):
    queue = Queue(str(tmp_path))
    chk, snd, que = make(queue, CHK), make(queue, SND), make(queue, QUE)
    counts = queue.recover()
    assert counts["requeued"] == 2
    assert queue.find(chk.id) == WFC and queue.find(snd.id) == QUE and queue.find(que.id) == QUE


def test_recovery_keeps_the_later_of_two_states(tmp_path):
    queue = Queue(str(tmp_path))
    env = make(queue, CHK)
    queue.write_record(QUE, env)  # crash between writing QUE and unlinking CHK
    assert queue.recover()["duplicates"] == 1
    assert queue.find(env.id) == QUE and not os.path.exists(queue.record_path(CHK, env.id))


def test_recovery_drops_unacknowledged_bytes_and_keeps_the_unreadable(tmp_path):
    queue = Queue(str(tmp_path))
    with open(os.path.join(queue.root, "tmp", "partial"), "wb") as f:
        f.write(b"half a message")
    with open(queue.msg_path("orphan"), "wb") as f:  # renamed into msg/ but no record: never got 250
        f.write(b"x")
    with open(os.path.join(queue.root, WFC, ".rec.tmp"), "wb") as f:  # a half-written record
        f.write(b'{"id":')
    lost = make(queue, QUE, with_message=False)  # a record whose message is gone
    broken = make(queue, WFC)
    with open(queue.record_path(WFC, broken.id), "w") as f:
        f.write("{not json")
    counts = queue.recover()
    assert counts["tmp_removed"] == 2 and counts["orphans_removed"] == 1 and counts["no_message"] == 1
    assert os.listdir(os.path.join(queue.root, "tmp")) == []
    assert queue.load(WFC, broken.id) is None  # unreadable → corrupt/, with its message
    corrupt = os.listdir(os.path.join(queue.root, "corrupt"))
    assert any(name.startswith(lost.id) for name in corrupt)
    assert any(name.startswith(broken.id) and name.endswith(".msg") for name in corrupt)


def test_records_round_trip(tmp_path):
    queue = Queue(str(tmp_path))
    env = make(queue, WFC)
    env.recipients[0].notify = ["SUCCESS"]
    env.notes["dsn"] = {"failure": ["x@example.test"]}
    queue.update(WFC, env)
    again = queue.load(WFC, env.id)
    assert again == env
    with open(queue.record_path(WFC, env.id)) as f:
        assert json.load(f)["recipients"][0]["notify"] == ["SUCCESS"]


def test_recipient_states_are_typed_and_stored_as_their_words(tmp_path):
    queue = Queue(str(tmp_path))
    env = make(queue, QUE)
    env.recipients += [Recipient("s@example.test", state=RecipientState.SENT), Recipient("f@example.test", state="failed")]
    queue.update(QUE, env)
    with open(queue.record_path(QUE, env.id)) as f:
        assert [r["state"] for r in json.load(f)["recipients"]] == ["pending", "sent", "failed"]
    again = queue.load(QUE, env.id)
    assert [type(r.state) for r in again.recipients] == [RecipientState] * 3
    assert [r.done for r in again.recipients] == [False, True, True] and len(again.pending()) == 1
    with open(queue.record_path(QUE, env.id), "w") as f:
        f.write(json.dumps(env.as_dict()).replace('"sent"', '"lost"'))
    assert queue.load(QUE, env.id) is None  # a state no version writes: kept in corrupt/, not guessed
    assert any(name.startswith(env.id) for name in os.listdir(os.path.join(queue.root, "corrupt")))


def test_write_durably_replaces_whole_files_and_leaves_no_temp(tmp_path):
    path = str(tmp_path / "file")
    write_durably(path, b"old")
    write_durably(path, b"x" * 300_000, sync_dir=False)
    assert open(path, "rb").read() == b"x" * 300_000
    assert os.listdir(tmp_path) == ["file"]
    unlink_if_present(path)
    unlink_if_present(path)  # already gone: not an error
    assert os.listdir(tmp_path) == []


def test_group_committed_record_is_the_same_record(tmp_path):
    queue = Queue(str(tmp_path))
    env = make(queue, WFC)
    queue.write_record(QUE, env, sync_dirs=False)
    assert open(queue.record_path(QUE, env.id), "rb").read() == open(queue.record_path(WFC, env.id), "rb").read()
    assert sorted(os.listdir(tmp_path / QUE)) == [env.id]


def test_io_pool_hands_results_and_errors_back_through_the_loop():
    handed: list[tuple[object, object]] = []
    done = threading.Event()

    def call_soon_threadsafe(callback, *args):
        callback(*args)
        if len(handed) == 2:
            done.set()

    pool = IOPool(call_soon_threadsafe, threads=1)
    pool.call(lambda: 42, lambda result, error: handed.append((result, error)))
    pool.call(lambda: 1 / 0, lambda result, error: handed.append((result, type(error))))
    assert done.wait(10)
    pool.close()
    assert handed == [(42, None), (None, ZeroDivisionError)]



class CountedLoop(EventLoop):
    """The event loop, counting the hand-backs from other threads (and what each carried)."""

    def __init__(self) -> None:
        super().__init__()
        self.handed: list[tuple[object, ...]] = []

    def call_soon_threadsafe(self, callback, *args) -> None:
        self.handed.append(args)
        super().call_soon_threadsafe(callback, *args)


def test_io_pool_threads_take_the_waiting_jobs_in_batches_and_hand_their_results_back_at_once():
    """Jobs submitted while every thread is busy wake none: the first thread done takes them, its
    share of them at a time (half of those waiting with two threads, BATCH at least), and the
    results of each batch come back to the loop in one hand-off, each callback in order."""
    loop = CountedLoop()
    pool = IOPool(loop.call_soon_threadsafe, threads=2)
    first, second = threading.Event(), threading.Event()
    started = [threading.Event(), threading.Event()]
    results: list[tuple[object, object]] = []
    try:
        for index, release in enumerate((first, second)):
            pool.call(lambda i=index, r=release: (started[i].set(), r.wait(10), threading.get_ident())[-1],
                      lambda result, error: results.append((result, error)), alone=True)
        assert started[0].wait(10) and started[1].wait(10)  # both threads busy
        for n in range(30):
            pool.call(lambda n=n: (n, threading.get_ident()), lambda result, error: results.append((result, error)))
        first.set()
        assert loop.run_until(lambda: len(results) == 31, 10)
        batch = [result for result, _error in results[1:]]
        assert [n for n, _thread in batch] == list(range(30))
        assert {thread for _n, thread in batch} == {results[0][0]}  # the thread that was freed
        assert BATCH == 4 and [len(args[0]) for args in loop.handed] == [1, 15, 8, 4, 3]
        second.set()
        assert loop.run_until(lambda: len(results) == 32, 10)
    finally:
        first.set(), second.set()
        pool.close()
        loop.close()


def test_io_pool_a_job_taken_alone_holds_back_none_of_those_after_it():
    """A job that may take long (``alone``: a database check, a question to clamd) is taken in a
    batch of its own: the jobs submitted after it go to another thread meanwhile."""
    loop = CountedLoop()
    pool = IOPool(loop.call_soon_threadsafe, threads=2)
    release = threading.Event()
    got: list[object] = []
    try:
        pool.call(lambda: release.wait(10), lambda result, error: got.append(("slow", result)), alone=True)
        pool.call(lambda: "quick", lambda result, error: got.append(result))
        assert loop.run_until(lambda: got == ["quick"], 10)
        release.set()
        assert loop.run_until(lambda: got == ["quick", ("slow", True)], 10)
    finally:
        release.set()
        pool.close()
        loop.close()

def test_io_pool_errors_reach_their_callbacks():
    """A job's error goes to its own callback; a finishing step's error to every job of the batch
    that named it (and to no other); a callback that fails stops none of the others; a job with
    no callback that fails is logged."""
    loop = CountedLoop()
    pool = IOPool(loop.call_soon_threadsafe, threads=1)
    release = threading.Event()
    got: dict[str, tuple[object, object]] = {}
    steps: list[str] = []

    def failing_step() -> None:
        steps.append("failing")
        raise OSError(5, "Input/output error")

    def step() -> None:
        steps.append("ok")

    def callback(name: str):
        def done(result, error) -> None:
            got[name] = (result, error)
            if name == "raises":
                raise RuntimeError("a bug in a callback")
        return done

    busy = threading.Event()
    try:
        pool.call(lambda: (busy.set(), release.wait(10)), lambda _result, _error: None, alone=True)
        assert busy.wait(10)  # the thread is busy: the jobs below wait, and are taken in one batch
        pool.call(lambda: "a", callback("a"), then=failing_step)
        pool.call(lambda: 1 / 0, callback("fails"), then=failing_step)
        pool.call(lambda: "b", callback("b"), then=failing_step)
        pool.call(lambda: "raises", callback("raises"), then=step)
        pool.call(lambda: "c", callback("c"), then=step)
        pool.run(lambda: 1 / 0)
        release.set()
        assert loop.run_until(lambda: len(got) == 5, 10)
        assert steps == ["failing", "ok"]  # once per batch, after its jobs
        assert isinstance(got["a"][1], OSError) and got["a"][1] is got["b"][1] and got["a"][0] is None
        assert got["fails"][0] is None and isinstance(got["fails"][1], ZeroDivisionError)
        assert got["raises"] == ("raises", None) and got["c"] == ("c", None)
    finally:
        release.set()
        pool.close()
        loop.close()


@pytest.mark.parametrize("attempt", range(3))
def test_io_pool_close_waits_for_the_jobs_submitted(tmp_path, attempt):
    """Even the jobs of a thread started, while closing, by another for the jobs it left."""
    loop = CountedLoop()
    pool = IOPool(loop.call_soon_threadsafe, threads=3)
    written: list[int] = []

    def job(n: int) -> None:
        write_durably(str(tmp_path / f"f{n}"), b"x" * 4096)
        written.append(n)

    for n in range(40):
        pool.run(functools.partial(job, n))
    pool.close()
    assert sorted(written) == list(range(40)) and len(os.listdir(tmp_path)) == 40
    with pytest.raises(RuntimeError):
        pool.run(lambda: None)
    pool.close()  # a second close is harmless
    loop.close()


def test_commits_taken_together_share_their_folder_fsyncs_and_each_is_durable_before_its_callback(tmp_path):
    """Commits submitted while the I/O thread is busy are taken in one batch: their files and
    records are written, then one fsync of msg/ and one of WFC/ cover them all, and only then
    does any callback run (the 250 of each message)."""
    queue = Queue(str(tmp_path))
    loop = CountedLoop()
    committer = Committer(queue, loop.call_soon_threadsafe, threads=1)
    synced: list[str] = []
    sync_folder = committer.sync_folder

    def counted(name: str) -> None:
        sync_folder(name)
        synced.append(name)

    committer.sync_folder = counted  # type: ignore[method-assign]
    release = threading.Event()
    done: dict[str, object] = {}
    try:
        busy = threading.Event()
        committer.call(lambda: (busy.set(), release.wait(10)), lambda _result, _error: None, alone=True)
        assert busy.wait(10)
        envs = []
        for n in range(20):
            tmp = committer.take_tmp()
            os.write(tmp.fd, b"Subject: %d\r\n\r\nbody\r\n" % n)
            env = Envelope(id=new_id(), sender="a@b.test", recipients=[Recipient("x@example.test")])
            envs.append(env)
            committer.submit(env, tmp, lambda error, qid=env.id: done.update({qid: (error, list(synced))}))
        release.set()
        assert loop.run_until(lambda: len(done) == 20, 10)
        assert all(done[env.id] == (None, ["msg", WFC]) for env in envs)
        assert synced == ["msg", WFC]
        for n, env in enumerate(envs):
            assert queue.load(WFC, env.id) == env
            assert open(queue.msg_path(env.id), "rb").read() == b"Subject: %d\r\n\r\nbody\r\n" % n
    finally:
        release.set()
        committer.close()
        loop.close()

def test_finished_files_are_written_again_instead_of_new_ones_and_a_linked_message_is_left_whole(tmp_path):
    """Committer.remove keeps a finished record and message in tmp/ (Queue.recycle); the next
    session's file and the next record are written into them (same inodes, new bytes only); a
    message file linked to a sibling copy is never taken, its sibling keeps its bytes; a crash
    leaves the kept files to recovery like any file in tmp/."""
    queue = Queue(str(tmp_path))
    committer = Committer(queue, lambda callback, *args: callback(*args), threads=1)
    try:
        first = make(queue, SND)
        sibling = Envelope(id=first.id + "-2", sender="a@b.test", recipients=[Recipient("y@example.test")])
        queue.add_message(sibling, QUE, link_from=queue.msg_path(first.id))
        other = make(queue, SND)
        inodes = {os.stat(queue.record_path(SND, first.id)).st_ino, os.stat(queue.record_path(SND, other.id)).st_ino,
                  os.stat(queue.msg_path(other.id)).st_ino}
        removed = threading.Event()
        committer.remove(first.id, SND)
        committer.remove(other.id, SND, before=removed.set)
        committer.close()  # waits for the removals
        assert removed.is_set() and queue.find(first.id) is None and queue.find(other.id) is None
        assert open(queue.msg_path(sibling.id), "rb").read() == b"Subject: s\r\n\r\nbody\r\n"
        assert len(os.listdir(tmp_path / "tmp")) == 3  # two records and one message (the linked one went)

        committer = Committer(queue, lambda callback, *args: callback(*args), threads=1)
        tmp = committer.take_tmp()
        os.write(tmp.fd, b"new")
        done: list[object] = []
        committed = threading.Event()
        env = Envelope(id=new_id(), sender="c@d.test", recipients=[Recipient("z@example.test")])
        committer.submit(env, tmp, lambda error: (done.append(error), committed.set()))
        assert committed.wait(10) and done == [None]
        assert open(queue.msg_path(env.id), "rb").read() == b"new"
        assert queue.load(WFC, env.id) == env
        wait_until(lambda: committer.spare_count() > 0, 10, "spare files made")
        # every kept file was taken again: by this session, its record or the spare files made ahead
        in_use = {os.stat(queue.msg_path(env.id)).st_ino, os.stat(queue.record_path(WFC, env.id)).st_ino}
        in_use |= {os.stat(tmp_path / "tmp" / name).st_ino for name in os.listdir(tmp_path / "tmp")}
        assert inodes <= in_use
        committer.close()
        assert os.listdir(tmp_path / "tmp") == []
        make(queue, WFC)
        queue.recycle(queue.record_path(WFC, queue.ids(WFC)[0]))
        assert queue.recover()["tmp_removed"] == 1 and os.listdir(tmp_path / "tmp") == []
    finally:
        committer.close()


def test_write_durably_through_a_given_file_writes_it_from_its_start(tmp_path):
    old = tmp_path / "old"
    old.write_bytes(b"x" * 5000)
    write_durably(str(tmp_path / "file"), b"short", temp=str(old))
    assert (tmp_path / "file").read_bytes() == b"short" and not old.exists()
    write_durably(str(tmp_path / "again"), b"made anew", temp=str(old))  # gone meanwhile: a temp of its own
    assert (tmp_path / "again").read_bytes() == b"made anew"
    assert sorted(os.listdir(tmp_path)) == ["again", "file"]


def test_take_out_removes_a_record_only_while_it_is_in_its_state(tmp_path):
    """The main process and the delivery process race for a QUE record: one rename decides."""
    queue = Queue(str(tmp_path / "q"))
    moved, kept = make(queue, QUE), make(queue, QUE)
    queue.move(moved.id, QUE, SND)  # the delivery process took it first
    assert not queue.take_out(moved.id, QUE)
    assert queue.find(moved.id) == SND and os.path.exists(queue.msg_path(moved.id))
    assert queue.take_out(kept.id, QUE)
    assert queue.find(kept.id) is None and not os.path.exists(queue.msg_path(kept.id))
    assert os.listdir(os.path.join(queue.root, QUE)) == []  # the claimed name is gone too


def test_recycled_files_handed_to_another_process_are_written_again_there(tmp_path):
    """The delivery process frees files; the main process adopts them (up to its limit), the
    small ones (records) apart from the others (messages), each taken for its own kind first."""
    delivering, main = Queue(str(tmp_path / "q")), Queue(str(tmp_path / "q"))
    for env in [make(delivering, SND) for _ in range(3)]:
        with open(delivering.msg_path(env.id), "ab") as f:
            f.write(b"x" * 5000)  # past SMALL_FILE
        delivering.remove(env.id, SND, keep_files=True)
    spared, spared_small = delivering.spare_free(keep=1), delivering.spare_free(keep=1, small=True)
    assert len(spared) == 2 and len(spared_small) == 2 and delivering.free_count() == 2
    assert all(os.path.getsize(path) > 5000 for path in spared) and all(os.path.getsize(p) < 1000 for p in spared_small)
    outside = str(tmp_path / "elsewhere")
    open(outside, "w").close()
    main.adopt_free([*spared, outside])
    main.adopt_free(spared_small, small=True)
    assert sorted(main._free[0]) == sorted(spared) and not os.path.exists(outside)
    assert sorted(main._free[1]) == sorted(spared_small)
    assert main.take_free(small=True) in spared_small and main.take_free() in spared
    main.take_free(small=True)
    assert main.take_free(small=True) in spared  # none of its kind left: the other kind


def test_a_kept_file_keeps_its_blocks_until_written_again_and_a_large_one_is_emptied(tmp_path):
    """Queue.recycle keeps a file of at most KEEP_BYTES as it is (emptying it would free its
    blocks, only for its next bytes to need new ones), a larger one emptied; written again, as a
    record or a session's message, it holds the new bytes only, however long the old ones were."""
    from smtpgw.spool.queue import KEEP_BYTES
    queue = Queue(str(tmp_path))
    small, large = make(queue, SND), make(queue, SND)
    with open(queue.msg_path(small.id), "wb") as f:
        f.write(b"x" * 9000)
    with open(queue.msg_path(large.id), "wb") as f:
        f.write(b"y" * (KEEP_BYTES + 1))
    queue.recycle(queue.msg_path(small.id))
    queue.recycle(queue.msg_path(large.id))
    kept = {os.stat(path).st_size: path for path in [*queue._free[0], *queue._free[1]]}
    assert sorted(kept) == [0, 9000]
    blocks = os.stat(kept[9000]).st_blocks
    queue._free[1].clear()
    assert list(queue._free[0]) == [kept[9000]]  # larger than SMALL_FILE: for a message
    committer = Committer(queue, lambda callback, *args: callback(*args), threads=1)
    try:
        tmp = committer._create_tmp()
        assert tmp.path == kept[9000] and tmp.reused
        os.write(tmp.fd, b"short message\r\n")
        env = Envelope(id=new_id(), sender="c@d.test", recipients=[Recipient("z@example.test")])
        done: list[object] = []
        committed = threading.Event()
        committer.submit(env, tmp, lambda error: (done.append(error), committed.set()))
        assert committed.wait(10) and done == [None]
        assert open(queue.msg_path(env.id), "rb").read() == b"short message\r\n"
        assert queue.load(WFC, env.id) == env
    finally:
        committer.close()
    # the record written into a kept file of a longer record holds only itself
    queue.recycle(queue.record_path(SND, small.id))
    env.recipients.append(Recipient("w" * 20000 + "@example.test"))
    queue.write_record(QUE, env)
    queue.recycle(queue.record_path(QUE, env.id))
    env.recipients.pop()
    queue.write_record(QUE, env)
    assert queue.load(QUE, env.id) == env and blocks > 0


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 3 * 65536])
def test_read_file_reads_a_file_of_any_length(tmp_path, size):
    from smtpgw.spool.durable import read_file
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    (tmp_path / "f").write_bytes(data)
    assert read_file(str(tmp_path / "f")) == data
