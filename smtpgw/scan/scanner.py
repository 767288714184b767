"""The scanning stage: WFC → CHK → (per-group copies) → QUE.

Owns: the pool of scanner worker processes (CPU-bound work never runs on the
event loop), the DKIM key lookups of a message to be spam-checked before its
job goes to a worker (``smtpgw.scan.dkimkeys``; the worker verifies), the
bounded number of messages in flight (``AntiviralSessions``),
the job a worker runs for one message (group split, anti-spam, anti-virus,
policy, rebuild), applying a job's result to the queue in the main process (what
needs an fsync — a new header in the QUE record, a rewritten message, per-group
copies, notifications — in an I/O thread), and in-flow control: holding new MAIL
commands while messages wait for a scan slot (``admit``, ``InFlowDelay``).

A scan that kills or hangs its worker, or fails, counts against the message
(``scan_attempts`` in its record, durable before the retry); at
``MaximalScanAttempts`` the message is kept in quarantine with status error
(ERR) and the admin is notified. A scanner that is unavailable (SCAN DEFERRED)
is no attempt. A message the admin removes while in CHK has its result
discarded when it comes back.

Must never: let a message leave CHK unscanned when its group says Check=true;
lose a message when a worker dies or a scanner is down (it goes back to WFC and
is retried, or to quarantine at the cap, never dropped); change queue states
from inside a worker (workers only write new message files; the main process
owns states); bring back a message the admin removed.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any, Callable, Protocol

from smtpgw.config import Config
from smtpgw.log import event
from smtpgw.mail import headers
from smtpgw.net.loop import EventLoop
from smtpgw.reports import notify
from smtpgw.scan.dkimkeys import FailedKeys, KeyFetch, fetch_keys
from smtpgw.scan.results import CopyResult, ScanResult, not_scanned, templates_path
from smtpgw.scan.workers import ResultCallback, WorkerPool, worker_config_path
from smtpgw.spool.durable import fsync_file, write_durably
from smtpgw.spool.queue import CHK, QUE, SPL, STAGED, WFC, WFS, Committer, Envelope, Queue, Recipient, new_id
from smtpgw.spool.store import Store
from smtpgw.stats import Stats

log = logging.getLogger("smtpgw.scan.scanner")

RETRY_AFTER_UNAVAILABLE = 30.0  # seconds before a deferred scan is tried again
RETRY_AFTER_CRASH = 60.0
HEAD_BYTES = 64 * 1024  # read of a message for the Subject quoted in the admin's notice
MAX_REASON = 500  # characters of a failed scan's reason kept in the record
MAX_KEY_LOOKUPS = 256  # messages whose DKIM keys are being looked up at once (beside the workers' jobs)


class Scanning(Protocol):
    """What the scanning stage needs from the process it runs in: the configuration in force, the
    loop, the spool and its committer (the I/O threads that apply a rewritten result), the
    counters, and where a scanned message (or a notice) goes next."""

    cfg: Config
    loop: EventLoop
    queue: Queue
    committer: Committer
    stats: Stats

    def message_scanned(self, env: Envelope) -> None:
        """``env`` is in QUE, ready for the Sender."""

    # and, when it has one, ``resolver`` (smtpgw.net.dns.Resolver): the DKIM key lookups go
    # through it; without one the signatures are read, not verified


class JobPool(Protocol):
    """The workers that run scan jobs (``scan/workers.WorkerPool``): one result per job submitted
    and not cancelled, through the callback the pool was made with."""

    def submit(self, qid: str, payload: dict[str, Any]) -> None: ...

    def cancel(self, qid: str) -> bool: ...

    def retire_all(self) -> None: ...

    def stop(self) -> list[str]: ...


# make_pool(loop, worker config file, workers, on_result, job timeout)
PoolFactory = Callable[[EventLoop, str, int, ResultCallback, float], JobPool]


class Scanner:
    def __init__(self, host: Scanning, make_pool: PoolFactory = WorkerPool) -> None:
        self.host = host
        self.loop = host.loop
        self.queue = host.queue
        self.enabled = True
        self.waiting: deque[str] = deque()
        self.envelopes: dict[str, Envelope] = {}  # known WFC records, to spare a re-read
        self.scanning: dict[str, Envelope] = {}  # the records (in CHK) of the messages the workers have
        self.inflight: set[str] = set()
        self.retries: dict[str, Any] = {}  # qid → timer of a deferred scan
        self.removed: set[str] = set()  # removed by the admin while a worker scans them
        self.applying: set[str] = set()  # results being written by an I/O thread (in inflight too)
        self.flow_waiters: deque[list[Any]] = deque()  # [callback, timer] of MAIL commands held back
        self.flow_first: deque[list[Any]] = deque()  # the same for a session's first message: let go first
        self.lookups: dict[str, KeyFetch] = {}  # DKIM key lookups of messages in CHK, before their job
        self.failed_keys = FailedKeys(self.loop)  # DKIM key names whose lookup failed lately
        workers = max(1, min(self.limit, os.cpu_count() or 1))
        # a job gets three times the clamd time limit (at least 5 minutes) before its worker is replaced
        job_timeout = max(300.0, 3.0 * float(host.cfg.ave.ScanTimeout or 0))
        self.pool = make_pool(self.loop, worker_config_path(host.queue.root), workers, self._done, job_timeout)

    @property
    def limit(self) -> int:
        return self.host.cfg.limits.AntiviralSessions

    @property
    def max_attempts(self) -> int:
        return self.host.cfg.limits.MaximalScanAttempts

    def load(self) -> None:
        """At start: messages waiting for a split or a scan (recovery turned SPL into WFS)."""
        for qid in self.queue.ids(WFS):
            self.queue.move(qid, WFS, WFC)  # split again: the copies' IDs are the same each time
        waiting = self.queue.ids(WFC)
        originals = set(waiting)
        for qid in waiting:
            if qid.rpartition("-")[0] in originals:
                continue  # a copy made before a crash cut its split short: the split makes it again
            env = self.queue.load(WFC, qid)
            if env is not None:
                self.accept(env)

    def accept(self, env: Envelope) -> None:
        """A message in WFC: split it when its recipients fall into several groups, then scan."""
        groups: dict[str, list[str]] = {}
        for rcpt in env.pending():
            group = self.host.cfg.group_for(env.sender, rcpt.addr, env.client_ip)
            groups.setdefault(group.name, []).append(rcpt.addr)
        if len(groups) < 2:
            self.submit(env.id, env)
            return
        # kmg-spec §1.5 step 4: one virtual copy per group, WFC → WFS → SPL → copies in WFC; the
        # copies (a link and a record each, with their fsyncs) are made in an I/O thread
        try:
            self.queue.move(env.id, WFC, WFS)
            self.queue.move(env.id, WFS, SPL)
        except OSError as exc:
            self._split_failed(env.id, exc)
            return
        self.host.committer.call(lambda: self._split(env, groups),
                                 lambda children, error: self._split_written(env.id, children, error))

    def _split(self, env: Envelope, groups: dict[str, list[str]]) -> list[Envelope]:
        """(I/O thread) The copies in WFC, then the original out of SPL."""
        children = []
        for index, (name, rcpts) in enumerate(groups.items(), start=1):
            child = Envelope.from_dict(env.as_dict())
            child.id, child.srcid, child.group = f"{env.id}-{index}", env.id, name
            wanted = set(rcpts)
            child.recipients = [r for r in child.recipients if r.addr in wanted]
            self.queue.add_message(child, WFC, link_from=self.queue.msg_path(env.id))
            event(child.id, "SPLITTED, group=%s, nrcpt=%d, srcid=%s", name, len(child.recipients), env.id)
            children.append(child)
        self.queue.remove(env.id, SPL)
        return children

    def _split_written(self, qid: str, children: list[Envelope] | None, error: BaseException | None) -> None:
        if error is not None:
            self._split_failed(qid, error)
            return
        for child in children or ():
            self.submit(child.id, child)

    def _split_failed(self, qid: str, error: BaseException) -> None:
        """Done again from wherever it stopped (the copy IDs do not change)."""
        log.error("%s: cannot split per group: %s", qid, error)
        self._retry_later(qid, RETRY_AFTER_CRASH)

    def submit(self, qid: str, env: Envelope | None = None) -> None:
        if env is not None and len(self.envelopes) < self.host.cfg.limits.MaximalEnvelopesInMemory:
            self.envelopes[qid] = env  # beyond the bound it is read from WFC when its turn comes
        self.waiting.append(qid)
        self.pump()

    def admit(self, callback: Callable[[], None], first: bool = False) -> bool:
        """In-flow control (``InFlowDelay``, as Postfix's in_flow_delay): True when a new message
        may come now; False while messages wait for a scan slot, and ``callback`` runs when one
        of them has left the wait or after InFlowDelay seconds, whichever is first. Mail then
        arrives at the rate it is scanned instead of piling up. Held MAILs go in the order they
        came, the ``first`` message of a session ahead of the next messages of sessions that
        already sent some: a client that sends one message waits for one scan slot, not behind
        every message of a bulk sender's open sessions."""
        delay = self.host.cfg.limits.InFlowDelay
        if not delay or not self.enabled or not self.waiting:
            return True
        entry: list[Any] = [callback, None]
        entry[1] = self.loop.call_later(delay, self._flow_release, entry)
        (self.flow_first if first else self.flow_waiters).append(entry)
        return False

    @property
    def holding(self) -> bool:
        """MAIL commands are held (``admit``)."""
        return bool(self.flow_first or self.flow_waiters)

    def _flow_release(self, entry: list[Any] | None = None) -> None:
        """Let one held MAIL go: ``entry`` (its delay is over), else the first held."""
        if entry is None:
            entry = (self.flow_first or self.flow_waiters).popleft()
            entry[1].cancel()
        elif entry in self.flow_first:
            self.flow_first.remove(entry)
        elif entry in self.flow_waiters:
            self.flow_waiters.remove(entry)
        else:
            return
        self.loop.call_soon(entry[0])

    def pump(self) -> None:
        # a message whose DKIM keys are being looked up holds no worker: slow DNS (a flood of mail
        # signed by domains whose nameservers never answer) must not starve the scans
        while self.enabled and self.waiting and len(self.inflight) - len(self.lookups) < self.limit \
                and len(self.lookups) < MAX_KEY_LOOKUPS:
            qid = self.waiting.popleft()
            if self.holding:
                self._flow_release()
            env = self.envelopes.pop(qid, None) or self.queue.load(WFC, qid)
            if env is None:
                continue
            groups: dict[str, list[str]] = {}
            unchecked = True
            for rcpt in env.pending():
                group = self.host.cfg.group_for(env.sender, rcpt.addr, env.client_ip)
                groups.setdefault(group.name, []).append(rcpt.addr)
                unchecked = unchecked and not group.Check
            try:
                if unchecked:  # nothing to scan: no need for a worker (nor for CHK, see _apply)
                    self._apply(qid, ScanResult([not_scanned(name, rcpts) for name, rcpts in groups.items()]), env, WFC)
                    continue
                self.queue.move(qid, WFC, CHK)
                if env.scan_attempts >= self.max_attempts:  # reached before a restart, or the cap was lowered
                    self._give_up(env)
                    continue
                self.inflight.add(qid)
                self.scanning[qid] = env
                self._start_job(qid, env)
            except OSError as exc:  # no worker could be started, or the disk refused the rename
                log.error("%s: cannot start its scan: %s", qid, exc)
                self.inflight.discard(qid)
                self.scanning.pop(qid, None)
                self._retry_later(qid, RETRY_AFTER_CRASH)
        while self.holding and not self.waiting:  # nothing waits for a scan: no reason to hold
            self._flow_release()
        self.host.stats.set("antiviral_checking_sessions_current", len(self.inflight) - len(self.lookups))

    def _start_job(self, qid: str, env: Envelope) -> None:
        """Hand the message to a worker; a message that will be spam-checked first has the DKIM keys
        of its signatures looked up ([smtpgw.antispam] DKIMVerify), for the worker to verify them
        (the RSA work is the worker's). A lookup that fails is an answer too: never a deferral."""
        payload: dict[str, Any] = {"env": env.as_dict()}
        antispam = self.host.cfg.antispam
        resolver = getattr(self.host, "resolver", None)
        if not (antispam.Check and antispam.DKIMVerify and resolver is not None):
            self.pool.submit(qid, payload)
            return
        payload["dkim"] = {}
        if env.dkim_signed is False:  # the receiver saw no DKIM-Signature in its header: no read of msg/ID
            self.pool.submit(qid, payload)
            return

        def fetched(keys: dict[str, Any]) -> None:
            self.lookups.pop(qid, None)
            payload["dkim"] = keys
            self.pool.submit(qid, payload)
            self.pump()  # a lookup's place is free

        lookup = fetch_keys(self.loop, resolver, self.queue.msg_path(qid), antispam.DKIMLookupTimeout, fetched,
                            self.failed_keys)
        if lookup is None:
            self.pool.submit(qid, payload)
        else:
            self.lookups[qid] = lookup

    def _retry_later(self, qid: str, delay: float) -> None:
        """Back to WFC (wherever the record got to) and a new scan after ``delay``."""
        self.retries[qid] = self.loop.call_later(delay, self._retry, qid)
        self._back_to_wfc(qid)

    def _back_to_wfc(self, qid: str) -> str | None:
        """Move a record left in CHK, WFS or SPL back to WFC; returns its state, "" when the disk refused."""
        state = self.queue.find(qid)
        if state in (CHK, WFS, SPL):
            try:
                self.queue.move(qid, state, WFC)
            except OSError as exc:
                log.error("%s: cannot move back to WFC: %s", qid, exc)
                return ""
        return state

    def _retry(self, qid: str) -> None:
        self.retries.pop(qid, None)
        state = self._back_to_wfc(qid)
        if state == "":
            self.retries[qid] = self.loop.call_later(RETRY_AFTER_CRASH, self._retry, qid)
            return
        if state is not None:
            env = self.queue.load(WFC, qid)
            if env is not None:
                self.accept(env)

    def rescan_all(self) -> int:
        """``queue send-all``: deferred scans are tried now."""
        count = 0
        for qid, timer in list(self.retries.items()):
            timer.cancel()
            self._retry(qid)
            count += 1
        return count

    def prioritise(self, qid: str) -> None:
        """``queue send ID`` for a message still waiting for its scan."""
        self.forget(qid)
        if qid not in self.inflight:
            self.waiting.appendleft(qid)
            self.pump()

    def forget(self, qid: str) -> None:
        timer = self.retries.pop(qid, None)
        if timer is not None:
            timer.cancel()
        if qid in self.waiting:
            self.waiting.remove(qid)
        self.envelopes.pop(qid, None)

    def cancel(self, qid: str) -> None:
        """``queue remove ID``: the message is no longer scanned; a scan a worker runs for it
        goes on, and its result is discarded when it comes back."""
        self.forget(qid)
        if qid not in self.inflight:
            return
        lookup = self.lookups.pop(qid, None)
        if lookup is not None:
            lookup.cancel()
        if lookup is not None or self.pool.cancel(qid):  # no worker had taken it: no result will come
            self.inflight.discard(qid)
            self.scanning.pop(qid, None)
            self.loop.call_soon(self.pump)
        else:
            self.removed.add(qid)

    def _done(self, qid: str, answer: dict[str, Any]) -> None:
        self.inflight.discard(qid)
        env = self.scanning.pop(qid, None)  # as it is in CHK: no need to read it again
        if qid in self.removed:
            self.removed.discard(qid)
            self._discard(qid, answer)
        elif "error" in answer:
            self._failed(qid, answer)
        else:
            result = ScanResult.from_dict(answer)
            if result.deferred:
                self.host.stats.inc("antiviral_scanner_unavailable")
                event(qid, 'SCAN DEFERRED, reason="%s"', result.deferred)
                self._retry_later(qid, RETRY_AFTER_UNAVAILABLE)
            else:
                try:
                    self._apply(qid, result, env)
                except OSError as exc:  # the disk refused a step: the scan is done again later
                    log.error("%s: cannot apply the scan result: %s", qid, exc)
                    self._retry_later(qid, RETRY_AFTER_CRASH)
        self.pump()

    def _discard(self, qid: str, answer: dict[str, Any]) -> None:
        """The result of a scan of a message removed meanwhile: the files it made go too."""
        try:
            copies = [] if "error" in answer else ScanResult.from_dict(answer).copies
        except (TypeError, ValueError):
            copies = []
        tmp = os.path.join(self.queue.root, "tmp")
        for copy in copies:
            paths = [copy.rewritten] + [note.get("path") for note in copy.notes.get("notifications", [])]
            for path in paths:
                if isinstance(path, str) and os.path.dirname(path) == tmp:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
        event(qid, 'SCAN DISCARDED, reason="removed while being scanned"')

    def _failed(self, qid: str, answer: dict[str, Any]) -> None:
        """No result: a worker died or overran its time with this message, or its scan failed."""
        why = str(answer["error"])
        if not answer.get("started", True):  # no worker took it: nothing to hold against the message
            log.error("%s: not scanned (%s); the message goes back to WFC", qid, why)
            self._retry_later(qid, RETRY_AFTER_CRASH)
            return
        try:
            env = self._count_attempt(qid, why)
            if env is not None and env.scan_attempts >= self.max_attempts:
                self._give_up(env)
                return
        except OSError as exc:  # the record stays as it was; the next failure counts again
            log.error("%s: cannot record the failed scan: %s", qid, exc)
        self._retry_later(qid, RETRY_AFTER_CRASH)

    def _count_attempt(self, qid: str, why: str) -> Envelope | None:
        """One more failed scan in the record in CHK, on disk before anything else: a restart
        keeps the count. None when the record is gone."""
        env = self.queue.load(CHK, qid)
        if env is None:
            return None
        env.scan_attempts += 1
        env.scan_error = why[:MAX_REASON]
        self.queue.update(CHK, env)
        event(qid, 'SCAN FAILED, attempt=%d, max=%d, reason="%s"', env.scan_attempts, self.max_attempts,
              env.scan_error, level=logging.WARNING)
        return env

    def _give_up(self, env: Envelope) -> None:
        """``MaximalScanAttempts`` reached (the record is in CHK): the message is kept in the
        group's quarantine with status ERR and taken out of the queue once that copy is durable;
        the admin is notified. Never delivered unscanned, never dropped (a disk error raises
        OSError and the message stays queued)."""
        rcpts = [r.addr for r in env.pending()]
        cfg = self.host.cfg
        group = cfg.group_for(env.sender, rcpts[0], env.client_ip) if rcpts else cfg.policy
        reason = (f"scan failed {env.scan_attempts} times (MaximalScanAttempts={self.max_attempts}), "
                  f"last: {env.scan_error or 'unknown'}")
        folder = group.QuarantinePath or cfg.policy.QuarantinePath
        with self.queue.open_message(env) as message:
            item = Store(folder).put(env.id, message, env.as_dict(spool=False), "ERR", reason)
        log.error("%s: %s; kept in quarantine %s as item %s", env.id, reason, folder, item)
        copy = CopyResult(group=group.name, recipients=rcpts, blocked=True, notes={"status": "error"}, events=[
            ('AV-SCANNED, group=%s, status="error", names="", nrcpt=%d', [group.name, len(rcpts)]),
            ('BLOCKED, rcpt=%s, size=%d, reason="%s, quarantined as %s"', [rcpts, env.size, reason, item]),
        ])
        copy.notes["notifications"] = self._admin_notice(env, group, reason)
        self._apply(env.id, ScanResult([copy]), env)

    def _admin_notice(self, env: Envelope, group: Any, reason: str) -> list[dict[str, Any]]:
        """The notification (notify.tmpl, FOR_ADMIN) about a message whose scan was given up,
        written to tmp/ as a worker writes its own (see ``_queue_notifications``)."""
        admin = group.AdminNotifyAddress or self.host.cfg.policy.AdminNotifyAddress
        sender = group.NotifyFromAddress or self.host.cfg.policy.NotifyFromAddress
        if not admin or not sender:
            return []
        head = self.queue.read_message(env, HEAD_BYTES).split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
        about = {
            "status": "error", "group": group.name, "queue_id": env.id, "blocked": True,
            "subject": headers.get_raw(head, "Subject") or b"",
            "objects": [{"name": "(whole message)", "status": "error", "viruses": [],
                         "action": f"kept in quarantine: {reason}"}],
        }
        locale = self.host.cfg.locale
        try:
            template = os.path.join(templates_path(self.host.cfg, group), "notify.tmpl")
            data = notify.build_notification("admin", env.as_dict(), about, sender, [admin], template,
                                             locale.DateFormat, locale.TimeFormat, time.time())
        except ValueError as exc:
            log.warning("%s: no admin notification: %s", env.id, exc)
            return []
        path = os.path.join(self.queue.root, "tmp", f"{env.id}.notify-error")
        write_durably(path, data)
        return [{"kind": "admin", "path": path, "from": sender, "to": [admin], "size": len(data)}]

    def _apply(self, qid: str, result: ScanResult, env: Envelope | None = None, state: str = CHK) -> None:
        """Turn a scan result into queue records: QUE copies, notifications; blocked copies end here.
        The verdicts are logged and counted here; what needs an fsync is written in an I/O thread
        (``_write_result``), so a virus storm with notifications on never stalls the loop. The
        record is in ``state``: CHK, or WFC for a message nothing scanned, which goes to QUE in
        one rename when it moves on as it came, and through CHK otherwise."""
        env = env or self.queue.load(CHK, qid)
        if env is None:
            return  # removed by the admin meanwhile
        self.host.stats.inc("antiviral_checked_messages")
        for copy in result.copies:
            for template, values in copy.events:
                event(qid, template, *values)
            self.host.stats.inc(f"antiviral_status_{str(copy.notes.get('status', 'clean')).replace(' ', '_')}")
            self.host.stats.inc("mta_blocked_messages", copy.blocked)
            if "spam_status" in copy.notes:
                self.host.stats.inc(f"antispam_status_{str(copy.notes['spam_status']).lower().replace(' ', '_')}")
        live = [c for c in result.copies if not c.blocked]
        notices = any(copy.notes.get("notifications") for copy in result.copies)
        if len(result.copies) == 1 and live and not live[0].changed and not notices:
            # one group, the message as it came: it keeps its ID, and moving on is one rename
            env.group = live[0].group
            self.queue.move(qid, state, QUE)
            self.host.message_scanned(env)
            return
        if state != CHK:
            self.queue.move(qid, state, CHK)
        self._write_result(env, result, live)

    def _write_result(self, env: Envelope, result: ScanResult, live: list[CopyResult]) -> None:
        """In an I/O thread: the notifications, then the message's way out of CHK — its rewritten
        bytes taking its place (``Queue.replace_and_move``: never the new bytes with the record
        still in CHK, which a restart would scan again), or one copy per group, or nothing when
        every copy was blocked. Until it is done the message counts as in flight (``queue
        remove`` waits for it, see ``cancel``); what was queued is scheduled on the loop after."""
        qid = env.id
        self.inflight.add(qid)
        self.applying.add(qid)

        notices: list[Envelope] = []  # queued by the I/O thread; read on the loop once it is done

        def write() -> list[Envelope]:
            for copy in result.copies:
                notices.extend(self._queue_notifications(env, copy))
            return self._leave_chk(env, live, len(result.copies))

        def done(moved: list[Envelope] | None, error: BaseException | None) -> None:
            self.inflight.discard(qid)
            self.applying.discard(qid)
            if qid in self.removed:  # removed by the admin meanwhile: what the step left goes too
                self.removed.discard(qid)
                self._discard_written(qid, moved or [])
                moved = []
            elif error is not None:  # the disk refused a step: the scan is done again later
                log.error("%s: cannot apply the scan result: %s", qid, error)
                self._retry_later(qid, RETRY_AFTER_CRASH)  # the copies made are made again, same IDs
                moved = []
            for ready in (*notices, *(moved or [])):
                self.host.message_scanned(ready)
            self.pump()

        self.host.committer.call(write, done)

    def _leave_chk(self, env: Envelope, live: list[CopyResult], copies: int) -> list[Envelope]:
        """(I/O thread) The message out of CHK with its ``live`` (not blocked) copies of ``copies``:
        the records now in QUE, none when all were blocked."""
        qid = env.id
        if copies == 1 and live:
            env.group = live[0].group  # one group: the message keeps its ID
            if live[0].head is not None:  # only the header changed: it travels in the record
                self.queue.replace_head_and_move(env, CHK, QUE, live[0].head, live[0].body_offset,
                                                 self.host.committer.sync_folder)
            elif live[0].rewritten:
                self.queue.replace_and_move(env, CHK, QUE, live[0].rewritten, self.host.committer.sync_folder)
            else:
                self.queue.move(qid, CHK, QUE)
            return [env]
        children = []
        for index, copy in enumerate(live, start=1):
            wanted = set(copy.recipients)
            child = Envelope.from_dict(env.as_dict())
            child.id = f"{qid}-{index}"
            child.srcid = qid
            child.group = copy.group
            child.recipients = [r for r in child.recipients if r.addr in wanted]
            source = copy.rewritten or self.queue.msg_path(qid)
            if copy.rewritten:
                fsync_file(copy.rewritten)  # the worker wrote it without an fsync
                child.head, child.body_offset = None, 0
            elif copy.head is not None:  # the message as received with this copy's header
                child.head, child.body_offset = copy.head, copy.body_offset
            self.queue.add_message(child, QUE, link_from=source)  # the record states its own message's size
            if copy.rewritten:
                os.unlink(copy.rewritten)
            event(child.id, "SPLITTED, group=%s, nrcpt=%d, srcid=%s", copy.group, len(child.recipients), qid)
            children.append(child)
        self.queue.remove(qid, CHK, keep_files=True)  # the record's file written again (its message is linked)
        return children

    def _discard_written(self, qid: str, made: list[Envelope]) -> None:
        """A message removed while its result was written: its record, staged bytes and copies go."""
        state = self.queue.find(qid)
        if state is not None:
            self.queue.remove(qid, state)
        if os.path.exists(self.queue.msg_path(qid) + STAGED):
            os.unlink(self.queue.msg_path(qid) + STAGED)
        for copy in made:
            if copy.id != qid:
                self.queue.remove(copy.id, QUE)
        event(qid, 'SCAN DISCARDED, reason="removed while being scanned"')

    def _queue_notifications(self, env: Envelope, copy: CopyResult) -> list[Envelope]:
        """(I/O thread) Notifications the worker wrote become outgoing mail (archived like any);
        one the disk refuses is logged and left out."""
        made = []
        for note in copy.notes.get("notifications", []):
            path = note["path"]
            notice = Envelope(
                id=new_id(), sender=note["from"], recipients=[Recipient(addr=a) for a in note["to"]],
                helo=self.host.cfg.network.Hostname, received_at=time.time(), size=int(note["size"]), srcid=env.id,
            )
            try:
                self.queue.add_message(notice, QUE, link_from=path)
                os.unlink(path)
            except OSError as exc:
                log.error("%s: cannot queue the %s notification: %s", env.id, note.get("kind"), exc)
                continue
            event(notice.id, "NOTIFICATION, kind=%s, srcid=%s, to=%s", note.get("kind"), env.id, note["to"])
            made.append(notice)
        return made

    def restart_workers(self) -> None:
        """New workers (new configuration and databases) for the next jobs; jobs in flight finish."""
        self.pool.retire_all()

    def stop(self) -> None:
        self.enabled = False
        for lookup in self.lookups.values():
            lookup.cancel()
        self.lookups.clear()
        self.pool.stop()
        for qid in list(self.inflight - self.applying):  # an I/O thread finishes those (Committer.close)
            if os.path.exists(self.queue.record_path(CHK, qid)):
                self.queue.move(qid, CHK, WFC)
        self.inflight.clear()
        self.scanning.clear()
