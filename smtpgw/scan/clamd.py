"""clamd client: its socket protocol, and a pool of clamd servers with failover.

Owns: the clamd commands smtpgw uses — PING, VERSION, INSTREAM and RELOAD, in
their NUL-terminated ``z`` form — over a unix socket (``unix:/path`` or an
absolute path) or TCP (``host:port``, ``[v6]:port``); mapping clamd detection
names to object statuses; and a pool of the servers in ``ClamdAddress`` with
health state: a server that fails is skipped for ``retry_after`` seconds, then
tried again.

Must never: return ``clean`` when no server gave a verdict (the pool raises
``ScannerUnavailable`` and the caller keeps the message queued), block without
a deadline (every socket operation has a timeout), or run on the event loop:
it uses blocking sockets and runs in scanner worker processes.

INSTREAM (clamd(8)): ``zINSTREAM\\0``, then chunks each prefixed by their
length as a 4-byte big-endian integer, then a zero length. clamd answers
``stream: OK``, ``stream: NAME FOUND`` or ``... ERROR``; a stream longer than
the server's StreamMaxLength is answered ``INSTREAM size limit exceeded.
ERROR`` and the connection is closed, possibly while we are still sending.

Sessions (clamd(8) IDSESSION): each server keeps one connection open across
scans — ``zIDSESSION\0`` once, then one ``zINSTREAM\0`` after another, each
answered ``N: stream: …`` where N counts the requests of the session from 1 —
so a scan costs no connect (a worker process owns its pool, hence one session
per worker and server; a thread that finds it busy scans over a connection of
its own). The session is closed, and the next scan opens a new
one, after any error, timeout or reply that is not a plain verdict. clamd
ends a session that waits for a command longer than its ReadTimeout (saying
``COMMAND READ TIMED OUT``), and every session when it restarts: a session
found closed (or with words waiting in it) before a scan is reopened, and a scan whose stream on a
kept session gets no reply at all is sent once more on a fresh connection to
the same server (a stale session is not a failed server); a fresh connection
that fails is a failed server as before.

Timeouts: ``ScanTimeout`` bounds one object's scan. When a verdict does not
come in time the server is PINGed: if it answers, the object gets ``error``
(kmg-spec §3.12: a scan that times out is an error); if not, the server is
marked down and the object goes to the next server. ``ScanTimeout=0`` means
no limit of our own below ``MAX_SCAN_TIME``.
"""

from __future__ import annotations

import logging
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from smtpgw.rules.policy import CLEAN, ERROR, INFECTED, PROTECTED, SUSPICIOUS, most_severe

__all__ = [
    "ScannerUnavailable",
    "ClamdError",
    "Verdict",
    "EngineVersion",
    "ClamdServer",
    "ClamdPool",
    "status_for_name",
    "parse_version",
]

log = logging.getLogger("smtpgw.scan.clamd")

CHUNK = 64 * 1024  # INSTREAM chunk size
_END = struct.pack(">I", 0)  # the zero-length chunk that ends an INSTREAM
MAX_REPLY = 64 * 1024  # bytes of reply read from clamd
MAX_SCAN_TIME = 600.0  # seconds, when ScanTimeout is 0
CONNECT_TIMEOUT = 5.0
PING_TIMEOUT = 3.0
RETRY_AFTER = 30.0  # seconds a failed server is skipped
VERSION_MAX_AGE = 300.0  # seconds a server's VERSION answer is reused

_MONTHS = {m: i for i, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)}
_REPLY_LINES = re.compile(r"[\0\n]")  # a reply's lines (z commands end theirs with NUL)
_DB_DATE = re.compile(r"(?:\w{3} )?(\w{3}) +(\d{1,2}) [\d:]+ (\d{4})")


class ScannerUnavailable(Exception):
    """No clamd server gave a verdict: keep the message queued, never pass it as clean."""


class ClamdError(Exception):
    """One server failed (cannot connect, connection lost, no answer in time)."""


class _Timeout(ClamdError):
    """The verdict did not come before the deadline."""


@dataclass(frozen=True)
class Verdict:
    status: str  # clean | infected | suspicious | protected | error
    names: tuple[str, ...] = ()
    detail: str = ""  # clamd's reply, or why the object is an error
    server: str = ""


@dataclass(frozen=True)
class EngineVersion:
    engine: str  # "1.4.6"
    db_version: str = ""  # "27500"; empty with custom databases only
    db_date: str = ""  # YYYYMMDD

    def __str__(self) -> str:
        """``1.4.6/27500 20241210`` (the parts clamd reported)."""
        text = self.engine
        if self.db_version:
            text += f"/{self.db_version}"
        if self.db_date:
            text += f" {self.db_date}"
        return text


def parse_version(reply: str) -> EngineVersion:
    """``ClamAV 1.4.6/27500/Tue Dec 10 09:35:09 2024`` → its parts (missing ones empty)."""
    text = reply.strip().removeprefix("ClamAV").strip()
    engine, _, rest = text.partition("/")
    db_version, _, date_text = rest.partition("/")
    db_date = ""
    match = _DB_DATE.search(date_text)
    if match and match.group(1) in _MONTHS:
        db_date = f"{match.group(3)}{_MONTHS[match.group(1)]:02d}{int(match.group(2)):02d}"
    return EngineVersion(engine.strip(), db_version.strip(), db_date)


def status_for_name(name: str) -> str:
    """The object status for a clamd detection name.

    Encrypted-content alerts (``Heuristics.Encrypted.*``) → protected; clamd's
    own limit alerts (``Heuristics.Limits.Exceeded*``) → error (not fully
    scanned); other heuristics, potentially unwanted programs (``PUA.*``) and
    names containing ``Suspect`` → suspicious; anything else → infected.
    Custom signatures' ``.UNOFFICIAL`` suffix is ignored.
    """
    base = name.removesuffix(".UNOFFICIAL")
    if base.startswith("Heuristics.Encrypted."):
        return PROTECTED
    if base.startswith("Heuristics.Limits.Exceeded"):
        return ERROR
    if base.startswith(("Heuristics.", "PUA.")) or "Suspect" in base:
        return SUSPICIOUS
    return INFECTED


def _parse_scan_reply(reply: str, server: str) -> Verdict:
    if reply == "stream: OK\0":  # the usual answer (zINSTREAM), what the lines below make of it
        return Verdict(CLEAN, (), "", server)
    names: list[str] = []
    errors: list[str] = []
    for line in filter(None, (part.strip() for part in _REPLY_LINES.split(reply))):
        body = line.removeprefix("stream:").strip()
        if body.endswith(" FOUND"):
            names.append(body[: -len(" FOUND")].strip())
        elif body.endswith("ERROR"):
            errors.append(body.removesuffix("ERROR").strip().rstrip("."))
        elif body != "OK":
            errors.append(f"unexpected reply {body[:200]!r}")
    if names:
        status = most_severe(status_for_name(name) for name in names)
        return Verdict(status, tuple(dict.fromkeys(names)), reply.strip("\0\n "), server)
    if errors or not reply.strip("\0\n "):
        return Verdict(ERROR, (), "clamd: " + ("; ".join(errors) or "empty reply"), server)
    return Verdict(CLEAN, (), "", server)


class _StaleSession(ClamdError):
    """A kept session gave no reply at all: clamd closed it (ReadTimeout, restart)."""


class ClamdServer:
    """One clamd address: scans over a kept IDSESSION connection, other commands each on its own."""

    def __init__(self, address: str, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.family, self.target = _parse_address(address)
        self.down_until = 0.0  # monotonic time before which the pool skips this server
        self.failure = ""
        self.version_info: tuple[float, EngineVersion] | None = None
        self.session: socket.socket | None = None  # the IDSESSION connection, between scans
        self.requests = 0  # requests sent on it (clamd numbers its replies from 1)
        self.sessions_opened = 0
        self.session_lock = threading.Lock()  # held by the thread scanning over the session

    def __repr__(self) -> str:
        return f"ClamdServer({self.address!r})"

    def _connect(self, deadline: float) -> socket.socket:
        timeout = max(0.001, min(self.connect_timeout, deadline - time.monotonic()))
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.target)
        except OSError as exc:
            sock.close()
            raise ClamdError(f"{self.address}: cannot connect: {exc}") from None
        return sock

    def command(self, name: str, timeout: float = PING_TIMEOUT) -> str:
        """Send ``zNAME\\0`` and return the reply (PING, VERSION, RELOAD, …)."""
        deadline = time.monotonic() + timeout
        with self._connect(deadline) as sock:
            try:
                _settimeout(sock, deadline)
                sock.sendall(b"z" + name.encode("ascii") + b"\0")
                return _read_reply(sock, deadline)
            except socket.timeout:
                raise _Timeout(f"{self.address}: no answer to {name} in {timeout:g}s") from None
            except OSError as exc:
                raise ClamdError(f"{self.address}: {name} failed: {exc}") from None

    def ping(self, timeout: float = PING_TIMEOUT) -> None:
        reply = self.command("PING", timeout)
        if reply.strip("\0\n ") != "PONG":
            raise ClamdError(f"{self.address}: unexpected PING reply {reply[:100]!r}")

    def version(self, timeout: float = PING_TIMEOUT) -> EngineVersion:
        return parse_version(self.command("VERSION", timeout).strip("\0\n "))

    def reload(self, timeout: float = PING_TIMEOUT) -> str:
        """Ask clamd to reload its databases; returns its reply (``RELOADING``)."""
        return self.command("RELOAD", timeout).strip("\0\n ")

    def instream(self, data: bytes, timeout: float) -> Verdict:
        """Scan ``data``; raises ClamdError when this server gave no verdict.

        The kept session serves one scan at a time: a thread that finds it busy scans over a
        connection of its own, closed afterwards."""
        if not self.session_lock.acquire(blocking=False):
            alone = ClamdServer(self.address, self.connect_timeout)
            try:
                return alone._instream(data, timeout)
            finally:
                alone.close()
        try:
            return self._instream(data, timeout)
        finally:
            self.session_lock.release()

    def _instream(self, data: bytes, timeout: float) -> Verdict:
        deadline = time.monotonic() + timeout
        kept = self._usable_session()
        try:
            try:
                verdict = self._scan_in_session(data, deadline, timeout)
            except _StaleSession:
                if not kept:
                    raise
                self.close()
                verdict = self._scan_in_session(data, deadline, timeout)  # once, on a fresh connection
        except ClamdError:
            self.close()
            raise
        if verdict.status != CLEAN and not verdict.names:
            self.close()  # an error reply: clamd may have ended the session
        return verdict

    def close(self) -> None:
        """End the kept session, if any (the next scan opens a new one)."""
        if self.session is not None:
            try:
                self.session.setblocking(False)
                self.session.send(b"zEND\0")
            except OSError:
                pass
            self.session.close()
            self.session = None

    def _usable_session(self) -> bool:
        """Whether a kept session is there and not closed by clamd in the meantime."""
        if self.session is not None and _readable(self.session):
            self.close()  # EOF (restart), COMMAND READ TIMED OUT (ReadTimeout): start afresh
        return self.session is not None

    def _open_session(self, deadline: float) -> socket.socket:
        sock = self._connect(deadline)
        try:
            _settimeout(sock, deadline)
            sock.sendall(b"zIDSESSION\0")
        except OSError as exc:
            sock.close()
            raise ClamdError(f"{self.address}: IDSESSION failed: {exc}") from None
        self.session, self.requests = sock, 0
        self.sessions_opened += 1
        return sock

    def _scan_in_session(self, data: bytes, deadline: float, timeout: float) -> Verdict:
        sock = self.session or self._open_session(deadline)
        self.requests += 1
        try:
            reply = _send_stream(sock, data, deadline)
        except socket.timeout:
            raise _Timeout(f"{self.address}: no verdict within {timeout:g}s") from None
        except OSError as exc:
            # clamd closes the connection after refusing an oversized stream;
            # its reply may still be waiting in our receive buffer.
            reply = _salvage_reply(sock)
            if not reply:
                raise _StaleSession(f"{self.address}: INSTREAM failed: {exc}") from None
        if not reply:
            raise _StaleSession(f"{self.address}: INSTREAM failed: connection closed without a reply")
        tag = f"{self.requests}: "
        if not reply.startswith(tag):
            self.close()  # not an answer to this request (clamd's own error lines carry no number)
            return _parse_scan_reply(reply, self.address)
        return _parse_scan_reply(reply[len(tag) :], self.address)


def _send_stream(sock: socket.socket, data: bytes, deadline: float) -> str:
    """INSTREAM ``data`` and read the reply (empty when the connection closed first). Data that
    fits one chunk goes in one write with the command and the end mark (one system call, one read
    for clamd, instead of four); longer data chunk by chunk, watching for an early refusal."""
    _settimeout(sock, deadline)
    if len(data) <= CHUNK:
        stream = (struct.pack(">I", len(data)), data) if data else ()
        sock.sendall(b"".join((b"zINSTREAM\0", *stream, _END)))
        return _read_reply(sock, deadline)
    sock.sendall(b"zINSTREAM\0")
    view = memoryview(data)
    for offset in range(0, len(view), CHUNK):
        piece = view[offset : offset + CHUNK]
        _settimeout(sock, deadline)
        sock.sendall(struct.pack(">I", len(piece)))
        sock.sendall(piece)
        if _readable(sock):  # clamd answers early only to refuse the stream (or has closed)
            break
    else:
        sock.sendall(_END)
    return _read_reply(sock, deadline)


def _parse_address(address: str) -> tuple[int, Any]:
    if address.startswith("unix:"):
        return socket.AF_UNIX, address[len("unix:") :]
    if address.startswith("/"):
        return socket.AF_UNIX, address
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"clamd address {address!r}: expected unix:/path or host:port")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(port))


def _settimeout(sock: socket.socket, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("deadline passed")
    sock.settimeout(left)


def _readable(sock: socket.socket) -> bool:
    ready, _, _ = select.select([sock], [], [], 0)
    return bool(ready)


def _read_reply(sock: socket.socket, deadline: float) -> str:
    """Read until the terminating NUL, EOF or MAX_REPLY bytes."""
    reply = bytearray()
    while len(reply) < MAX_REPLY:
        _settimeout(sock, deadline)
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
        if reply.endswith(b"\0"):
            break
    return reply.decode("utf-8", "replace")


def _salvage_reply(sock: socket.socket) -> str:
    try:
        sock.settimeout(0.5)
        return _read_reply(sock, time.monotonic() + 0.5)
    except OSError:
        return ""


class ClamdPool:
    """Several clamd servers used in turn; a failed server is skipped for a while.

    ``scan`` tries the servers that are up, starting with the next one in turn
    (load sharing); when every server is marked down it tries them all anyway,
    since that is the quickest way to notice one came back.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        scan_timeout: float = 120.0,
        connect_timeout: float = CONNECT_TIMEOUT,
        retry_after: float = RETRY_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not addresses:
            raise ValueError("no clamd address configured (ClamdAddress)")
        self.servers = [ClamdServer(address, connect_timeout) for address in addresses]
        self.scan_timeout = float(scan_timeout) if scan_timeout and scan_timeout > 0 else MAX_SCAN_TIME
        self.retry_after = retry_after
        self.clock = clock
        self._turn = 0

    @classmethod
    def from_config(cls, ave: Any) -> ClamdPool:
        """A pool from ``[smtpgw.ave]``: ClamdAddress and ScanTimeout."""
        return cls(list(ave.ClamdAddress), scan_timeout=float(getattr(ave, "ScanTimeout", 0) or 0))

    def _order(self) -> list[ClamdServer]:
        now = self.clock()
        count = len(self.servers)
        rotated = [self.servers[(self._turn + i) % count] for i in range(count)]
        self._turn = (self._turn + 1) % count
        up = [server for server in rotated if server.down_until <= now]
        return up or rotated

    def _mark_down(self, server: ClamdServer, problem: str) -> None:
        if server.down_until <= self.clock():
            log.warning("clamd %s unavailable: %s", server.address, problem)
        server.down_until = self.clock() + self.retry_after
        server.failure = problem

    def _mark_up(self, server: ClamdServer) -> None:
        if server.failure:
            log.info("clamd %s is back", server.address)
        server.down_until = 0.0
        server.failure = ""

    def scan(self, data: bytes) -> Verdict:
        """The verdict of the first server that gives one; raises ScannerUnavailable."""
        problems: list[str] = []
        for server in self._order():
            try:
                verdict = server.instream(data, self.scan_timeout)
            except _Timeout as exc:
                try:
                    server.ping(min(PING_TIMEOUT, self.scan_timeout))
                except ClamdError as ping_exc:
                    self._mark_down(server, str(ping_exc))
                    problems.append(str(exc))
                    continue
                self._mark_up(server)
                detail = f"scan timed out after {self.scan_timeout:g}s (ScanTimeout)"
                return Verdict(ERROR, (), detail, server.address)
            except ClamdError as exc:
                self._mark_down(server, str(exc))
                problems.append(str(exc))
                continue
            self._mark_up(server)
            return verdict
        raise ScannerUnavailable("; ".join(problems))

    def engine(self, address: str | None = None) -> EngineVersion:
        """The VERSION of one server (or the first that answers), cached a while."""
        servers = [s for s in self.servers if s.address == address] if address else self._order()
        problems: list[str] = []
        for server in servers:
            cached = server.version_info
            if cached and self.clock() - cached[0] < VERSION_MAX_AGE:
                return cached[1]
            try:
                version = server.version()
            except ClamdError as exc:
                problems.append(str(exc))
                continue
            server.version_info = (self.clock(), version)
            return version
        raise ScannerUnavailable("; ".join(problems) or f"unknown clamd address {address!r}")

    def check_health(self) -> dict[str, bool]:
        """PING every server, updating its state; address → answered."""
        state: dict[str, bool] = {}
        for server in self.servers:
            try:
                server.ping()
            except ClamdError as exc:
                self._mark_down(server, str(exc))
                state[server.address] = False
            else:
                self._mark_up(server)
                state[server.address] = True
        return state

    def close(self) -> None:
        """End every server's kept session (a worker that stops)."""
        for server in self.servers:
            server.close()

    def reload(self) -> dict[str, str]:
        """RELOAD on every server; address → its reply or the failure."""
        replies: dict[str, str] = {}
        for server in self.servers:
            try:
                replies[server.address] = server.reload()
                server.version_info = None
            except ClamdError as exc:
                replies[server.address] = f"failed: {exc}"
        return replies
