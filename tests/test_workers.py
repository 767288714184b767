"""The scanner worker pool with real worker processes: deadlines run from when a worker takes a
job, and only the job a worker was running is blamed when it is replaced."""

from __future__ import annotations

import os
import time
from typing import Any

from smtpgw.config import load_config, save_snapshot
from smtpgw.net.loop import EventLoop
from smtpgw.scan.job import job_lines
from smtpgw.scan.workers import WorkerPool, worker_config_path
from smtpgw.spool.queue import CHK, Envelope, Queue, Recipient, new_id
from tests.support.clamd import STALL_MARKER
from tests.support.net import GatewayProcess

JOB_TIMEOUT = 6.0  # seconds; a scan of a small clean message takes milliseconds, a fresh worker's first one longer on a busy machine


def queued(queue: Queue, body: bytes) -> Envelope:
    env = Envelope(id=new_id(), sender="a@b.test", recipients=[Recipient("x@example.test")])
    queue.add_message(env, CHK, data=b"Subject: s\r\n\r\n" + body + b"\r\n")
    return env


def run_pool(config_path: str, jobs: list[Envelope], timeout: float = 60.0) -> dict[str, dict[str, Any]]:
    """Submit ``jobs`` to a one-worker pool and run the loop until each has its result."""
    results: dict[str, dict[str, Any]] = {}
    loop = EventLoop()
    pool = WorkerPool(loop, config_path, 1, results.__setitem__, job_timeout=JOB_TIMEOUT)
    for env in jobs:
        pool.submit(env.id, {"env": env.as_dict()})
    try:
        assert loop.run_until(lambda: len(results) == len(jobs), timeout), results
    finally:
        pool.stop()
    return results


def test_a_job_waiting_behind_a_hung_one_gets_its_own_full_deadline(tmp_path, stalling_clamd):
    gw = GatewayProcess(str(tmp_path / "gw"), None, extra={
        "smtpgw.ave": [("ClamdAddress", stalling_clamd.address)], "smtpgw.policy": [("Check", "true")]})
    cfg = load_config(gw.config)
    queue = Queue(cfg.path.QueuePath)
    save_snapshot(worker_config_path(queue.root), cfg)
    hung, waiting = queued(queue, STALL_MARKER), queued(queue, b"nothing to see")
    started = time.monotonic()
    results = run_pool(worker_config_path(queue.root), [hung, waiting])
    assert results[hung.id] == {"error": "scanner worker died: job timeout", "started": True}
    assert "error" not in results[waiting.id] and results[waiting.id]["copies"][0]["notes"]["status"] == "clean"
    # it waited a whole deadline behind the hung job: a deadline counted from submission had expired
    assert time.monotonic() - started > JOB_TIMEOUT


def test_a_worker_that_cannot_start_blames_no_job(tmp_path):
    queue = Queue(str(tmp_path / "queue"))
    env = queued(queue, b"body")
    results = run_pool(str(tmp_path / "no-such-snapshot"), [env])
    assert results[env.id] == {"error": "no scanner worker could be started", "started": False}


def test_a_worker_is_sent_its_next_job_while_it_runs_one(tmp_path, stalling_clamd):
    """PREFETCH: the next job waits in the worker's stdin, so it starts without a round trip
    through the loop; not started, it is not blamed when the worker is replaced."""
    gw = GatewayProcess(str(tmp_path / "gw"), None, extra={
        "smtpgw.ave": [("ClamdAddress", stalling_clamd.address)], "smtpgw.policy": [("Check", "true")]})
    cfg = load_config(gw.config)
    queue = Queue(cfg.path.QueuePath)
    save_snapshot(worker_config_path(queue.root), cfg)
    hung, second, third = queued(queue, STALL_MARKER), queued(queue, b"next"), queued(queue, b"after")
    results: dict[str, dict[str, Any]] = {}
    loop = EventLoop()
    pool = WorkerPool(loop, worker_config_path(queue.root), 1, results.__setitem__, job_timeout=600)
    try:
        for env in (hung, second, third):
            pool.submit(env.id, {"env": env.as_dict()})
        assert loop.run_until(lambda: bool(stalling_clamd.held_pids), 30)
        [worker] = pool.workers
        assert list(worker.jobs) == [hung.id, second.id] and [q for q, _ in pool.backlog] == [third.id]
        assert pool.cancel(third.id) and not pool.cancel(second.id)  # one in a worker's line stays
        worker.proc.kill()  # the hung scan's worker dies: the job it had not started goes to the next
        assert loop.run_until(lambda: len(results) == 2, 60), results
    finally:
        pool.stop()
    assert results[hung.id] == {"error": "scanner worker died: worker exited", "started": True}
    assert results[second.id]["copies"][0]["notes"]["status"] == "clean"


def test_a_worker_reads_its_job_lines_as_they_come_whole_or_split():
    read, write = os.pipe()
    lines = job_lines(read, idle=0.01)
    os.write(write, b'{"qid":"A"}\n{"qid"')
    assert next(lines) == b'{"qid":"A"}\n'
    os.write(write, b':"B"}\n{"qid":"C"}')  # the rest of B after an idle wait, then C cut by the end
    os.close(write)
    assert list(lines) == [b'{"qid":"B"}\n', b'{"qid":"C"}']
    os.close(read)
