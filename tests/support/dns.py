"""Real DNS servers on loopback for the resolver, DNSBL and MX tests.

Owns: starting Debian's ``dnsmasq`` serving the test zone (``start_dnsmasq``, the session fixture
``dns_server``), and ``ScriptedDNSServer``, a small authoritative server in Python speaking DNS over
UDP and TCP on 127.0.0.1 for the replies dnsmasq cannot be made to send (truncation, silence,
SERVFAIL, spoofed replies, compression loops, FORMERR to EDNS, SOA-capped negative answers).

Must never: listen beyond 127.0.0.1, forward a query anywhere, or borrow the wire format of the
resolver under test: the scripted server encodes and decodes on its own, so that it checks the
resolver rather than agreeing with it.
"""

from __future__ import annotations

import os
import selectors
import socket
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import pytest

from tests.support.components import require, which

__all__ = [
    "ZONE", "HOSTS", "MX_RECORDS", "TXT_RECORDS", "PTR_RECORDS", "CNAMES", "NULL_MX_DOMAIN",
    "IMPLICIT_MX_DOMAIN", "DANGLING_MX_DOMAIN", "MISSING_NAME", "DNSBL_ZONES", "DNSBL_ENTRIES",
    "TTL", "DnsmasqServer", "ScriptedDNSServer", "dnsmasq_args", "start_dnsmasq",
    "ask", "dns_loop", "dns_server", "scripted_dns", "silent_nameserver",
]

# region The test zone served by dnsmasq
TTL = 300
ZONE = "example.test"
HOSTS: dict[str, tuple[str, ...]] = {
    "mail1.example.test": ("192.0.2.11", "2001:db8::11"),
    "mail2.example.test": ("192.0.2.12",),
    "mail3.example.test": ("192.0.2.13",),
    "implicit.example.test": ("192.0.2.20", "2001:db8::20"),
}
# (domain, exchange, preference); "." is the null MX of RFC 7505.
NULL_MX_DOMAIN = "nullmx.example.test"
IMPLICIT_MX_DOMAIN = "implicit.example.test"  # has addresses and no MX
DANGLING_MX_DOMAIN = "dangling.example.test"  # its only MX host does not exist
MX_RECORDS: tuple[tuple[str, str, int], ...] = (
    (ZONE, "mail1.example.test", 10),
    (ZONE, "mail2.example.test", 20),
    (ZONE, "mail3.example.test", 20),
    (NULL_MX_DOMAIN, ".", 0),
    (DANGLING_MX_DOMAIN, "nohost.example.test", 10),
)
TXT_RECORDS: tuple[tuple[str, str], ...] = ((ZONE, "v=spf1 ip4:192.0.2.0/24 -all"),)
PTR_RECORDS: tuple[tuple[str, str], ...] = (("192.0.2.50", "client.example.test"),)
CNAMES: tuple[tuple[str, str], ...] = (("alias.example.test", "mail1.example.test"),)
MISSING_NAME = "nonexistent.example.test"

# DNSBL zones (RFC 5782): listed address -> the A record the zone answers.
DNSBL_ZONES = ("dnsbl.test", "dnsbl2.test")
DNSBL_ENTRIES: dict[str, dict[str, str]] = {
    "dnsbl.test": {
        "127.0.0.2": "127.0.0.2",  # RFC 5782 §5: every IPv4 DNSxL lists 127.0.0.2
        "192.0.2.66": "127.0.0.4",
        "2001:db8::66": "127.0.0.2",
        "192.0.2.67": "127.255.255.254",  # an operator's "query refused" code, not a listing
        "192.0.2.68": "192.0.2.1",  # outside 127.0.0.0/8: not a listing
    },
    "dnsbl2.test": {
        "127.0.0.2": "127.0.0.2",
        "192.0.2.66": "127.0.0.10",
    },
}


def _reversed(ip: str) -> str:
    packed = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    if len(packed) == 4:
        return ".".join(str(octet) for octet in reversed(packed))
    return ".".join(reversed(packed.hex()))


def dnsmasq_args(port: int) -> list[str]:
    """The dnsmasq command line (after the program) serving the test zone on 127.0.0.1:port."""
    args = [
        "--conf-file=/dev/null", "--no-resolv", "--no-hosts", f"--port={port}",
        "--listen-address=127.0.0.1", "--bind-interfaces", "--keep-in-foreground", "--pid-file=",
        f"--local-ttl={TTL}", f"--local=/{ZONE}/", "--local=/2.0.192.in-addr.arpa/",
    ]
    if os.geteuid() == 0:
        args.append("--user=nobody")  # drop root as dnsmasq does in production
    for zone in DNSBL_ZONES:
        args.append(f"--local=/{zone}/")
        for ip, code in DNSBL_ENTRIES[zone].items():
            args.append(f"--host-record={_reversed(ip)}.{zone},{code}")
    for name, addresses in HOSTS.items():
        args.append(f"--host-record={name},{','.join(addresses)}")
    for domain, exchange, preference in MX_RECORDS:
        args.append(f"--mx-host={domain},{exchange},{preference}")
    for name, text in TXT_RECORDS:
        args.append(f"--txt-record={name},{text}")
    for ip, name in PTR_RECORDS:
        args.append(f"--ptr-record={_reversed(ip)}.in-addr.arpa,{name}")
    for alias, target in CNAMES:
        args.append(f"--cname={alias},{target}")
    return args
# endregion


# region Wire format of the scripted server (written apart from smtpgw.net.dns on purpose)
_TYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28}


def _labels(name: str) -> bytes:
    out = b""
    for label in name.strip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode("ascii")
    return out + b"\0"


def _rdata(rtype: int, value: Any) -> bytes:
    if rtype == 1:
        return socket.inet_pton(socket.AF_INET, value)
    if rtype == 28:
        return socket.inet_pton(socket.AF_INET6, value)
    if rtype == 15:
        return struct.pack("!H", value[0]) + _labels(value[1])
    if rtype == 16:
        raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
        return b"".join(bytes([len(chunk)]) + chunk for chunk in chunks)
    if rtype == 6:  # value = MINIMUM
        return _labels("ns.invalid") + _labels("hostmaster.invalid") + struct.pack("!5I", 1, 3600, 600, 86400, value)
    return _labels(value)  # PTR, CNAME, NS


def _rr(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


@dataclass
class _Query:
    qid: int
    flags: int
    name: str
    qtype: int
    question: bytes  # the question section exactly as received
    edns_size: int  # 0 when the query carries no OPT record


def _parse_query(raw: bytes) -> _Query | None:
    if len(raw) < 12:
        return None
    qid, flags, qdcount, _, _, arcount = struct.unpack_from("!HHHHHH", raw, 0)
    if qdcount != 1:
        return None
    pos, labels = 12, []
    while pos < len(raw) and raw[pos] != 0:
        length = raw[pos]
        if length > 63:
            return None  # queries carry no compression
        labels.append(raw[pos + 1 : pos + 1 + length].decode("ascii", "replace"))
        pos += 1 + length
    if pos + 5 > len(raw):
        return None
    qtype = struct.unpack_from("!H", raw, pos + 1)[0]
    end = pos + 5
    edns = 0
    if arcount and raw[end : end + 3] == b"\0\0\x29" and len(raw) >= end + 5:
        edns = struct.unpack_from("!H", raw, end + 3)[0]
    return _Query(qid, flags, ".".join(labels).lower(), qtype, raw[12:end], edns)
# endregion


class ScriptedDNSServer:
    """An authoritative DNS server on 127.0.0.1 (UDP and TCP, same port) with scripted misbehaviour.

    ``add(name, "A", "192.0.2.1")`` serves records; ``behave(name, how)`` makes every query for
    ``name`` get one of: ``silent`` (no reply), ``servfail``, ``refused``, ``truncate`` (TC over
    UDP, the full answer over TCP), ``wrong-id``, ``wrong-question``, ``wrong-source`` (a forged
    reply carrying 192.0.2.66 first, then the real one), ``pointer-loop`` / ``pointer-self`` (an
    answer whose owner name is a compression loop), ``formerr-edns`` (FORMERR to any query with
    an OPT record, as pre-EDNS servers do), ``referral`` (no answer, the parent zone's NS in the
    authority section and no SOA, as a server that does not recurse answers). CNAMEs are served but never chased. ``soa(zone, n)``
    puts an SOA with MINIMUM n in negative answers below ``zone``. Every query is recorded in
    ``queries`` as (name, qtype, "udp"|"tcp").
    """

    POISON = "192.0.2.66"

    def __init__(self) -> None:
        self._records: dict[tuple[str, int], list[tuple[int, Any, int]]] = {}
        self._behaviour: dict[tuple[str, int | None], str] = {}
        self._soa: dict[str, int] = {}
        self.queries: list[tuple[str, int, str]] = []
        self.sources: list[tuple[int, int]] = []  # (query ID, client port) of each UDP query
        self._changed = threading.Condition()
        self.udp, self.tcp, self.port = _bind_pair()
        self._forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._forger.bind(("127.0.0.1", 0))
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="scripted-dns", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    # -- zone ------------------------------------------------------------------
    def add(self, name: str, rtype: str, value: Any, ttl: int = TTL) -> "ScriptedDNSServer":
        code = _TYPES[rtype]
        self._records.setdefault((name.lower().rstrip("."), code), []).append((code, value, ttl))
        return self

    def behave(self, name: str, behaviour: str, rtype: str | None = None) -> "ScriptedDNSServer":
        """Misbehave for queries of ``name`` (only those of type ``rtype`` when given)."""
        self._behaviour[(name.lower().rstrip("."), _TYPES[rtype] if rtype else None)] = behaviour
        return self

    def _behaviour_for(self, query: _Query) -> str | None:
        return self._behaviour.get((query.name, query.qtype)) or self._behaviour.get((query.name, None))

    def soa(self, zone: str, minimum: int) -> "ScriptedDNSServer":
        self._soa[zone.lower().rstrip(".")] = minimum
        return self

    def count(self, name: str | None = None, qtype: str | None = None, transport: str | None = None) -> int:
        with self._changed:
            return self._count_locked(name, qtype, transport)

    def wait_for_queries(self, n: int, timeout: float = 5.0, **filters: Any) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._count_locked(**filters) >= n, timeout)

    def _count_locked(self, name: str | None = None, qtype: str | None = None, transport: str | None = None) -> int:
        return sum(1 for q in self.queries if (name is None or q[0] == name)
                   and (qtype is None or q[1] == _TYPES[qtype]) and (transport is None or q[2] == transport))

    # -- life cycle --------------------------------------------------------------
    def start(self) -> "ScriptedDNSServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        for sock in (self.udp, self.tcp, self._forger, self._wake_r, self._wake_w):
            sock.close()

    def __enter__(self) -> "ScriptedDNSServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.udp, selectors.EVENT_READ, "udp")
        selector.register(self.tcp, selectors.EVENT_READ, "accept")
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        buffers: dict[socket.socket, bytearray] = {}
        while not self._stopping:
            for key, _ in selector.select():
                sock = key.fileobj
                if key.data == "udp":
                    try:
                        raw, peer = self.udp.recvfrom(65535)
                        self._answer_udp(raw, peer)
                    except OSError:
                        continue  # a client that is gone must not stop the server
                elif key.data == "accept":
                    conn, _ = self.tcp.accept()
                    buffers[conn] = bytearray()
                    selector.register(conn, selectors.EVENT_READ, "conn")
                elif key.data == "conn":
                    assert isinstance(sock, socket.socket)
                    if not self._read_tcp(sock, buffers[sock]):
                        selector.unregister(sock)
                        del buffers[sock]
                        sock.close()
        for conn in buffers:
            conn.close()
        selector.close()

    def _read_tcp(self, conn: socket.socket, buffer: bytearray) -> bool:
        try:
            chunk = conn.recv(65537)
        except OSError:
            return False
        if not chunk or len(buffer) + len(chunk) > 2 * 65537:
            return False
        buffer += chunk
        while len(buffer) >= 2 and len(buffer) >= 2 + int.from_bytes(buffer[:2], "big"):
            length = int.from_bytes(buffer[:2], "big")
            query = _parse_query(bytes(buffer[2 : 2 + length]))
            del buffer[: 2 + length]
            if query is None:
                return False
            self._record(query, "tcp")
            try:
                for reply in self._replies(query, "tcp"):
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
            except OSError:
                return False  # the client went away
        return True

    def _record(self, query: _Query, transport: str) -> None:
        with self._changed:
            self.queries.append((query.name, query.qtype, transport))
            self._changed.notify_all()

    def _answer_udp(self, raw: bytes, peer: Any) -> None:
        query = _parse_query(raw)
        if query is None:
            return
        self._record(query, "udp")
        with self._changed:
            self.sources.append((query.qid, peer[1]))
        behaviour = self._behaviour_for(query)
        if behaviour == "wrong-source":
            self._forger.sendto(self._poisoned(query, query.qid, query.question), peer)
        elif behaviour == "wrong-id":
            self.udp.sendto(self._poisoned(query, query.qid ^ 0x5A5A, query.question), peer)
        elif behaviour == "wrong-question":
            question = _labels("forged." + query.name) + query.question[-4:]
            self.udp.sendto(self._poisoned(query, query.qid, question), peer)
        for reply in self._replies(query, "udp"):
            self.udp.sendto(reply, peer)

    # -- replies -------------------------------------------------------------------
    def _header(self, query: _Query, rcode: int, counts: tuple[int, int, int], qid: int | None = None,
                tc: bool = False, question: bool = True) -> bytes:
        flags = 0x8000 | 0x0400 | (query.flags & 0x0100) | 0x0080 | (0x0200 if tc else 0) | rcode
        return struct.pack("!HHHHHH", query.qid if qid is None else qid, flags, 1 if question else 0, *counts)

    def _poisoned(self, query: _Query, qid: int, question: bytes) -> bytes:
        answer = _rr(b"\xc0\x0c", 1, TTL, socket.inet_aton(self.POISON))
        return self._header(query, 0, (1, 0, 0), qid=qid) + question + answer

    def _replies(self, query: _Query, transport: str) -> list[bytes]:
        behaviour = self._behaviour_for(query)
        if behaviour == "silent":
            return []
        if behaviour in ("servfail", "refused"):
            return [self._header(query, 2 if behaviour == "servfail" else 5, (0, 0, 0)) + query.question]
        if behaviour == "formerr-edns" and query.edns_size:
            return [self._header(query, 1, (0, 0, 0), question=False)]
        if behaviour == "truncate" and transport == "udp":
            return [self._header(query, 0, (0, 0, 0), tc=True) + query.question]
        if behaviour == "referral":
            zone = query.name.partition(".")[2] or query.name
            ns = _rr(_labels(zone), 2, TTL, _labels("ns." + zone))
            return [self._header(query, 0, (0, 1, 0)) + query.question + ns]
        if behaviour in ("pointer-loop", "pointer-self"):
            start = 12 + len(query.question)
            pointer = struct.pack("!H", 0xC000 | start)
            owner = pointer if behaviour == "pointer-self" else b"\x03www" + pointer
            return [self._header(query, 0, (1, 0, 0)) + query.question + _rr(owner, 1, TTL, b"\x7f\0\0\1")]
        reply = self._answer(query)
        limit = max(512, query.edns_size)  # RFC 1035 §4.2.1, RFC 6891 §6.2.3
        if transport == "udp" and len(reply) > limit:
            return [self._header(query, 0, (0, 0, 0), tc=True) + query.question]
        return [reply]

    def _answer(self, query: _Query) -> bytes:
        found = self._records.get((query.name, query.qtype)) or self._records.get((query.name, 5), [])
        answers = b"".join(_rr(b"\xc0\x0c", rtype, ttl, _rdata(rtype, value)) for rtype, value, ttl in found)
        if found:
            return self._header(query, 0, (len(found), 0, 0)) + query.question + answers
        exists = any(name == query.name for name, _ in self._records)
        authority = b""
        for zone, minimum in self._soa.items():
            if query.name == zone or query.name.endswith("." + zone):
                authority = _rr(_labels(zone), 6, TTL, _rdata(6, minimum))
        counts = (0, 1 if authority else 0, 0)
        return self._header(query, 0 if exists else 3, counts) + query.question + authority


def _bind_pair() -> tuple[socket.socket, socket.socket, int]:
    """A UDP and a listening TCP socket on the same free loopback port."""
    for _ in range(50):
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind(("127.0.0.1", 0))
        port = tcp.getsockname()[1]
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.bind(("127.0.0.1", port))
        except OSError:
            tcp.close()
            udp.close()
            continue
        tcp.listen(16)
        return udp, tcp, port
    raise RuntimeError("no free loopback port for UDP and TCP")


# region dnsmasq
@dataclass
class DnsmasqServer:
    """A running dnsmasq serving the test zone; ``address`` is its (ip, port)."""

    process: subprocess.Popen[bytes]
    address: tuple[str, int]
    log_path: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _answers(address: tuple[str, int], name: str, deadline: float) -> bool:
    """Whether a server at ``address`` answers an A query for ``name`` before ``deadline``."""
    probe = struct.pack("!HHHHHH", 0x2DB1, 0x0100, 1, 0, 0, 0) + _labels(name) + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        while time.monotonic() < deadline:
            sock.settimeout(0.2)
            sock.sendto(probe, address)
            try:
                reply = sock.recv(4096)
            except (TimeoutError, ConnectionRefusedError):
                continue
            if reply[:2] == probe[:2]:
                return True
    return False


def start_dnsmasq(workdir: str | None = None, extra_args: tuple[str, ...] = (), timeout: float = 10.0) -> DnsmasqServer:
    """Start dnsmasq on a free loopback port serving the test zone; wait until it answers.

    Raises RuntimeError when dnsmasq is missing or does not come up.
    """
    program = which("dnsmasq")
    if program is None:
        raise RuntimeError("dnsmasq not installed (Debian package dnsmasq)")
    folder = workdir or tempfile.mkdtemp(prefix="smtpgw-dnsmasq-")
    log_path = os.path.join(folder, "dnsmasq.log")
    for _ in range(5):
        udp, tcp, port = _bind_pair()
        udp.close()
        tcp.close()
        command = [program, *dnsmasq_args(port), f"--log-facility={log_path}", *extra_args]
        with open(os.path.join(folder, "dnsmasq.stderr"), "ab") as stderr:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
        server = DnsmasqServer(process, ("127.0.0.1", port), log_path)
        deadline = time.monotonic() + timeout
        if _answers(server.address, next(iter(HOSTS)), deadline) and process.poll() is None:
            return server
        server.stop()  # most likely the port was taken between the probe and dnsmasq's bind
    with open(os.path.join(folder, "dnsmasq.stderr"), "rb") as stderr:
        raise RuntimeError(f"dnsmasq did not start: {stderr.read()[-2000:]!r}")
# endregion


# region Fixtures and test utilities
def ask(loop: Any, resolver: Any, name: str, rdtype: Any, timeout: float = 10.0) -> Any:
    """Run ``loop`` until ``resolver.query(name, rdtype)`` answers; return the Answer."""
    answers: list[Any] = []
    resolver.query(name, rdtype, answers.append)
    assert loop.run_until(lambda: bool(answers), timeout), f"no answer for {name} {rdtype} in {timeout}s"
    return answers[0]


@pytest.fixture
def dns_loop() -> Iterator[Any]:
    """A fresh smtpgw event loop, closed after the test."""
    from smtpgw.net.loop import EventLoop

    loop = EventLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsmasqServer]:
    """dnsmasq on 127.0.0.1 serving the test zone (see the constants of this module)."""
    require("dnsmasq", "dnsmasq")
    server = start_dnsmasq(str(tmp_path_factory.mktemp("dnsmasq")))
    yield server
    server.stop()


@pytest.fixture
def scripted_dns() -> Iterator[ScriptedDNSServer]:
    """A fresh ScriptedDNSServer on 127.0.0.1 for one test."""
    with ScriptedDNSServer() as server:
        yield server


@pytest.fixture
def silent_nameserver() -> Iterator[tuple[str, int]]:
    """The address of a bound UDP socket on 127.0.0.1 that never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()
# endregion
