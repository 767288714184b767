"""Scanner worker processes and the line protocol the event loop speaks with them.

Owns: starting ``python3 -m smtpgw.scan.job --snapshot FILE`` worker processes (about one
per core); the backlog of jobs no worker has taken yet; handing a ready worker its
jobs as JSON lines on its stdin — the one it runs and the next one (``PREFETCH``), so
that it starts that one as soon as it has written a result instead of idling while
the loop reads the result and sends another — and reading its one JSON line of result
per job from its stdout, non-blocking on the event loop; the job deadline, which
starts when the worker starts the job (it runs them in the order sent); replacing a
worker that dies or overruns the deadline (only the job it was running is reported
as failed, with ``started``; the job it had not started yet goes back to the front of
the backlog, the backlog to the next worker untouched); retiring workers on reload
(they finish their jobs, then exit).

Protocol: a worker writes ``{"ready": true}`` once it has loaded its configuration
and databases, then one ``{"qid": ..., ...}`` result line per job line it read.

Must never: block the loop on a worker, blame a job a worker had not started when it
died, or lose track of a job: every job submitted and not cancelled gets exactly
one ``on_result`` call (a result or an error).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections import deque
from typing import Any, Callable

from smtpgw import child_command, child_environment
from smtpgw.net.loop import EventLoop, Timer

log = logging.getLogger("smtpgw.scan.workers")

MAX_LINE = 64 * 1024 * 1024  # a result line larger than this is a broken worker
START_PAUSE = 5.0  # seconds without a new worker after one could not start
# jobs a worker holds: the one it runs and the next, waiting in its stdin (a worker that has
# written a result reads its next job at once, while the loop is still busy with the result);
# each worker gets its first job before any gets a second
PREFETCH = 2

ResultCallback = Callable[[str, dict[str, Any]], None]
WORKER_CONFIG = ".worker-config"  # in QueuePath: the configuration the gateway accepted, for its workers


def worker_config_path(queue_root: str) -> str:
    """Where the gateway leaves the (pickled) configuration its scanner workers load."""
    return os.path.join(queue_root, WORKER_CONFIG)


class Worker:
    """One worker process: it runs its ``jobs`` one at a time, in order; the first is the one
    it runs (``job``), the others wait in its stdin."""

    def __init__(self, pool: "WorkerPool") -> None:
        self.pool = pool
        self.proc = subprocess.Popen(
            child_command("smtpgw.scan.job", "--snapshot", pool.config_path),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_environment(), close_fds=True, cwd="/",
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin = self.proc.stdin.fileno()
        self.stdout = self.proc.stdout.fileno()
        os.set_blocking(self.stdin, False)
        os.set_blocking(self.stdout, False)
        self.jobs: deque[str] = deque()  # sent to this worker, the one it runs first
        self.payloads: dict[str, dict[str, Any]] = {}  # of its jobs: one it had not started goes to another
        self.deadline: Timer | None = None
        self.out = bytearray()
        self.inbuf = bytearray()
        self.ready = False  # it said it loaded its configuration and databases
        self.retiring = False
        self.dead = False
        pool.loop.add_reader(self.stdout, self._readable)

    @property
    def job(self) -> str | None:
        """The job this worker runs (None: it has none)."""
        return self.jobs[0] if self.jobs else None

    def room(self) -> int:
        """Jobs this worker may be sent now."""
        if not self.ready or self.retiring or self.dead:
            return 0
        return PREFETCH - len(self.jobs)

    def send(self, qid: str, payload: dict[str, Any]) -> None:
        """Give this worker a job: it runs it after those it has (its deadline starts then)."""
        self.jobs.append(qid)
        self.payloads[qid] = payload
        if len(self.jobs) == 1:
            self._started()
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
        if self.dead:
            return
        if self.out:
            self.pool.loop.add_writer(self.stdin, self._flush)
        else:
            self.pool.loop.remove_writer(self.stdin)

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
        while not self.dead:
            nl = self.inbuf.find(b"\n")
            if nl < 0:
                if len(self.inbuf) > MAX_LINE:
                    self._died("worker sent an over-long line")
                return
            line = bytes(self.inbuf[:nl])
            del self.inbuf[: nl + 1]
            try:
                data = json.loads(line)
                if not self.ready and data.get("ready") is True:
                    self.ready = True
                    self.pool.dispatch()
                    continue
                qid = data.pop("qid")
            except (ValueError, KeyError, AttributeError):
                self._died("worker sent an unreadable line")
                return
            if qid == self.job:
                self._job_done()
                self.pool.dispatch()  # its next job is sent before the loop applies this result
                self.pool.deliver(qid, data)
            if self.retiring and self.job is None:
                self.close()
                return
            self.pool.dispatch()

    def _started(self) -> None:
        """The worker starts its first job now: its deadline runs from here."""
        # a job that takes far longer than any scan may means a stuck worker: it is replaced
        self.deadline = self.pool.loop.call_later(self.pool.job_timeout, self._overdue, self.jobs[0])

    def _job_done(self) -> None:
        if self.jobs:
            self.payloads.pop(self.jobs.popleft(), None)
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if self.jobs:
            self._started()

    def _overdue(self, qid: str) -> None:
        self.deadline = None
        if qid == self.job and not self.dead:
            log.error("scanner worker %d: no result for %s in %ds; replacing it", self.proc.pid, qid,
                      self.pool.job_timeout)
            self.proc.kill()
            self._died("job timeout")

    def _died(self, why: str) -> None:
        if self.dead:
            return
        job = self.job
        log.error("scanner worker %d: %s (exit status %s)%s", self.proc.pid, why, self.proc.poll(),
                  f" while scanning {job}" if job else "")
        unstarted = [(qid, self.payloads[qid]) for qid in list(self.jobs)[1:]]
        self.jobs.clear()
        self.payloads.clear()
        self._job_done()
        started = self.ready
        self.close()
        # the jobs it had not started are no one's fault: first in line for the next worker
        self.pool.backlog.extendleft(reversed(unstarted))
        if job is not None:
            # only the job it was running is suspect; the backlog goes to the next worker
            self.pool.deliver(job, {"error": f"scanner worker died: {why}", "started": True})
        elif not started:
            self.pool.start_failed()
        self.pool.dispatch()

    def close(self) -> None:
        """Close the worker's stdin: it finishes what it has and exits."""
        if self.dead:
            return
        self.dead = True
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
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
        self.backlog: deque[tuple[str, dict[str, Any]]] = deque()  # jobs no worker has taken yet
        self.start_failed_at = float("-inf")

    def submit(self, qid: str, payload: dict[str, Any]) -> None:
        self.backlog.append((qid, payload))
        self.dispatch()

    def cancel(self, qid: str) -> bool:
        """Withdraw a job no worker has taken: True when it was still waiting (it gets no
        ``on_result``); False when a worker has it, running or next in its line (its result is
        still delivered)."""
        for item in self.backlog:
            if item[0] == qid:
                self.backlog.remove(item)
                return True
        return False

    def running(self) -> list[str]:
        """The jobs the workers have (running, or next in their line)."""
        return [qid for w in self.workers for qid in w.jobs]

    def dispatch(self) -> None:
        """Hand waiting jobs to workers, starting workers up to ``size`` as needed: first a job to
        each worker that has none, then (beyond the jobs left for the workers being started)
        each worker its next one, ``PREFETCH`` at most. Under load it is mostly called with every
        worker holding all it may (after each result, each job submitted): that is answered first."""
        if not self.backlog or (len(self._live()) >= self.size and not any(w.room() > 0 for w in self.workers)):
            return  # nothing waits, or no worker has room and no other may be started
        self._hand_out(lambda w: not w.jobs)
        live = self._live()
        starting = sum(1 for w in live if not w.ready)
        try:
            while (len(self.backlog) > starting and len(live) < self.size
                   and time.monotonic() - self.start_failed_at >= START_PAUSE):
                worker = Worker(self)
                self.workers.append(worker)
                live.append(worker)
                starting += 1
        except OSError as exc:
            log.error("cannot start a scanner worker: %s", exc)
            self.start_failed_at = time.monotonic()
        self._hand_out(lambda w: True, keep=starting)
        if self.backlog and not live:
            self._fail_backlog("no scanner worker could be started")

    def _live(self) -> list[Worker]:
        """The workers that take jobs, or will once they are ready (not retiring, not dead)."""
        return [w for w in self.workers if not w.dead and not w.retiring]

    def _hand_out(self, eligible: Callable[[Worker], bool], keep: int = 0) -> None:
        """Send backlog jobs (all but ``keep``) to the ``eligible`` workers with room, the one with
        the fewest jobs first."""
        while len(self.backlog) > keep:
            worker = min((w for w in self.workers if w.room() > 0 and eligible(w)),
                         key=lambda w: len(w.jobs), default=None)
            if worker is None:
                return
            qid, payload = self.backlog.popleft()
            worker.send(qid, payload)

    def start_failed(self) -> None:
        """A worker exited before it was ready: no new one for a while; when none is left,
        the waiting jobs fail (not started, so nobody is blamed) and are retried later."""
        self.start_failed_at = time.monotonic()

    def _fail_backlog(self, why: str) -> None:
        failed, self.backlog = list(self.backlog), deque()
        for qid, _ in failed:
            # later, not from inside dispatch: the caller may submit again from on_result
            self.loop.call_soon(self.deliver, qid, {"error": why, "started": False})

    def deliver(self, qid: str, data: dict[str, Any]) -> None:
        try:
            self.on_result(qid, data)
        except Exception:  # one result that cannot be applied must not hold up the others
            log.exception("%s: applying the scan result failed", qid)

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
            if worker.job is None:
                worker.close()
        self.dispatch()

    def stop(self, timeout: float = 5.0) -> list[str]:
        """Close every worker; returns the jobs that had no result."""
        pending = [qid for qid, _ in self.backlog] + self.running()
        self.backlog.clear()
        for worker in list(self.workers):
            worker.jobs.clear()
            worker.payloads.clear()
            worker._job_done()
            worker.close()
        for proc in self.exiting:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.exiting.clear()
        return pending
