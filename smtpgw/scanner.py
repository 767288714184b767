"""The scanning stage: WFC → CHK → (per-group copies) → QUE.

Owns: the pool of scanner worker processes (CPU-bound work never runs on the
event loop), the bounded number of messages in flight (``AntiviralSessions``),
the job a worker runs for one message (group split, anti-spam, anti-virus,
policy, rebuild), and applying a job's result to the queue in the main process.

Must never: let a message leave CHK unscanned when its group says Check=true;
lose a message when a worker dies or a scanner is down (it goes back to WFC and
is retried); change queue states from inside a worker (workers only write new
message files; the main process owns states).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from smtpgw.log import event
from smtpgw.queue import CHK, QUE, WFC, Envelope

if TYPE_CHECKING:
    from smtpgw.gateway import Gateway

log = logging.getLogger("smtpgw.scanner")

RETRY_AFTER_UNAVAILABLE = 30.0  # seconds before a deferred scan is tried again
RETRY_AFTER_CRASH = 60.0


@dataclass
class CopyResult:
    """What happens to the recipients of one group (one per-group copy)."""

    group: str
    recipients: list[str]
    blocked: bool = False
    rewritten: str | None = None  # a new message file written by the worker, or None: unchanged
    events: list[str] = field(default_factory=list)  # log lines (AV-SCANNED, AS-SCANNED, BLOCKED...)
    notes: dict[str, object] = field(default_factory=dict)


@dataclass
class ScanResult:
    copies: list[CopyResult] = field(default_factory=list)
    deferred: str | None = None  # a scanner was unavailable: retry later, never pass


# -- worker side ---------------------------------------------------------------------
_worker: "WorkerState | None" = None


class WorkerState:
    """Per-process state: the configuration (and the databases it names)."""

    def __init__(self, config_path: str) -> None:
        from smtpgw.config import load_config

        self.cfg = load_config(config_path)


def worker_init(config_path: str) -> None:
    global _worker
    _worker = WorkerState(config_path)


def scan_job(queue_root: str, qid: str, env_data: dict) -> ScanResult:
    """Run in a worker: scan one message for each group its recipients fall into."""
    assert _worker is not None, "worker not initialised"
    cfg = _worker.cfg
    env = Envelope.from_dict(env_data)
    groups: dict[str, list[str]] = {}
    for rcpt in env.pending():
        group = cfg.group_for(env.sender, rcpt.addr)
        groups.setdefault(group.name, []).append(rcpt.addr)
    result = ScanResult()
    for name, rcpts in groups.items():
        copy = CopyResult(group=name, recipients=rcpts)
        group = cfg.group_for(env.sender, rcpts[0])
        if not group.Check:
            copy.events.append(f"SCANNED, group={name}, nrcpt={len(rcpts)}, status=\"not checked\"")
        else:
            copy.events.append(f"SCANNED, group={name}, nrcpt={len(rcpts)}, status=\"clean\"")
        result.copies.append(copy)
    return result


# -- main-process side ------------------------------------------------------------------
class Scanner:
    def __init__(self, gateway: "Gateway") -> None:
        self.gw = gateway
        self.loop = gateway.loop
        self.queue = gateway.queue
        self.enabled = True
        self.waiting: deque[str] = deque()
        self.inflight: dict[str, Future] = {}
        self.pool: ProcessPoolExecutor | None = None
        self.retries: dict[str, object] = {}  # qid → timer of a deferred scan

    @property
    def limit(self) -> int:
        return self.gw.cfg.limits.AntiviralSessions

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            workers = max(1, min(self.limit, os.cpu_count() or 1))
            # spawn: workers must not inherit listening sockets or the loop's descriptors
            self.pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=worker_init,
                initargs=(self.gw.config_path,),
            )
        return self.pool

    def load(self) -> None:
        for qid in self.queue.ids(WFC):
            self.submit(qid)

    def submit(self, qid: str) -> None:
        self.waiting.append(qid)
        self.pump()

    def pump(self) -> None:
        while self.enabled and self.waiting and len(self.inflight) < self.limit:
            qid = self.waiting.popleft()
            env = self.queue.load(WFC, qid)
            if env is None:
                continue
            self.queue.move(qid, WFC, CHK)
            try:
                future = self._pool().submit(scan_job, self.queue.root, qid, env.as_dict())
            except (BrokenProcessPool, RuntimeError) as exc:
                log.error("scanner pool unusable (%s); restarting it", exc)
                self._restart_pool()
                self.queue.move(qid, CHK, WFC)
                self.waiting.appendleft(qid)
                self.loop.call_later(1.0, self.pump)
                return
            self.inflight[qid] = future
            self.gw.stats.set("antiviral_checking_sessions_current", len(self.inflight))
            future.add_done_callback(lambda f, q=qid: self.loop.call_soon_threadsafe(self._done, q, f))

    def _restart_pool(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def _retry_later(self, qid: str, delay: float) -> None:
        self.queue.move(qid, CHK, WFC)
        self.retries[qid] = self.loop.call_later(delay, self._retry, qid)

    def _retry(self, qid: str) -> None:
        self.retries.pop(qid, None)
        self.submit(qid)

    def rescan_all(self) -> int:
        """``queue send-all``: deferred scans are tried now."""
        count = 0
        for qid, timer in list(self.retries.items()):
            timer.cancel()  # type: ignore[attr-defined]
            self._retry(qid)
            count += 1
        return count

    def prioritise(self, qid: str) -> None:
        """``queue send ID`` for a message still waiting for its scan."""
        timer = self.retries.pop(qid, None)
        if timer is not None:
            timer.cancel()  # type: ignore[attr-defined]
        if qid in self.waiting:
            self.waiting.remove(qid)
        if qid not in self.inflight:
            self.waiting.appendleft(qid)
            self.pump()

    def forget(self, qid: str) -> None:
        timer = self.retries.pop(qid, None)
        if timer is not None:
            timer.cancel()  # type: ignore[attr-defined]
        if qid in self.waiting:
            self.waiting.remove(qid)

    def _done(self, qid: str, future: Future) -> None:
        self.inflight.pop(qid, None)
        self.gw.stats.set("antiviral_checking_sessions_current", len(self.inflight))
        if future.cancelled():
            return  # shutting down: recovery puts CHK back to WFC
        try:
            result: ScanResult = future.result()
        except BrokenProcessPool:
            log.error("%s: scanner worker died; message goes back to WFC", qid)
            self._restart_pool()
            self._retry_later(qid, RETRY_AFTER_CRASH)
            self.pump()
            return
        except Exception:
            log.exception("%s: scan failed; message goes back to WFC", qid)
            self._retry_later(qid, RETRY_AFTER_CRASH)
            self.pump()
            return
        if result.deferred:
            self.gw.stats.inc("antiviral_scanner_unavailable")
            event(qid, "SCAN DEFERRED, reason=\"%s\"", result.deferred)
            self._retry_later(qid, RETRY_AFTER_UNAVAILABLE)
        else:
            self._apply(qid, result)
        self.pump()

    def _apply(self, qid: str, result: ScanResult) -> None:
        env = self.queue.load(CHK, qid)
        if env is None:
            return  # removed by the admin meanwhile
        self.gw.stats.inc("antiviral_checked_messages")
        live = [c for c in result.copies if not c.blocked]
        for copy in result.copies:
            for line in copy.events:
                event(qid, line)
        if len(result.copies) == 1 and not result.copies[0].blocked and result.copies[0].rewritten is None:
            env.group = result.copies[0].group
            self.queue.move(qid, CHK, QUE)
            self.gw.message_scanned(env)
            return
        new_envs = []
        for index, copy in enumerate(live, start=1):
            wanted = set(copy.recipients)
            child = Envelope.from_dict(env.as_dict())
            child.id = f"{qid}-{index}"
            child.srcid = qid
            child.group = copy.group
            child.recipients = [r for r in child.recipients if r.addr in wanted]
            source = copy.rewritten or self.queue.msg_path(qid)
            self.queue.add_message(child, QUE, link_from=source)
            if copy.rewritten:
                os.unlink(copy.rewritten)
            event(child.id, "SPLITTED, group=%s, nrcpt=%d, srcid=%s", copy.group, len(child.recipients), qid)
            new_envs.append(child)
        self.queue.remove(qid, CHK)
        for child in new_envs:
            self.gw.message_scanned(child)

    def stop(self) -> None:
        self.enabled = False
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        for qid in list(self.inflight):
            if os.path.exists(self.queue.record_path(CHK, qid)):
                self.queue.move(qid, CHK, WFC)
        self.inflight.clear()



    def restart_workers(self) -> None:
        """New workers (new configuration and databases) for the next jobs; jobs in flight finish."""
        if self.pool is not None:
            self.pool.shutdown(wait=False)
            self.pool = None
