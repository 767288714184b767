"""The gateway process: wires the pipeline stages together on one event loop.

Owns: start-up (queue recovery, listeners, privilege drop), the hand-offs
between stages (connect → receive/receiver.Sessions, received → scanner →
sender → done), the operations the control directory and the console
name (each carried out by the stage or spool operation that owns it), signals
(TERM/INT/QUIT stop, HUP reloads the configuration), and shutdown. Each stage
is given this object as the small interface it declares (receive/receiver.Inbound,
scan/scanner.Scanning, deliver/sender.Outbound, app/control.Operations,
reports/digest.Digesting, console/request.Gatekeeper).

Must never: start serving before the queue has been recovered; keep running
on a configuration that failed to load at HUP (the old one stays in force);
decide what a stage decides (admission and relay: receive/; next hops:
deliver/nexthop.py; DSNs: deliver/bounces.py; queue operations: spool/ops.py).
"""

from __future__ import annotations

import fcntl
import functools
import grp
import logging
import os
import pwd
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Callable

from smtpgw import RELEASE_INTERVAL, release_heap
from smtpgw import log as logsetup
from smtpgw.app import memory
from smtpgw.app.control import Control
from smtpgw.app.delivery import Delivery, archive_copy, client_tls, remove_delivered
from smtpgw.app.incoming import Incoming, process_count, server_tls
from smtpgw.config import Config, ConfigError, load_config, save_snapshot
from smtpgw.console.server import BindError, Console
from smtpgw.console.traffic import Traffic
from smtpgw.log import event
from smtpgw.net import smtp
from smtpgw.net.dns import Resolver
from smtpgw.net.loop import EventLoop
from smtpgw.receive import quota
from smtpgw.receive.receiver import Listener, Session, Sessions
from smtpgw.reports import digest, templates
from smtpgw.scan.clamd import ClamdPool, ScannerUnavailable
from smtpgw.scan.results import load_placeholder
from smtpgw.scan.scanner import Scanner
from smtpgw.scan.workers import worker_config_path
from smtpgw.spam.database import DatabaseError, database_file, site_file
from smtpgw.spam.dbindex import open_database
from smtpgw.spam.spamfilter import default_bases, describe, site_layer
from smtpgw.spool import ops
from smtpgw.spool.queue import QUE, WFC, WFS, Committer, Envelope, Queue, set_process
from smtpgw.spool.store import Item, Store, lifetimes, purge_stores
from smtpgw.stats import Stats, history_path, save as save_stats

if TYPE_CHECKING:
    import ssl

    from smtpgw.deliver.sender import Sender

log = logging.getLogger("smtpgw")

SHUTDOWN_GRACE = 5.0
PURGE_INTERVAL = 3600.0  # seconds between passes over the stores for items past their lifetime
PURGE_BATCH = 500  # items one pass removes per store at most; the next pass follows at once
LOG_FLUSH_INTERVAL = 0.2  # seconds: the log file is written in batches  # seconds for deliveries in flight to finish at stop


class StartupError(Exception):
    """A reason the gateway cannot start; ``code`` is the process exit code (kmg-spec §4.2)."""

    def __init__(self, message: str, code: int = 30) -> None:
        super().__init__(message)
        self.code = code


def bases_versions(cfg: Config) -> str:
    """``bases: anti-spam version=V, date=D, ham=N, spam=M (site layer: ...); anti-virus ClamAV
    E/N YYYYMMDD`` (or why not); the site layer is ``none``, its date and counts, or why it is ignored."""
    spam = "off (Check=false)"
    if cfg.antispam.Check:
        bases = cfg.base.BasesPath or default_bases()
        try:
            spam = describe(open_database(database_file(bases)))
        except DatabaseError as exc:
            spam = f"unusable: {exc}"
        spam += f" (site layer: {site_layer(site_file(bases))})"
    virus = "off (Check=false)"
    if any(section.Check for section in (cfg.policy, *cfg.groups)):
        try:
            virus = f"ClamAV {ClamdPool.from_config(cfg.ave).engine()}"
        except (ScannerUnavailable, ValueError) as exc:
            virus = f"clamd does not answer: {exc}"
    return f"bases: anti-spam {spam}; anti-virus {virus}"


class Gateway:
    def __init__(self, cfg: Config, config_path: str) -> None:
        self.cfg = cfg
        self.config_path = os.path.abspath(config_path)
        self.loop = EventLoop()
        self.stats = Stats()
        self.traffic = Traffic()
        self.quota = quota.Quota(cfg.path.QueuePath)
        self.queue = Queue(cfg.path.QueuePath)
        self.committer = Committer(self.queue, self.loop.call_soon_threadsafe)
        self.inbound = Sessions()
        self.receiving = True
        self.stopping = False
        self.listeners: list[Listener] = []
        self.templates = self._templates(cfg)
        self._check_spam_database(cfg)
        self.incoming_archive = Store(cfg.path.IncomingArchivePath) if cfg.path.IncomingArchivePath else None
        self.outgoing_archive = Store(cfg.path.OutgoingArchivePath) if cfg.path.OutgoingArchivePath else None
        self.ssl_context = self._server_tls(cfg)
        self.client_tls = client_tls  # (ssl imported when a next hop first offers STARTTLS)
        self.resolver = Resolver.from_config(self.loop, cfg.resolve)
        # DeliveryProcess: the Sender stage in a process of its own (app/delivery.py)
        self.sender: Sender | Delivery = Delivery(self) if cfg.limits.DeliveryProcess else self._sender()
        self.scanner = Scanner(self)
        self.control = Control(self)
        self.console = Console(self)
        self.digest = digest.Digests(self)
        # IncomingProcesses: sessions served by processes of their own too (app/incoming.py)
        self.incoming: Incoming | None = None
        self._lock_fd = -1
        self._saving_stats = False
        self._handle_signals()

    def _sender(self) -> Sender:
        """The Sender stage in this process (DeliveryProcess=no). Imported here: with the delivery
        process, the main process does without the client, next-hop, MX and DSN code."""
        from smtpgw.deliver.sender import Sender

        return Sender(self)

    @staticmethod
    def _server_tls(cfg: Config) -> ssl.SSLContext | None:
        try:
            return server_tls(cfg)
        except OSError as exc:  # ssl.SSLError is one
            cert, key = cfg.network.TLSCertificateFile, cfg.network.TLSKeyFile
            raise StartupError(f"cannot load TLS certificate {cert} / key {key}: {exc}", 1) from exc

    @staticmethod
    def _templates(cfg: Config) -> dict[str, templates.Template]:
        """Templates are checked at start (kmg-spec §5.2): a broken one stops the start, a
        group's own TemplatesPath's (notify, disclaimer, placeholder) included."""
        try:
            for folder in sorted({group.TemplatesPath for group in (cfg.policy, *cfg.groups)} - {None}):
                templates.load_templates(folder, templates.GROUP_KINDS)
                load_placeholder(folder)
            if cfg.digest.Schedule:
                digest.load(cfg)
            return templates.load_templates(cfg.base.TemplatesPath)
        except templates.TemplateError as exc:
            raise StartupError(str(exc), 1) from exc

    @staticmethod
    def _spam_database_problem(cfg: Config) -> str | None:
        """Why the spam database the scanner workers would load is unusable, or None.

        Every worker loads it when it starts (scanjob.Job); a damaged or missing file would make each
        worker exit and every message wait in WFC with nothing in the log saying why. Opening it
        builds its shared index (spam/dbindex.py) when needed, before the workers map it."""
        if not cfg.antispam.Check:
            return None
        path = database_file(cfg.base.BasesPath or default_bases())
        try:
            open_database(path)
        except DatabaseError as exc:
            return f"spam database unusable: {exc}"
        return None

    @classmethod
    def _check_spam_database(cls, cfg: Config) -> None:
        """At start a bad spam database stops the start with its reason (like a broken template)."""
        problem = cls._spam_database_problem(cfg)
        if problem:
            raise StartupError(problem, 1)

    def _restart_workers_checked(self, done: str) -> None:
        """New scanner workers, once the spam database they will load has been checked; then log ``done``.

        The check (a full load, about 0.3 s) runs in an I/O thread, not on the loop. A damaged file
        (a half-copied update, a bad hand edit) leaves the current workers and the database they hold
        in place: ARCHITECTURE.md and spam.spamfilter, a damaged database never replaces the loaded one."""
        cfg = self.cfg

        def checked(problem: str | None, error: BaseException | None) -> None:
            problem = error or problem
            if problem:
                log.error("scanner workers not restarted, they keep the configuration and databases they"
                          " loaded: %s", problem)
                return
            self._publish_worker_config(cfg)
            self.scanner.restart_workers()
            log.info("%s", done)
            self._log_bases()

        self.committer.call(functools.partial(self._spam_database_problem, cfg), checked, alone=True)

    def _log_bases(self) -> None:
        """Log the versions of the spam and anti-virus databases in use (at start and at every
        reload), found in an I/O thread: clamd may be slow to answer."""
        def found(versions: str, error: BaseException | None) -> None:
            if error is not None:
                log.error("cannot tell the database versions: %s", error)
            else:
                log.info("%s", versions)

        self.committer.call(functools.partial(bases_versions, self.cfg), found, alone=True)

    def _publish_worker_config(self, cfg: Config) -> None:
        """Give the scanner workers the configuration this process accepted, file: lists included.

        Workers are started on demand and replaced when they die or time out; reading smtpgw.conf
        themselves, a replacement would see an edit the gateway refused at HUP (a file: list that is
        gone, a syntax error) and exit, and no message would be scanned. kmg-spec §3.1: a bad
        configuration at reload keeps the old one."""
        save_snapshot(worker_config_path(self.queue.root), cfg)

    # -- start and stop ---------------------------------------------------------------
    def lock_queue(self) -> None:
        """One gateway per queue: an exclusive lock held while running."""
        if self._lock_fd >= 0:
            return
        self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._take_lock()

    def check_not_running(self) -> None:
        """Exit code 41 ("already running", kmg-spec §4.2) before any port is bound: the queue's
        lock is taken now when its file exists (a running gateway made it), and kept. Without
        the file no gateway runs; `lock_queue` makes it later as the service user."""
        if self._lock_fd >= 0:
            return
        try:
            self._lock_fd = os.open(self._lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return
        self._take_lock()

    @property
    def _lock_path(self) -> str:
        return os.path.join(self.queue.root, ".lock")

    def _take_lock(self) -> None:
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise StartupError(f"another gateway is running on the queue {self.queue.root}", 41) from None

    def bind(self) -> None:
        self.listeners = self._bind(self.cfg.network.ListenOn, {})
        try:
            self.console.bind()
        except BindError as exc:
            raise StartupError(str(exc), exc.code) from exc

    def _bind(self, addresses: list[tuple[str, int]],
              existing: dict[tuple[str, int], Listener]) -> list[Listener]:
        """One listener per address, in order: the ``existing`` one for an address kept, a new
        one bound otherwise. All or nothing: when one address cannot be bound, the listeners
        bound here are closed again and StartupError says why (``existing`` stay as they are)."""
        listeners: list[Listener] = []
        fresh: list[Listener] = []
        try:
            for host, port in addresses:
                listener = existing.get((host, port))
                if listener is None:
                    try:
                        listener = Listener(self.loop, host, port, self.session_opened)
                    except OSError as exc:
                        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
                    fresh.append(listener)
                listeners.append(listener)
        except StartupError:
            for listener in fresh:
                listener.close()
            raise
        return listeners

    def drop_privileges(self, user: str | None, group: str | None) -> None:
        if not user or os.geteuid() != 0:
            return
        try:
            pw = pwd.getpwnam(user)
            gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(pw.pw_uid)
        except (KeyError, OSError) as exc:
            raise StartupError(f"cannot switch to user {user}: {exc}", 44) from exc

    def start(self) -> None:
        self.lock_queue()
        self._publish_worker_config(self.cfg)
        self.stats.restore(self.cfg.options.StatFilename, history_path(self.queue.root))
        self.quota.restore(self.cfg.quota.MaximalProtectedRecipients)
        counts = self.queue.recover()
        log.info("queue %s recovered: %s", self.queue.root, ", ".join(f"{k}={v}" for k, v in counts.items()))
        processes = process_count(self.cfg)
        if processes > 1 or isinstance(self.sender, Delivery):
            set_process(0)  # queue IDs end in the index of the process that made them
        if processes > 1:
            self.incoming = Incoming(self, processes)
            self.incoming.start()
        for listener in self.listeners:
            listener.start()
        self.scanner.load()
        self.sender.start()  # (with DeliveryProcess=yes the delivery process takes every record in QUE itself)
        self.control.start()
        self.console.start()
        self._purge_stores()
        self.digest.start()
        self.loop.call_later(self.cfg.options.StatSaveInterval, self._save_stats)
        self._flush_log()
        self._release_memory()
        where = ", ".join(f"{h}:{p}" for h, p in (l.address for l in self.listeners))
        log.info("smtpgw started: listening on %s", where)
        self._log_bases()

    def _handle_signals(self) -> None:
        """Installed as soon as the loop exists, before the (possibly long) start-up: a signal
        only queues its action, which runs once the loop does. A HUP during start-up (a log
        rotation) thus reloads after it instead of killing the process, and a TERM stops it
        cleanly."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(signum, lambda *_: self.loop.call_soon(self.shutdown))
        signal.signal(signal.SIGHUP, lambda *_: self.loop.call_soon(self.reload))
        signal.set_wakeup_fd(self.loop._wake_w.fileno(), warn_on_full_buffer=False)

    def _save_stats(self) -> None:
        """Every StatSaveInterval: the counters to StatFilename and today's history line, written
        durably in an I/O thread (one write at a time), so that they survive a restart."""
        if self.stopping:
            return
        if not self._saving_stats:
            self._saving_stats = True
            self.committer.call(functools.partial(save_stats, self.cfg.options.StatFilename,
                                                  history_path(self.queue.root), self.stats.snapshot()),
                                self._stats_saved)
        snapshot = self.quota.snapshot()
        if snapshot is not None:
            self.committer.call(functools.partial(self.quota.write, snapshot), self._quota_saved)
        self.loop.call_later(self.cfg.options.StatSaveInterval, self._save_stats)

    def _stats_saved(self, _result: None, error: BaseException | None) -> None:
        self._saving_stats = False
        if error is not None:
            log.error("cannot save the statistics to %s: %s", self.cfg.options.StatFilename, error)

    def _quota_saved(self, _result: None, error: BaseException | None) -> None:
        if error is not None:
            self.quota.dirty = True
            log.error("cannot save the quota counts to %s: %s", self.quota.path, error)

    def _purge_stores(self) -> None:
        """Remove store items past their lifetime (QuarantineLifetime, BackupLifetime, archive
        lifetimes) in an I/O thread, at most PURGE_BATCH per store and pass; log each one."""
        if self.stopping:
            return
        self.committer.call(functools.partial(purge_stores, lifetimes(self.cfg), time.time(), PURGE_BATCH),
                            self._stores_purged, alone=True)

    def _stores_purged(self, purged: tuple[list[tuple[str, Item, float]], bool] | None,
                       error: BaseException | None) -> None:
        removed: list[tuple[str, Item, float]] = []
        more = False
        if error is not None:
            log.error("store purge failed: %s", error)
        elif purged is not None:
            removed, more = purged
        for folder, item, lifetime in removed:
            event(item.queue_id or item.id, "PURGED, store=%s, item=%s, status=%s, stored=%s, lifetime=%dd",
                  folder, item.id, item.status, time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(item.stored_at)),
                  lifetime // 86400)
        if not self.stopping:
            self.loop.call_later(1.0 if more else PURGE_INTERVAL, self._purge_stores)

    def _flush_log(self) -> None:
        logsetup.flush_all()
        if not self.stopping:
            self.loop.call_later(LOG_FLUSH_INTERVAL, self._flush_log)

    def _release_memory(self) -> None:
        release_heap()
        if not self.stopping:
            self.loop.call_later(RELEASE_INTERVAL, self._release_memory)

    def run(self) -> None:
        self.loop.run_forever()

    def shutdown(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping")
        self.console.stop()
        for listener in self.listeners:
            listener.close()
        self.listeners.clear()
        for session in list(self.inbound.open):
            session.close_with(smtp.SHUTTING_DOWN.format(self.cfg.network.Hostname))
        if self.incoming is not None:
            self.incoming.stop()
        self.control.stop()
        self.digest.stop()
        if isinstance(self.sender, Delivery):
            self.scanner.stop()
            self.sender.stop()  # deliveries in flight end there, SHUTDOWN_GRACE at most
        else:
            self.sender.enabled = False
            self.scanner.stop()
            self.loop.run_until(self.sender.idle, SHUTDOWN_GRACE)
            self.sender.stop()
        self.loop.run_until(lambda: not self.inbound.open, 1.0)
        self.console.save_history()
        self.committer.close()
        try:  # the last counts, for the next start
            save_stats(self.cfg.options.StatFilename, history_path(self.queue.root), self.stats.snapshot())
        except OSError as exc:
            log.error("cannot save the statistics to %s: %s", self.cfg.options.StatFilename, exc)
        self.quota.save()
        self.queue.sync_state_dirs()
        log.info("stopped")
        logsetup.flush_all()
        self.loop.stop()

    def reload(self) -> None:
        """HUP: read the configuration again; keep the old one if the new one is bad."""
        try:
            cfg = load_config(self.config_path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused: %s", problem)
            return
        if cfg.path.QueuePath != self.cfg.path.QueuePath:
            log.error("reload: QueuePath cannot change while running; restart instead")
            return
        # Everything that can fail is prepared before anything is changed: the new listeners are
        # bound while the old ones still serve (after the privilege drop, a port given up could
        # not be taken back), so a refused reload leaves the gateway exactly as it was.
        current = dict(zip((tuple(a) for a in self.cfg.network.ListenOn), self.listeners))
        try:
            ssl_context = self._server_tls(cfg)
            listeners = self._bind([tuple(a) for a in cfg.network.ListenOn], current)
        except StartupError as exc:
            log.error("reload refused: %s", exc)
            return
        try:
            logsetup.setup(cfg.options.LogFile, cfg.options.LogLevel, cfg.locale.DateFormat, cfg.locale.TimeFormat,
                           echo=sys.stderr.isatty())
        except OSError as exc:  # the old log stays in use
            for listener in listeners:
                if listener not in self.listeners:
                    listener.close()
            log.error("reload refused: cannot open the log file %s: %s", cfg.options.LogFile, exc)
            return
        self.cfg = cfg
        self.ssl_context = ssl_context
        self.resolver.close()
        self.resolver = Resolver.from_config(self.loop, cfg.resolve)
        for listener in self.listeners:
            if listener not in listeners:
                listener.close()
        for listener in listeners:
            if listener not in self.listeners:
                listener.start()
        self.listeners = listeners
        if self.incoming is not None:
            self.incoming.reload(cfg)
        if isinstance(self.sender, Delivery):
            self.sender.reload(cfg)
        if cfg.limits.DeliveryProcess != isinstance(self.sender, Delivery):
            log.warning("reload: DeliveryProcess=%s takes effect at the next start",
                        "yes" if cfg.limits.DeliveryProcess else "no")
        running = len(self.incoming.children) + 1 if self.incoming is not None else 1
        if process_count(cfg) != running:
            log.warning("reload: IncomingProcesses=%d takes effect at the next start (%d now)",
                        process_count(cfg), running)
        self._restart_workers_checked(f"configuration reloaded from {self.config_path}")

    # -- sessions ---------------------------------------------------------------------
    def session_opened(self, conn: socket.socket, peer: tuple) -> None:
        elsewhere = self.incoming.hand_over if self.incoming is not None else None
        self.inbound.admit(self, conn, peer, self.receiving and not self.stopping, elsewhere)

    def session_closed(self, session: Session) -> None:
        self.inbound.closed(session)

    def admit_mail(self, ready: Callable[[], None], first: bool = False) -> bool:
        return self.scanner.admit(ready, first)

    def holding_mail(self) -> bool:
        """Messages wait for a scan slot: InFlowDelay holds new mail (``Scanner.admit``)."""
        return self.scanner.enabled and bool(self.scanner.waiting)

    def known_in_wfc(self) -> set[str]:
        """The WFC records the scanner has been given and not yet taken (waiting, retried later)."""
        return {*self.scanner.waiting, *self.scanner.retries}

    def queue_has_space(self) -> bool:
        """``MinimalQueueFreeSpaceSize``: refuse new mail (4xx) while the spool's disk is short."""
        return ops.has_space(self.queue, self.cfg.limits.MinimalQueueFreeSpaceSize * 1024 * 1024)

    # -- hand-offs between stages -------------------------------------------------------
    def message_received(self, env: Envelope) -> None:
        self.traffic.received(env)
        self.stats.inc("mta_received_messages")
        self.stats.inc("mta_received_bytes", env.size)
        self.stats.inc("mta_received_recipients", len(env.recipients))
        for crossing in self.quota.count(self.cfg, (r.addr for r in env.recipients), env.size):
            notice = quota.queue_notice(self.quota, self.queue, self.cfg, crossing, env.id)
            if notice is not None:
                self.message_scanned(notice)
        archive = self.incoming_archive
        if archive is not None:  # kmg-spec §3.9: a copy of every received message
            self.committer.run(archive_copy(self.queue, archive, env, "RCV"))
        self.scanner.accept(env)
        if self.incoming is not None:  # the day's quota counts and the scan wait, to the other processes
            self.incoming.counted(env)

    def message_scanned(self, env: Envelope) -> None:
        self.traffic.scanned(env)
        self.sender.enqueue(env.id, env.next_attempt, env.priority, env)

    def remove_queued(self, qid: str, state: str) -> str | None:
        """The admin removed a message (``queue remove``); one in CHK has its scan result discarded.
        With a delivery process a record in QUE may be taken into SND at the same moment: then
        it is not removed, and why is answered."""
        if state == QUE and isinstance(self.sender, Delivery):
            refused = self.sender.take_out(qid)
            if refused:
                return refused
        else:
            self.sender.forget(qid)
            self.scanner.cancel(qid)
            ops.remove_record(self.queue, qid, state)
        event(qid, "REMOVED, state=%s, by=admin", state)
        return None

    def reload_databases(self) -> None:
        """``.c_db_reload``: new scanner workers load the databases again (unless the spam one is damaged)."""
        self._restart_workers_checked("databases reloaded")

    def release(self, path: str, sender: str, recipients: list[str], check: bool) -> str:
        """Put a message file (a released store item) into the queue: WFC to be scanned, or QUE."""
        env = ops.release(self.queue, sender, recipients, check, self.cfg.network.Hostname, link_from=path)
        event(env.id, "RELEASED, from=<%s>, nrcpt=%d, size=%d, check=%s", sender, len(recipients), env.size,
              "yes" if check else "no")
        if check:
            self.scanner.accept(env)
        else:
            self.sender.enqueue(env.id, env=env)
        return env.id

    # -- what the control directory and the console ask for --------------------------------
    def switch(self, what: str, on: bool) -> None:
        """``receiving``, ``sending`` or ``scanning`` on or off; a stage switched on starts at once."""
        if what == "receiving":
            self.receiving = on
        elif what == "sending":
            self.sender.switch(on)
        else:
            self.scanner.enabled = on
            if on:
                self.scanner.pump()

    def switches(self) -> dict[str, bool]:
        return {"receiving": self.receiving, "sending": self.sender.enabled, "scanning": self.scanner.enabled}

    def command(self, name: str) -> None:
        self.control.commands[name]()

    def queue_operation(self, op: str, qid: str | None) -> tuple[int, str]:
        return self.control.handle(op, qid)

    def send_digest_now(self) -> None:
        self.digest.send_now()

    def dump_memory(self) -> None:
        if isinstance(self.sender, Delivery):  # with the delivery process's registries as they are now
            self.sender.ask_registries(lambda: memory.dump(self))
        else:
            memory.dump(self)

    def send_all(self) -> int:
        return self.sender.send_all() + self.scanner.rescan_all()

    def send_now(self, qid: str, state: str) -> None:
        if state == QUE:
            self.sender.send_now(qid)
        elif state in (WFC, WFS):
            self.scanner.prioritise(qid)

    def delivery_complete(self, env: Envelope) -> None:
        """(DeliveryProcess=no; the delivery process does the same and reports the latency)"""
        self.traffic.delivered(env)
        remove_delivered(self.queue, self.committer, self.outgoing_archive, env)
