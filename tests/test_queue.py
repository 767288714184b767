"""The spool: durable writes and recovery from every state a crash can leave."""

from __future__ import annotations

import itertools
import json
import os
import threading

import pytest

from smtpgw.spool.durable import unlink_if_present, write_durably
from smtpgw.spool.iopool import IOPool
from smtpgw.spool.queue import CHK, QUE, SND, WFC, Envelope, Queue, Recipient, RecipientState, new_id


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
