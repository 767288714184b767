"""Scanner worker processes and the line protocol the event loop speaks with them.

Owns: starting ``python3 -m smtpgw.scanjob --snapshot FILE`` worker processes (about one
per core), handing each a job as one JSON line on its stdin and reading one
JSON line of result per job from its stdout, non-blocking on the event loop;
replacing a worker that dies (its jobs fail and are retried by the caller);
retiring workers on reload (they finish their jobs, then exit).

Must never: block the loop on a worker, or lose track of a job: every job
submitted gets exactly one ``on_result`` call (a result or an error).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any, Callable

from smtpgw.loop import EventLoop, Timer

log = logging.getLogger("smtpgw.workers")

MAX_LINE = 64 * 1024 * 1024  # a result line larger than this is a broken worker
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ResultCallback = Callable[[str, dict[str, Any]], None]
WORKER_CONFIG = ".worker-config"  # in QueuePath: the configuration the gateway accepted, for its workers


def worker_config_path(queue_root: str) -> str:
    """Where the gateway leaves the (pickled) configuration its scanner workers load."""
    return os.path.join(queue_root, WORKER_CONFIG)


class Worker:
    def __init__(self, pool: "WorkerPool") -> None:
        self.pool = pool
        env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smtpgw.scanjob", "--snapshot", pool.config_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True, cwd="/",
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin = self.proc.stdin.fileno()
        self.stdout = self.proc.stdout.fileno()
        os.set_blocking(self.stdin, False)
        os.set_blocking(self.stdout, False)
        self.jobs: set[str] = set()
        self.deadlines: dict[str, Timer] = {}
        self.out = bytearray()
        self.inbuf = bytearray()
        self.retiring = False
        self.dead = False
        pool.loop.add_reader(self.stdout, self._readable)

    def send(self, qid: str, payload: dict[str, Any]) -> None:
        self.jobs.add(qid)
        # a job that takes far longer than any scan may means a stuck worker: it is replaced
        self.deadlines[qid] = self.pool.loop.call_later(self.pool.job_timeout, self._overdue, qid)
        self.out += json.dumps({"qid": qid, **payload}, separators=(",", ":")).encode() + b"\n"
        self._flush()

    def _flush(self) -> None:
        while self.out:
            try:
                written = os.write(self.stdin, self.out)
            except BlockingIOError:
                break
            except OSError:
                self._died("cannot write to worker")
                return
            del self.out[:written]
        if self.out:
            self.pool.loop.add_writer(self.stdin, self._flush)
        else:
            self.pool.loop.remove_writer(self.stdin)
            if self.retiring and not self.jobs:
                self.close()

    def _readable(self) -> None:
        try:
            chunk = os.read(self.stdout, 1 << 20)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._died("worker exited")
            return
        self.inbuf += chunk
        while True:
            nl = self.inbuf.find(b"\n")
            if nl < 0:
                if len(self.inbuf) > MAX_LINE:
                    self._died("worker sent an over-long line")
                return
            line = bytes(self.inbuf[:nl])
            del self.inbuf[: nl + 1]
            try:
                data = json.loads(line)
                qid = data.pop("qid")
            except (ValueError, KeyError, AttributeError):
                self._died("worker sent an unreadable line")
                return
            if qid in self.jobs:
                self._job_done(qid)
                self._deliver(qid, data)
            if self.retiring and not self.jobs:
                self.close()
                return

    def _job_done(self, qid: str) -> None:
        self.jobs.discard(qid)
        timer = self.deadlines.pop(qid, None)
        if timer is not None:
            timer.cancel()

    def _deliver(self, qid: str, data: dict[str, Any]) -> None:
        try:
            self.pool.on_result(qid, data)
        except Exception:  # one result that cannot be applied must not hold up the others
            log.exception("%s: applying the scan result failed", qid)

    def _overdue(self, qid: str) -> None:
        self.deadlines.pop(qid, None)
        if qid in self.jobs and not self.dead:
            log.error("scanner worker %d: no result for %s in %ds; replacing it", self.proc.pid, qid,
                      self.pool.job_timeout)
            self.proc.kill()
            self._died("job timeout")

    def _died(self, why: str) -> None:
        if self.dead:
            return
        log.error("scanner worker %d: %s (exit status %s)", self.proc.pid, why, self.proc.poll())
        jobs, self.jobs = self.jobs, set()
        for timer in self.deadlines.values():
            timer.cancel()
        self.deadlines.clear()
        self.close()
        self.pool.worker_gone(self)
        for qid in jobs:
            self._deliver(qid, {"error": f"scanner worker died: {why}"})

    def close(self) -> None:
        """Close the worker's stdin: it finishes what it has and exits."""
        if self.dead:
            return
        self.dead = True
        loop = self.pool.loop
        loop.forget(self.stdout)
        loop.forget(self.stdin)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except OSError:
                pass
        self.pool.reap(self)


class WorkerPool:
    def __init__(self, loop: EventLoop, config_path: str, size: int, on_result: ResultCallback,
                 job_timeout: float = 600.0) -> None:
        self.loop = loop
        self.job_timeout = job_timeout
        self.config_path = config_path
        self.size = max(1, size)
        self.on_result = on_result
        self.workers: list[Worker] = []
        self.exiting: list[subprocess.Popen] = []

    def submit(self, qid: str, payload: dict[str, Any]) -> None:
        live = [w for w in self.workers if not w.dead and not w.retiring]
        if len(live) < self.size:
            worker = Worker(self)
            self.workers.append(worker)
            live.append(worker)
        min(live, key=lambda w: len(w.jobs)).send(qid, payload)

    def worker_gone(self, worker: Worker) -> None:
        if worker in self.workers:
            self.workers.remove(worker)

    def reap(self, worker: Worker) -> None:
        """Collect exited workers without waiting for the ones still running."""
        self.worker_gone(worker)
        self.exiting.append(worker.proc)
        self.exiting = [p for p in self.exiting if p.poll() is None]

    def retire_all(self) -> None:
        """Reload: current workers finish their jobs and exit; new jobs get new workers."""
        for worker in list(self.workers):
            worker.retiring = True
            if not worker.jobs:
                worker.close()

    def stop(self, timeout: float = 5.0) -> list[str]:
        """Close every worker; returns the jobs that had no result."""
        pending = [qid for w in self.workers for qid in w.jobs]
        for worker in list(self.workers):
            for qid in list(worker.jobs):
                worker._job_done(qid)
            worker.close()
        for proc in self.exiting:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.exiting.clear()
        return pending
