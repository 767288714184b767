"""The web console: status, queue, quarantine and backup, log, statistics; ``/metrics`` and ``/healthz``.

Owns: the ``[smtpgw.console]`` HTTP(S) listener, served by a thread of its own
(``http.server``) so that a slow browser never delays SMTP; logins, sessions
and the checks every request passes (session cookie, CSRF token on every POST,
role, validated parameters, security headers); the audit log line of every
action (``console: user=..., action=..., item=...``); and handing every action
to the gateway's event loop, where the same operations as the control
directory and the ``queue``/``store`` commands carry it out.

Must never: change gateway state from its own thread (actions run on the loop
through `Console.on_loop`), render a stored message's HTML, let a request
parameter name a file (queue and item IDs are checked, stores are chosen from
the configuration by name), or show message data to a client without a session.
"""

from __future__ import annotations

import http.server
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from smtpgw.console.auth import ADMIN, READ_ONLY, LoginThrottle, Session, Sessions
from smtpgw.console.history import History
from smtpgw.console.request import Gatekeeper, Handler, Refused
from smtpgw.console.routes import ROUTES
from smtpgw.console.updates import Updates
from smtpgw.rules.masks import ip_match
from smtpgw.scan.clamd import ClamdError, ClamdServer
from smtpgw.spam.database import database_file
from smtpgw.spam.spamfilter import default_bases
from smtpgw.spam.training import learn_files
from smtpgw.spool import ops
from smtpgw.spool.durable import write_durably
from smtpgw.spool.queue import STATES, Envelope
from smtpgw.spool.store import named_stores

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("smtpgw.console")

MAX_THREADS = 16  # requests served at once; more are closed
LOOP_TIMEOUT = 10.0  # seconds an action may wait for the event loop
LOG_TAIL_BYTES = 256 * 1024
CLAMD_TIMEOUT = 2.0  # seconds a clamd server has to answer VERSION for the status page and /metrics
SAMPLE_INTERVAL = 60.0  # seconds between samples of the traffic history (also taken when a chart is shown)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, console: "Console", address: tuple[str, int], tls: ssl.SSLContext | None) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.console, self.tls = console, tls
        self.slots = threading.BoundedSemaphore(MAX_THREADS)
        self.routes = ROUTES
        super().__init__(address, Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, peer = self.socket.accept()
        if self.tls is not None:  # the handshake runs in the request's thread, on its first read
            conn = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, peer

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class BindError(Exception):
    """The console cannot listen; ``code`` is the process exit code it means at start."""

    def __init__(self, message: str, code: int = 30) -> None:
        super().__init__(message)
        self.code = code


class Console:
    """The console of one gateway; `bind` before the privilege drop, `start` once the queue is recovered."""

    def __init__(self, gateway: Gatekeeper) -> None:
        self.host = gateway
        self.sessions = Sessions()
        self.throttle = LoginThrottle()
        self.server: _Server | None = None
        self.thread: threading.Thread | None = None
        self.history = History()
        self.timer: Any = None
        self.updates = Updates(gateway.config_path)

    @property
    def cfg(self) -> Any:
        return self.host.cfg.console

    @property
    def secure(self) -> bool:
        return self.server is not None and self.server.tls is not None

    def bind(self) -> None:
        cfg = self.cfg
        if cfg.ListenOn is None:
            return
        tls = None
        if cfg.TLSCertificateFile:
            import ssl  # here: only a console on HTTPS maps libssl

            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                tls.load_cert_chain(cfg.TLSCertificateFile, cfg.TLSKeyFile)
            except OSError as exc:  # ssl.SSLError is one
                raise BindError(f"console: cannot load TLS certificate: {exc}", 1) from exc
        try:
            self.server = _Server(self, tuple(cfg.ListenOn), tls)
        except OSError as exc:
            raise BindError(f"console: cannot listen on {cfg.ListenOn[0]}:{cfg.ListenOn[1]}: "
                               f"{exc.strerror or exc}") from exc

    def start(self) -> None:
        if self.server is None:
            return
        self.history = History.load(History.path(self.host.queue.root))
        self.history.continue_from(self.host.stats.counters)  # the counters restored from StatFilename
        self.timer = self.host.loop.call_later(SAMPLE_INTERVAL, self._tick)
        self.thread = threading.Thread(target=self.server.serve_forever, name="console", daemon=True)
        self.thread.start()
        host, port = self.server.server_address[:2]
        log.info("console listening on %s://%s:%d", "https" if self.secure else "http", host, port)

    def stop(self) -> None:
        if self.server is None:
            return
        if self.thread is not None:
            self.server.shutdown()
        self.server.server_close()
        self.server = None

    def save_history(self) -> None:
        """At shutdown, once deliveries in flight have ended: the history is kept for the next start."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self._sample()
            try:
                self.history.save(History.path(self.host.queue.root))
            except OSError as exc:
                log.error("cannot save the console history: %s", exc)

    def _sample(self) -> None:
        self.history.sample(self.host.stats.counters, time.time())

    def _tick(self) -> None:
        """Each minute on the loop: a sample, written by an I/O thread."""
        self._sample()
        data, path = self.history.to_bytes(), History.path(self.host.queue.root)
        self.host.committer.run(lambda: write_durably(path, data))
        self.timer = self.host.loop.call_later(SAMPLE_INTERVAL, self._tick)

    def charts(self) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """(per minute over 24 hours, per hour over 30 days), sampled now."""
        def read() -> tuple[dict[str, list[int]], dict[str, list[int]]]:
            self._sample()
            now = time.time()
            return self.history.series(False, now), self.history.series(True, now)
        return self.on_loop(read)

    # -- the event loop ---------------------------------------------------------------------
    def on_loop(self, job: Callable[[], Any]) -> Any:
        """Run ``job`` on the gateway's event loop and return its result (from a request thread)."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = job()
            except Exception as exc:  # handed back to the request, which answers 500
                box["error"] = exc
            done.set()

        self.host.loop.call_soon_threadsafe(run)
        if not done.wait(LOOP_TIMEOUT):
            raise Refused(503, "the gateway did not answer in time")
        if "error" in box:
            raise box["error"]
        return box["result"]

    def snapshot(self) -> dict[str, Any]:
        """Switches and counters, read on the loop that changes them."""
        gw = self.host
        return self.on_loop(lambda: {
            **gw.switches(),
            "counters": dict(gw.stats.counters), "started": gw.stats.started, "stopping": gw.stopping,
            "latency": gw.traffic.copy(), "top": gw.traffic.top(), "dns": dict(gw.resolver.stats),
        })

    def queue_depth(self) -> dict[str, int]:
        return {state: len(self.host.queue.ids(state)) for state in STATES}

    def queue_entries(self) -> list[tuple[str, Envelope]]:
        """The records as they are now, read without touching them (an unreadable one is skipped;
        the gateway sets it aside when it meets it)."""
        return ops.entries(self.host.queue)

    def stores(self) -> dict[str, str]:
        """The stores a request may name, by name: never a path from the request."""
        return named_stores(self.host.cfg)

    def spam_database(self) -> dict[str, str]:
        """Version and date from the spam database's first lines (the file is not loaded)."""
        path = database_file(self.host.cfg.base.BasesPath or default_bases())
        info = {"version": "-", "date": "-"}
        try:
            with open(path, "rb") as f:
                head = f.read(4096).decode("utf-8", "replace").split("\n")[:8]
        except OSError:
            return {"version": "missing", "date": "-"}
        for line in head:
            key, _, value = line.partition("\t")
            if key in info:
                info[key] = value[:64]
        return info

    def clamd_health(self, timeout: float = CLAMD_TIMEOUT) -> list[tuple[str, bool, str]]:
        """(address, answers, engine and database version or why not) of each ClamdAddress."""
        health = []
        for address in self.host.cfg.ave.ClamdAddress:
            try:
                health.append((address, True, str(ClamdServer(address).version(timeout))))
            except (ClamdError, OSError, ValueError) as exc:
                health.append((address, False, str(exc)))
        return health

    def learn(self, message_path: str, is_spam: bool) -> int:
        """``spam learn`` of one stored message into the site spam database, from a request thread;
        the scanner workers see the changed file at their next message (no restart)."""
        return learn_files(self.host.cfg.base.BasesPath or default_bases(), [message_path], is_spam)

    def log_tail(self) -> list[str]:
        path = self.host.cfg.options.LogFile
        if not path:
            return []
        try:
            with open(path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - LOG_TAIL_BYTES))
                data = f.read(LOG_TAIL_BYTES)
        except OSError:
            return []
        lines = data.decode("utf-8", "replace").split("\n")
        return [line for line in (lines[1:] if size > LOG_TAIL_BYTES else lines) if line]

    # -- accounts ---------------------------------------------------------------------------
    def account(self, user: str) -> tuple[str, str] | None:
        """(stored hash, role) of ``user``, or None."""
        cfg = self.cfg
        if user == cfg.AdminUser and cfg.AdminPasswordHash:
            return cfg.AdminPasswordHash, ADMIN
        for name, stored in cfg.ReadOnlyUsers:
            if name == user:
                return stored, READ_ONLY
        return None

    def audit(self, session: Session | None, ip: str, action: str, item: str = "-", result: str = "done") -> None:
        who = session.user if session else "-"
        log.info("console: user=%s, ip=%s, action=%s, item=%s, result=%s", who, ip, action, item or "-",
                 result.replace("\n", " ")[:200])

    def metrics_allowed(self, ip: str) -> bool:
        return any(ip_match(mask, ip) for mask in self.cfg.MetricsAllowFrom)
