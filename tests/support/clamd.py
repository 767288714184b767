"""A private clamd for tests and benchmarks, and the anti-virus test samples.

Owns: starting Debian's ``/usr/sbin/clamd`` with its own clamd.conf in a
temporary folder (unix socket, TCP on a free 127.0.0.1 port, only the
project's test signatures from tests/data/clamd), waiting until it answers
PING, killing and restarting it (scanner-down tests), and stopping it; the
pytest fixtures ``clamd`` (one per session) and ``clamd_factory`` (extra
instances a test may break); and the samples the signatures match, built at
run time: the EICAR test file is assembled from pieces so that no file of the
repository holds it whole, and so are the custom markers.

Must never: use the system clamd, its databases or its sockets, listen
beyond 127.0.0.1, or run freshclam. Usable without pytest running:
``start_clamd()`` returns a ``ClamdInstance`` (bench/scanner.py uses it).

As root, clamd runs as root (no ``User`` line: it would have to drop to an
account that can read the temporary folder); as any other user it runs as
that user. Both are exercised by tests/test_av.py.
"""

from __future__ import annotations

import binascii
import io
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import tarfile
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.components import require, which
from tests.support.net import free_port

__all__ = [
    "SIGNATURES",
    "ClamdInstance",
    "STALL_MARKER",
    "StallingClamd",
    "start_clamd",
    "clamd",
    "clamd_factory",
    "stalling_clamd",
    "eicar",
    "custom_marker",
    "suspect_marker",
    "zip_bytes",
    "encrypted_zip",
    "tar_gz",
    "mime_message",
]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIGNATURES = os.path.join(REPO, "tests", "data", "clamd")
START_TIMEOUT = 60.0
# Names the signatures in tests/data/clamd report (clamd adds ".UNOFFICIAL").
EICAR_NAME = "Smtpgw.Test.Eicar.UNOFFICIAL"
CUSTOM_NAME = "Smtpgw.Test.Custom.UNOFFICIAL"
SUSPECT_NAME = "PUA.Smtpgw.Test.Suspect.UNOFFICIAL"
STALL_MARKER = b"smtpgw-test: this scan never ends"  # what StallingClamd holds


# region samples


def eicar() -> bytes:
    """The 68-byte EICAR anti-virus test file, assembled here and nowhere stored whole."""
    head = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$"
    middle = b"EICAR-STANDARD-" + b"ANTIVIRUS-TEST-FILE!"
    return head + middle + b"$H+H*"


def custom_marker() -> bytes:
    """Content matching the project's own signature Smtpgw.Test.Custom."""
    return b"SMTPGW-TEST-" + b"CUSTOM-SIGNATURE-7f3a"


def suspect_marker() -> bytes:
    """Content matching PUA.Smtpgw.Test.Suspect (a status ``suspicious`` detection)."""
    return b"SMTPGW-TEST-" + b"SUSPECT-SIGNATURE-9c1e"


def zip_bytes(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(c)
    return table


def encrypted_zip(name: str, data: bytes, password: bytes) -> bytes:
    """A zip with one stored member under traditional PKWARE encryption (APPNOTE 6.1).

    zipfile can read such members but not write them, so the entry is built here.
    """
    table = _crc_table()
    keys = [0x12345678, 0x23456789, 0x34567890]

    def update(byte: int) -> None:
        keys[0] = table[(keys[0] ^ byte) & 0xFF] ^ (keys[0] >> 8)
        keys[1] = ((keys[1] + (keys[0] & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        keys[2] = table[(keys[2] ^ (keys[1] >> 24)) & 0xFF] ^ (keys[2] >> 8)

    def stream_byte() -> int:
        temp = (keys[2] | 2) & 0xFFFF
        return ((temp * (temp ^ 1)) >> 8) & 0xFF

    for byte in password:
        update(byte)
    crc = zlib.crc32(data)
    plain = bytes(range(11)) + bytes([crc >> 24]) + data  # 12-byte header, last byte checks the password
    cipher = bytearray()
    for byte in plain:
        cipher.append(byte ^ stream_byte())
        update(byte)
    encoded = name.encode("utf-8")
    common = struct.pack("<HHHHHIIIHH", 20, 0x0001, 0, 0, 0x21, crc, len(cipher), len(data), len(encoded), 0)
    local = b"PK\x03\x04" + common + encoded + bytes(cipher)
    central = b"PK\x01\x02" + struct.pack("<H", 20) + common + struct.pack("<HHHII", 0, 0, 0, 0, 0) + encoded
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 1, 1, len(central), len(local), 0)
    return local + central + end


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes], extended: bytes = b"", fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    """An uncompressed tar of ``members``; ``extended``, when given, is the content of a pax
    extended header (typeflag ``x``) written first, as it is, whatever it holds."""
    head = b""
    if extended:
        info = tarfile.TarInfo("././@PaxHeader")
        info.type, info.size = tarfile.XHDTYPE, len(extended)
        head = info.tobuf(tarfile.USTAR_FORMAT) + extended + bytes(-len(extended) % 512)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return head + buffer.getvalue()


def uu_flood(parts: int, blocks: int, tail: bytes = b"") -> bytes:
    """A message of ``parts`` text parts each holding ``blocks`` distinct tiny uuencoded files
    (one clamd scan each, were every object scanned on its own); ``tail``, when given, is the
    content of one more uuencoded file at the very end."""
    def block(name: str, data: bytes) -> bytes:
        lines = b"".join(binascii.b2a_uu(data[i : i + 45]) for i in range(0, len(data), 45))
        return b"begin 644 " + name.encode() + b"\r\n" + lines.replace(b"\n", b"\r\n") + b"`\r\nend\r\n"

    bodies = [b"".join(block(f"f{p}-{b}.bin", b"%d/%d" % (p, b)) for b in range(blocks)) for p in range(parts)]
    if tail:
        bodies[-1] += block("last.com", tail)
    return mime_message([("Content-Type: text/plain", body) for body in bodies])


def mime_message(
    parts: list[tuple[str, bytes]], eol: bytes = b"\r\n", boundary: str = "=_b0und4ry"
) -> bytes:
    """A multipart/mixed message from (part header lines, body) pairs, e.g.
    ``("Content-Type: text/plain", b"hi")``; header lines are joined with ``eol``."""
    head = [
        "From: sender@example.test",
        "To: rcpt@example.test",
        "Subject: av sample",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/mixed; boundary="{boundary}"',
    ]
    out = eol.join(line.encode() for line in head) + eol + eol + b"preamble" + eol
    for part_headers, body in parts:
        out += b"--" + boundary.encode() + eol
        out += eol.join(line.encode() for line in part_headers.split("\n")) + eol + eol
        out += body + eol
    return out + b"--" + boundary.encode() + b"--" + eol + b"epilogue" + eol


# endregion
# region the private clamd


def _config(workdir: str, port: int, stream_max_length: str, extra: Sequence[str], temporary: str) -> str:
    return "\n".join(
        [
            "Foreground yes",
            f"LocalSocket {workdir}/clamd.sock",
            "FixStaleSocket yes",
            f"TCPSocket {port}",
            "TCPAddr 127.0.0.1",
            f"DatabaseDirectory {workdir}/db",
            f"TemporaryDirectory {temporary}",
            f"StreamMaxLength {stream_max_length}",
            f"LogFile {workdir}/clamd.log",
            "LogTime yes",
            "DetectPUA yes",  # PUA.* signatures load only with this
            "HeuristicAlerts yes",
            "AlertEncrypted yes",  # Heuristics.Encrypted.* -> status protected
            "Bytecode no",
            "MaxThreads 4",
            "SelfCheck 3600",
            *extra,
            "",
        ]
    )


@dataclass
class ClamdInstance:
    """One private clamd: its folder, config, sockets and process."""

    binary: str
    workdir: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    user: str | None = None  # run as this account (needs root and setpriv)
    temporary: str = ""  # its TemporaryDirectory, when not in workdir (start_clamd's temporary_parent)

    @property
    def unix_path(self) -> str:
        return os.path.join(self.workdir, "clamd.sock")

    @property
    def unix_address(self) -> str:
        return "unix:" + self.unix_path

    @property
    def tcp_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def config_path(self) -> str:
        return os.path.join(self.workdir, "clamd.conf")

    def ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2.0)
                sock.connect(self.unix_path)
                sock.sendall(b"zPING\0")
                return sock.recv(16).startswith(b"PONG")
        except OSError:
            return False

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start clamd and return once it answers PING (fails after ``timeout``)."""
        command = [self.binary, "--config-file", self.config_path]
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            setpriv = which("setpriv") or "setpriv"
            ids = [f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]
            command = [setpriv, *ids, *command]
        output = open(os.path.join(self.workdir, "clamd.out"), "ab")
        with output:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.ping():
            try:
                # waits for clamd to exit, which is what a failed start looks like
                code = self.process.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"clamd did not answer PING within {timeout:g}s: {self.log_tail()}")
                continue
            raise RuntimeError(f"clamd exited with {code}: {self.log_tail()}")

    def log_tail(self, size: int = 2000) -> str:
        texts = []
        for name in ("clamd.out", "clamd.log"):
            try:
                with open(os.path.join(self.workdir, name), "rb") as handle:
                    texts.append(handle.read()[-size:].decode("utf-8", "replace"))
            except OSError:
                continue
        return "\n".join(texts)

    def kill(self) -> None:
        """SIGKILL, as a crash would: sockets stay behind, nothing is cleaned up."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self.temporary:
            shutil.rmtree(self.temporary, ignore_errors=True)


# A tmpfs for clamd's TemporaryDirectory in the benchmarks: clamd writes each stream it scans to a
# file there, and on a disk file system those files cost it more CPU than the scan (bench/PROFILE.md)
RAM_DISK = "/dev/shm" if os.path.isdir("/dev/shm") else None


def start_clamd(
    binary: str | None = None,
    stream_max_length: str = "4M",
    user: str | None = None,
    extra: Sequence[str] = (),
    temporary_parent: str | None = None,
) -> ClamdInstance:
    """A running private clamd in a new folder under /tmp (short unix socket path).

    ``user`` (as root only) runs clamd under that account, which then owns the
    folder; ``extra`` are more clamd.conf lines (e.g. ``DisableCache yes``);
    ``temporary_parent``: where its TemporaryDirectory (a file per scanned stream)
    is made, e.g. a tmpfs; by default in its folder.
    """
    binary = binary or which("clamd")
    if binary is None:
        raise RuntimeError("clamd not installed (Debian package clamav-daemon)")
    workdir = tempfile.mkdtemp(prefix="smtpgw-clamd-")
    os.chmod(workdir, 0o755)
    shutil.copytree(SIGNATURES, os.path.join(workdir, "db"), ignore=shutil.ignore_patterns("*.md"))
    if temporary_parent is None:
        temporary = os.path.join(workdir, "tmp")
        os.mkdir(temporary)
    else:
        temporary = tempfile.mkdtemp(prefix="smtpgw-clamd-tmp-", dir=temporary_parent)
        os.chmod(temporary, 0o755)
    instance = ClamdInstance(binary, workdir, free_port(), user=user,
                             temporary="" if temporary_parent is None else temporary)
    with open(instance.config_path, "w", encoding="ascii") as handle:
        handle.write(_config(workdir, instance.port, stream_max_length, extra, temporary))
    if user is not None:
        entry = pwd.getpwnam(user)
        for folder, _, names in [*os.walk(workdir), (temporary, [], [])]:
            for path in (folder, *(os.path.join(folder, name) for name in names)):
                os.chown(path, entry.pw_uid, entry.pw_gid)
    try:
        instance.start()
    except BaseException:
        instance.remove()
        raise
    return instance


class StallingClamd:
    """A clamd that hangs on chosen messages, for the scanner's failure tests: a unix socket
    in front of a real ``ClamdInstance`` (single requests and IDSESSION). A request whose stream carries ``marker`` gets no
    answer (as a scan stuck in the engine) until ``release()``, which hands it to the real
    clamd; every other request goes to the real clamd at once. ``held_pids`` are the
    processes (SO_PEERCRED) whose requests are held: the scanner workers stuck on them."""

    MAX_REQUEST = 64 * 1024 * 1024

    def __init__(self, upstream: ClamdInstance, marker: bytes) -> None:
        self.upstream = upstream
        self.marker = marker
        self.folder = tempfile.mkdtemp(prefix="smtpgw-stall-")
        self.path = os.path.join(self.folder, "clamd.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(16)
        self.held_pids: list[int] = []
        self.released = threading.Event()
        self.closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def address(self) -> str:
        return "unix:" + self.path

    def _serve(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        """One connection: a single request, or an IDSESSION's requests until END or EOF
        (each forwarded alone; its reply tagged with its number, as clamd does)."""
        with conn:
            try:
                conn.settimeout(30)
                request, data = self._read_request(conn)
                if request != b"zIDSESSION\0":
                    self._answer(conn, request, data, b"")
                    return
                number = 0
                while not self.closed:
                    request, data = self._read_request(conn)
                    if request == b"zEND\0":
                        return
                    number += 1
                    self._answer(conn, request, data, b"%d: " % number)
            except (OSError, ValueError):
                return  # the worker went away (killed) or the request was cut: nothing to answer

    def _answer(self, conn: socket.socket, request: bytes, data: bytes, tag: bytes) -> None:
        if self.marker in data:
            pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            self.held_pids.append(pid)
            self.released.wait()
            if self.closed:
                raise ValueError("stopped")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as up:
            up.settimeout(30)
            up.connect(self.upstream.unix_path)
            up.sendall(request)
            reply = b""
            while not reply.endswith(b"\0"):
                chunk = up.recv(4096)
                if not chunk:
                    break
                reply += chunk
        conn.sendall(tag + reply)

    def _read_request(self, conn: socket.socket) -> tuple[bytes, bytes]:
        """(the request's bytes as sent, the scanned stream's bytes)."""
        request = bytearray()
        while not request.endswith(b"\0"):
            request += self._exactly(conn, 1)
            if len(request) > 64:
                raise ValueError("not a clamd command")
        if bytes(request) != b"zINSTREAM\0":
            return bytes(request), b""
        data = bytearray()
        while True:
            head = self._exactly(conn, 4)
            request += head
            size = struct.unpack(">I", head)[0]
            if not size:
                return bytes(request), bytes(data)
            if len(data) + size > self.MAX_REQUEST:
                raise ValueError("stream too long")
            piece = self._exactly(conn, size)
            request += piece
            data += piece

    @staticmethod
    def _exactly(conn: socket.socket, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            chunk = conn.recv(size - len(out))
            if not chunk:
                raise ValueError("connection closed mid-request")
            out += chunk
        return bytes(out)

    def release(self) -> None:
        """Held requests (and any later ones) go to the real clamd."""
        self.released.set()

    def close(self) -> None:
        self.closed = True
        self.released.set()
        self.sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)


# endregion
# region fixtures


@pytest.fixture(scope="session")
def clamd() -> Iterator[ClamdInstance]:
    """The session's private clamd (unix_address, tcp_address); tests must not stop it."""
    instance = start_clamd(require("clamd", "clamav-daemon"))
    yield instance
    instance.remove()


@pytest.fixture
def stalling_clamd(clamd: ClamdInstance) -> Iterator[StallingClamd]:
    """A clamd in front of the session's one that holds every stream carrying ``STALL_MARKER``."""
    front = StallingClamd(clamd, STALL_MARKER)
    yield front
    front.close()


@pytest.fixture
def clamd_factory() -> Iterator[Callable[..., ClamdInstance]]:
    """Start extra clamd instances a test may kill; all are removed afterwards."""
    binary = require("clamd", "clamav-daemon")
    started: list[ClamdInstance] = []

    def factory(**options: Any) -> ClamdInstance:
        instance = start_clamd(binary, **options)
        started.append(instance)
        return instance

    yield factory
    for instance in started:
        instance.remove()


# endregion
