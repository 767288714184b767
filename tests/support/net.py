"""Real SMTP peers for tests: a recording next-hop sink and the gateway as a process.

``Sink`` is a small threaded SMTP server with scriptable replies (what a real
next hop says: 250, 4xx, 5xx, no PIPELINING, no 8BITMIME...). ``GatewayProcess``
runs ``smtpgw.py -c CONF`` in a temp folder on free loopback ports and waits on
its log lines, never on sleeps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pytest

from smtpgw.config import SCHEMA

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMTPGW = os.path.join(REPO, "smtpgw.py")
CORPUS = os.path.join(os.path.dirname(REPO), "shared", "corpus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on ``host:port``."""
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll ``predicate`` (state another process changes) until true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    mail_line: str = ""
    rcpt_lines: list[str] = field(default_factory=list)


class Sink:
    """A next-hop SMTP server that records what it receives.

    ``replies`` maps a verb (EHLO, MAIL, RCPT, DATA, DOT) to a list of replies
    used in turn (the last one repeats); ``extensions`` is what EHLO offers.
    """

    def __init__(self, extensions: tuple[str, ...] = ("PIPELINING", "8BITMIME", "SIZE 104857600", "DSN", "ENHANCEDSTATUSCODES"),
                 port: int = 0) -> None:
        self.extensions = list(extensions)
        self.replies: dict[str, list[str]] = {}
        self.rcpt_reply: Callable[[str], str | None] | None = None  # per-address RCPT reply
        self.messages: list[Received] = []
        self.commands: list[str] = []
        self.connections = 0
        # set: a message's end of data gets no reply until it is set, then the connection is
        # closed unanswered and nothing recorded (a next hop that never answered)
        self.stall: threading.Event | None = None
        self.stalled = 0
        self.cond = threading.Condition()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _reply(self, verb: str, default: str) -> str:
        with self.cond:
            script = self.replies.get(verb)
            if not script:
                return default
            return script.pop(0) if len(script) > 1 else script[0]

    def _serve(self) -> None:
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.cond:
                self.connections += 1
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        send = conn.sendall
        try:
            send((self._reply("CONNECT", "220 sink.test ESMTP") + "\r\n").encode())
            sender, rcpts, mail_line, rcpt_lines = None, [], "", []
            while True:
                raw = f.readline(65536)
                if not raw:
                    return
                line = raw.decode("latin-1").rstrip("\r\n")
                verb = line.split(" ", 1)[0].upper()
                with self.cond:
                    self.commands.append(line)
                if verb == "EHLO":
                    reply = self._reply("EHLO", "")
                    if reply:
                        send((reply + "\r\n").encode())
                        continue
                    lines = ["sink.test"] + self.extensions
                    send("".join(f"250{'-' if i < len(lines) - 1 else ' '}{l}\r\n" for i, l in enumerate(lines)).encode())
                elif verb == "HELO":
                    send(b"250 sink.test\r\n")
                elif verb == "MAIL":
                    reply = self._reply("MAIL", "250 2.1.0 ok")
                    if reply.startswith("2"):
                        sender = re.search(r"<([^>]*)>", line).group(1)
                        mail_line, rcpts, rcpt_lines = line, [], []
                    send((reply + "\r\n").encode())
                elif verb == "RCPT":
                    reply = self._reply("RCPT", "250 2.1.5 ok")
                    if self.rcpt_reply is not None:
                        reply = self.rcpt_reply(re.search(r"<([^>]*)>", line).group(1)) or reply
                    if reply.startswith("2"):
                        rcpts.append(re.search(r"<([^>]*)>", line).group(1))
                        rcpt_lines.append(line)
                    send((reply + "\r\n").encode())
                elif verb == "DATA":
                    if sender is None or not rcpts:
                        send(b"554 5.5.1 no valid recipients\r\n")
                        continue
                    reply = self._reply("DATA", "354 go ahead")
                    send((reply + "\r\n").encode())
                    if not reply.startswith("354"):
                        continue
                    chunks = []
                    while True:
                        raw = f.readline()
                        if not raw:
                            return
                        if raw == b".\r\n":
                            break
                        chunks.append(raw[1:] if raw.startswith(b".") else raw)
                    stall = self.stall
                    if stall is not None:
                        with self.cond:
                            self.stalled += 1
                            self.cond.notify_all()
                        stall.wait(60)
                        return
                    reply = self._reply("DOT", "250 2.0.0 queued")
                    if reply.startswith("2"):
                        with self.cond:
                            self.messages.append(Received(sender, rcpts, b"".join(chunks), mail_line, rcpt_lines))
                            self.cond.notify_all()
                    send((reply + "\r\n").encode())
                    sender, rcpts = None, []
                elif verb == "RSET":
                    sender, rcpts = None, []
                    send(b"250 2.0.0 ok\r\n")
                elif verb == "QUIT":
                    send(b"221 2.0.0 bye\r\n")
                    return
                else:
                    send(b"250 2.0.0 ok\r\n")
        except OSError:
            return
        finally:
            conn.close()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.messages) >= count, timeout):
                raise AssertionError(f"sink got {len(self.messages)} of {count} messages in {timeout}s")
            return list(self.messages)

    def wait_stalled(self, count: int, timeout: float = 20.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.stalled >= count, timeout):
                raise AssertionError(f"sink stalled {self.stalled} of {count} messages in {timeout}s")

    def unstall(self) -> None:
        """Stalled sessions close unanswered; new ones are answered again."""
        stall, self.stall = self.stall, None
        if stall is not None:
            stall.set()

    def close(self) -> None:
        self.running = False
        try:
            # wakes the thread blocked in accept(): on Linux close() alone leaves the port listening
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


BASE_CONFIG: dict[str, list[tuple[str, str]]] = {
    "smtpgw.network": [("Hostname", "gw.example.test"), ("Postmaster", "postmaster@example.test"), ("ProtectedDomains", "example.test")],
    "smtpgw.access": [
        ("RelayRule", "allow from 127.0.0.0/8 to *"),
        ("RelayRule", "allow from any to *@example.test"),
        ("RelayRule", "deny from any to *"),
    ],
    "smtpgw.path": [("QueuePath", "var/queue"), ("ControlPath", "var/control")],
    "smtpgw.options": [("LogFile", "var/smtpgw.log"), ("LogLevel", "debug"), ("ControlPollInterval", "1")],
    # the spam filter is exercised by its own tests; elsewhere its tags would change the bytes checked
    "smtpgw.antispam": [("Check", "false")],
    "smtpgw.policy": [
        # relay tests pass mail unscanned; the anti-virus tests turn Check on with a real clamd
        ("Check", "false"), ("AdminNotifyAddress", "admin@example.test"), ("NotifyFromAddress", "gateway@example.test"),
        ("QuarantinePath", "var/quarantine"), ("BackupPath", "var/backup"),
    ],
}


class GatewayProcess:
    """``smtpgw.py -c CONF`` in a folder of its own."""

    def __init__(self, folder: str, sink_port: int | None, extra: dict[str, list[tuple[str, str]]] | None = None,
                 replace: dict[str, list[tuple[str, str]]] | None = None) -> None:
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.port = free_port()
        sections = {k: list(v) for k, v in BASE_CONFIG.items()}
        if os.environ.get("SMTPGW_TEST_DELIVERY_PROCESS"):  # all tests on one path: yes (the default) or no
            sections.setdefault("smtpgw.limits", []).append(("DeliveryProcess", os.environ["SMTPGW_TEST_DELIVERY_PROCESS"]))
        sections["smtpgw.network"].insert(0, ("ListenOn", f"127.0.0.1:{self.port}"))
        if sink_port is not None:
            sections["smtpgw.forward"] = [("ForwardRoute", f"* [127.0.0.1:{sink_port}]")]
        for name, items in (replace or {}).items():
            sections[name] = list(items)
        repeatable = {(p.section, p.key) for p in SCHEMA if p.repeatable}
        for name, items in (extra or {}).items():
            current = sections.setdefault(name, [])
            for key, value in items:
                if (name, key) not in repeatable:  # a single-valued key: the extra value replaces it
                    current[:] = [(k, v) for k, v in current if k != key]
                current.append((key, value))
        self.config = os.path.join(folder, "smtpgw.conf")
        with open(self.config, "w") as f:
            for name, items in sections.items():
                f.write(f"[{name}]\n" + "".join(f"{k}={v}\n" for k, v in items))
        self.log_path = os.path.join(folder, "var", "smtpgw.log")
        self.queue = os.path.join(folder, "var", "queue")
        self.control_path = os.path.join(folder, "var", "control")
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.killed = False
        self._log_offset = 0

    def start(self, timeout: float = 20.0) -> "GatewayProcess":
        self.killed = False
        self._log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        self.proc = subprocess.Popen(
            [sys.executable, SMTPGW, "-c", self.config, "-n"], cwd=self.folder,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.wait_log(r"smtpgw started", timeout, since_start=True)
        return self

    def log_text(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 20.0, since_start: bool = False, count: int = 1) -> list[str]:
        regex = re.compile(pattern)

        def found() -> list[str] | None:
            if self.proc is not None and self.proc.poll() is not None:
                output = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
                raise AssertionError(f"gateway exited with {self.proc.returncode}: {output}\n{self.log_text()[-3000:]}")
            text = self.log_text()
            if since_start:
                text = text[self._log_offset:]
            hits = [line for line in text.splitlines() if regex.search(line)]
            return hits if len(hits) >= count else None

        return wait_until(found, timeout, f"log line /{pattern}/ x{count}")  # type: ignore[return-value]

    def started_pid(self, pattern: str, count: int = 1) -> int:
        """The pid the ``count``-th line since the start matching ``pattern`` (one group) names."""
        lines = self.wait_log(pattern, since_start=True, count=count)
        found = re.search(pattern, lines[count - 1])
        assert found is not None
        return int(found.group(1))

    def queued(self, state: str | None = None) -> list[str]:
        states = [state] if state else ["WFC", "CHK", "WFS", "SPL", "QUE", "SND"]
        out = []
        for s in states:
            folder = os.path.join(self.queue, s)
            if os.path.isdir(folder):
                out += [n for n in os.listdir(folder) if not n.startswith(".")]
        return out

    def control(self, name: str) -> None:
        os.makedirs(self.control_path, exist_ok=True)
        open(os.path.join(self.control_path, name), "w").close()

    def memory_report(self, timeout: float = 60.0) -> dict:
        """``.c_memory``: the gateway's report of what its main process holds (smtpgw/app/memory.py)."""
        path = os.path.join(self.control_path, "memory")
        if os.path.exists(path):
            os.unlink(path)
        self.control(".c_memory")
        wait_until(lambda: os.path.exists(path), timeout, "the .c_memory report")
        with open(path) as f:
            return json.load(f)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, SMTPGW, "-c", self.config, *args], cwd=self.folder,
                              capture_output=True, text=True, timeout=timeout)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait: returns the exit code (0 for a clean stop)."""
        if self.proc is None or self.proc.poll() is not None:
            return 0 if self.proc is None or self.killed else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.killed = True


def gone(pid: int) -> bool:
    """The process ``pid`` has exited (a zombie has too)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


@pytest.fixture
def make_gateway(tmp_path) -> Iterator[Callable[..., GatewayProcess]]:
    """``make_gateway(sink_port, extra={...}, start=True)`` → a running GatewayProcess."""
    started: list[GatewayProcess] = []

    def make(sink_port: int | None, extra=None, replace=None, start: bool = True, name: str = "gw") -> GatewayProcess:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        gw = GatewayProcess(str(folder), sink_port, extra, replace)
        started.append(gw)
        return gw.start() if start else gw

    yield make
    for gw in started:
        code = gw.stop()
        assert code == 0, f"gateway exit code {code}: {gw.log_text()[-2000:]}"


@pytest.fixture(params=["yes", "no"], ids=["delivery-process", "one-process"])
def both_delivery_paths(request, monkeypatch) -> str:  # type: ignore[no-untyped-def]
    """A test that uses it (``@pytest.mark.usefixtures("both_delivery_paths")``, set up before the
    gateway fixtures) runs twice: with the Sender in the delivery process (DeliveryProcess=yes, the
    default) and in the main process (no), whatever SMTPGW_TEST_DELIVERY_PROCESS says for the rest."""
    monkeypatch.setenv("SMTPGW_TEST_DELIVERY_PROCESS", request.param)
    return request.param


@pytest.fixture
def gateway(make_gateway, sink) -> GatewayProcess:
    return make_gateway(sink.port)


def admits(port: int) -> bool:
    """Whether the gateway on ``port`` greets a new connection with 220 (not a 421 refusal)."""
    client = RawClient(port)
    try:
        return client.reply()[0] == 220
    finally:
        client.close()


class RawClient:
    """A plain socket SMTP client for what smtplib will not send (pipelining, smuggling, junk)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0, source: str | None = None) -> None:
        """``source``: the local address to connect from (another loopback address is another client)."""
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buffer = b""

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def reply(self) -> tuple[int, str]:
        """One (possibly multi-line) reply: (code, last line's text)."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"connection closed; got {lines!r} {self.buffer!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            text = line.decode("utf-8", "replace")
            lines.append(text)
            if len(text) < 4 or text[3] == " ":
                return int(text[:3]), text[4:]

    def cmd(self, line: str) -> tuple[int, str]:
        self.send(line + "\r\n")
        return self.reply()

    def closed(self) -> bool:
        """True when the server has closed the connection (reads EOF)."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, OSError):
            return True

    def close(self) -> None:
        self.sock.close()
