"""The stub resolver: DNS queries on the event loop, with positive and negative caches.

Owns: the DNS wire format (RFC 1035 §4) for the record types the gateway needs (A, AAAA, MX, TXT,
PTR, and CNAME chains), asking the configured recursive nameservers over UDP with TCP fallback on
truncation, checking each reply against the query it answers (ID, question, source), caching answers
for their TTL and "name not in DNS" answers for ``UnresolvedTTL``, purging expired entries on the
``[smtpgw.resolve]`` refresh periods, and bounding the queries in flight and the cache size.

Must never: block the loop (no ``getaddrinfo`` on names, no blocking socket call, no sleep), resolve
iteratively from the root itself, accept a reply that does not match the query it sent, or let a
malformed reply raise out of the parser or loop forever. A failure (timeout, SERVFAIL, ...) is
reported as ``Answer.error`` and never confused with "no such name" or "no such data".
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import secrets
import socket
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, TypeVar

from smtpgw.loop import EventLoop, Timer

__all__ = [
    "A", "AAAA", "CNAME", "MX", "PTR", "SOA", "TXT",
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED",
    "ERROR_TIMEOUT", "ERROR_SERVFAIL", "ERROR_BAD_NAME", "ERROR_MALFORMED", "ERROR_OVERLOADED",
    "ERROR_CLOSED", "ERROR_UNREACHABLE", "ERROR_CNAME_CHAIN",
    "Answer", "DNSFormatError", "Lookup", "Message", "Record", "Resolver",
    "build_query", "encode_name", "normalise_name", "parse_header", "parse_message", "parse_nameserver",
    "parse_resolv_conf",
    "read_name", "reverse_labels", "reverse_name", "rdtype_code",
]

log = logging.getLogger("smtpgw.dns")
_T = TypeVar("_T")

# region Protocol constants (RFC 1035 §3.2.2, RFC 3596 §2.1, RFC 6891 §6.1.1)
A, NS, CNAME, SOA, PTR, MX, TXT, AAAA, OPT = 1, 2, 5, 6, 12, 15, 16, 28, 41
CLASS_IN = 1
TYPE_CODES = {"A": A, "NS": NS, "CNAME": CNAME, "SOA": SOA, "PTR": PTR, "MX": MX, "TXT": TXT, "AAAA": AAAA}
TYPE_NAMES = {code: name for name, code in TYPE_CODES.items()}

# RFC 1035 §4.1.1 RCODE values.
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5

_FLAG_QR = 0x8000
_FLAG_TC = 0x0200
_FLAG_RD = 0x0100
_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")

MAX_NAME_WIRE = 255  # RFC 1035 §2.3.4: a name is at most 255 octets on the wire
MAX_LABEL = 63  # RFC 1035 §2.3.4
# Printable ASCII but "." and "\\": what a label may hold in our query names and in plain output.
_LABEL_CHARS = r"[!-\-/-\[\]-~]"
_NAME = re.compile(rf"(?:{_LABEL_CHARS}{{1,{MAX_LABEL}}}\.)*{_LABEL_CHARS}{{1,{MAX_LABEL}}}")
_PLAIN_LABEL = re.compile(_LABEL_CHARS.encode("ascii") + b"*")
# A name has at most 127 labels, so a well-formed name never needs more pointers than that.
MAX_POINTERS = 127
MAX_CNAME_CHAIN = 8  # CNAME hops followed for one query, in the answer and by re-querying
EDNS_PAYLOAD = 1232  # RFC 6891 §6.2.5 UDP size; 1232 avoids IP fragmentation (DNS flag day 2020)
MAX_DATAGRAMS_PER_WAKEUP = 16  # datagrams read per readiness callback before yielding to the loop
MAX_RESOLV_CONF = 65536  # bytes of /etc/resolv.conf read
MAXNS = 3  # resolv.conf(5): only the first three nameserver lines are used

# Answer.error values: a failure to get an answer, as opposed to NXDOMAIN or NODATA.
ERROR_TIMEOUT = "timeout"
ERROR_SERVFAIL = "servfail"
ERROR_BAD_NAME = "bad-name"
ERROR_MALFORMED = "malformed"
ERROR_OVERLOADED = "overloaded"
ERROR_CLOSED = "closed"
ERROR_UNREACHABLE = "unreachable"
ERROR_CNAME_CHAIN = "cname-chain"
_RCODE_ERRORS = {FORMERR: "formerr", SERVFAIL: ERROR_SERVFAIL, NOTIMP: "notimp", REFUSED: "refused"}
# endregion


class DNSFormatError(ValueError):
    """A DNS message that does not parse; never escapes the resolver."""


# region Names
def normalise_name(name: str) -> str:
    """A query name in the form the cache keys on: ASCII (IDNA), lower case, no trailing dot.

    Raises ValueError for a name that cannot be put on the wire. The root is "".
    """
    text = name.strip()
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")  # RFC 3490 ToASCII
        except UnicodeError as exc:
            raise ValueError(f"not a valid internationalised name: {name!r}") from exc
    return _checked(text).lower()


def _checked(name: str) -> str:
    """``name`` without its trailing dot, or ValueError when it cannot be put on the wire."""
    text = name[:-1] if name.endswith(".") else name
    # RFC 1035 §2.3.4: labels of 1-63 octets, 255 octets in all (two more than the dotted text).
    if text and (not text.isascii() or len(text) > MAX_NAME_WIRE - 2 or _NAME.fullmatch(text) is None):
        raise ValueError(f"not a valid domain name: {name!r}")
    return text


def encode_name(name: str) -> bytes:
    """Uncompressed wire form of a dotted ASCII name (RFC 1035 §3.1)."""
    text = _checked(name)
    if not text:
        return b"\0"
    return b"".join(bytes((len(label),)) + label.encode("ascii") for label in text.split(".")) + b"\0"


def _label_text(raw: bytes) -> str:
    """Presentation form of one label; dots, backslashes and unprintables as \\DDD (RFC 1035 §5.1)."""
    if _PLAIN_LABEL.fullmatch(raw):
        return raw.decode("ascii")
    return "".join(chr(b) if _PLAIN_LABEL.fullmatch(bytes((b,))) else f"\\{b:03d}" for b in raw)


def read_name(msg: bytes, offset: int) -> tuple[str, int]:
    """Decode the possibly compressed name at ``offset``; return (name, offset after it).

    The root is returned as ".", other names without the trailing dot.
    """
    labels: list[str] = []
    wire_length = 1
    pos = offset
    after: int | None = None
    floor = offset  # every pointer must go strictly below the last place jumped to
    pointers = 0
    while True:  # bounded: labels by the 255-octet limit, jumps by ``pointers``
        if pos >= len(msg):
            raise DNSFormatError("name runs past the end of the message")
        length = msg[pos]
        kind = length & 0xC0
        if kind == 0xC0:
            # RFC 1035 §4.1.4: a pointer names a prior occurrence. Requiring each jump to land
            # strictly before the previous one makes every pointer chain finite (no loops).
            if pos + 1 >= len(msg):
                raise DNSFormatError("truncated compression pointer")
            target = ((length & 0x3F) << 8) | msg[pos + 1]
            pointers += 1
            if target >= floor or pointers > MAX_POINTERS:
                raise DNSFormatError("compression pointer loops or does not point backwards")
            if after is None:
                after = pos + 2
            floor = pos = target
            continue
        if kind:
            raise DNSFormatError("unsupported label type")  # RFC 6891 §5: extended labels are gone
        if length == 0:
            return (".".join(labels) or "."), (after if after is not None else pos + 1)
        raw = msg[pos + 1 : pos + 1 + length]
        if len(raw) != length:
            raise DNSFormatError("label runs past the end of the message")
        wire_length += length + 1
        if wire_length > MAX_NAME_WIRE:
            raise DNSFormatError("name longer than 255 octets")
        labels.append(_label_text(raw))
        pos += 1 + length


def reverse_labels(ip: str) -> str:
    """The address as reversed labels without a suffix: ``d.c.b.a`` or 32 nibbles (RFC 5782 §2.4).

    An IPv4-mapped IPv6 address is treated as the IPv4 address it carries. Raises ValueError.
    """
    address = ipaddress.ip_address(ip.strip().split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.reverse_pointer.rsplit(".", 2)[0]


def reverse_name(ip: str) -> str:
    """The PTR name of an address: ``d.c.b.a.in-addr.arpa`` (RFC 1035 §3.5) or ``...ip6.arpa`` (RFC 3596 §2.5)."""
    labels = reverse_labels(ip)
    return labels + (".in-addr.arpa" if labels.count(".") == 3 else ".ip6.arpa")


def rdtype_code(rdtype: int | str) -> int:
    """A record type given as a code or a mnemonic ("MX")."""
    if isinstance(rdtype, str):
        try:
            return TYPE_CODES[rdtype.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown record type {rdtype!r}") from None
    if not 0 < rdtype < 65536:
        raise ValueError(f"record type out of range: {rdtype}")
    return rdtype
# endregion


# region Messages
@dataclass(frozen=True)
class Record:
    """One resource record; ``data`` is decoded for the types the resolver understands.

    A/AAAA: address str; MX: (preference, host); TXT: the joined strings; PTR/CNAME: host;
    SOA: the negative-caching TTL min(MINIMUM, ttl) (RFC 2308 §5); other types: None.
    """

    name: str
    rdtype: int
    rdclass: int
    ttl: int
    data: Any


@dataclass
class Message:
    id: int
    flags: int
    rcode: int
    question: tuple[str, int, int] | None
    answers: list[Record] = field(default_factory=list)
    authority: list[Record] = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        return bool(self.flags & _FLAG_TC)


def build_query(qid: int, name: str, rdtype: int, edns: bool = True) -> bytes:
    """A recursive query (RD set, RFC 1035 §4.1.1), with an EDNS0 OPT record when ``edns``."""
    header = _HEADER.pack(qid, _FLAG_RD, 1, 0, 0, 1 if edns else 0)
    body = encode_name(name) + struct.pack("!HH", rdtype, CLASS_IN)
    if edns:
        # RFC 6891 §6.1.2: root owner, TYPE OPT, CLASS = UDP payload size, TTL = ext-rcode/version/flags.
        body += b"\0" + struct.pack("!HHIH", OPT, EDNS_PAYLOAD, 0, 0)
    return header + body


def _read_question(msg: bytes, pos: int) -> tuple[tuple[str, int, int], int]:
    name, pos = read_name(msg, pos)
    if pos + 4 > len(msg):
        raise DNSFormatError("truncated question")
    qtype, qclass = struct.unpack_from("!HH", msg, pos)
    return (name, qtype, qclass), pos + 4


def _character_strings(rdata: bytes) -> list[bytes]:
    """RFC 1035 §3.3: <character-string> is a length octet followed by that many octets."""
    parts: list[bytes] = []
    pos = 0
    while pos < len(rdata):
        end = pos + 1 + rdata[pos]
        if end > len(rdata):
            raise DNSFormatError("TXT string runs past its record")
        parts.append(rdata[pos + 1 : end])
        pos = end
    return parts


def _rdata_name(msg: bytes, pos: int, end: int) -> str:
    name, after = read_name(msg, pos)
    if after > end:
        raise DNSFormatError("name runs past its record")
    return name


def _decode_rdata(msg: bytes, rdtype: int, pos: int, end: int) -> Any:
    rdata = msg[pos:end]
    if rdtype == A:
        if len(rdata) != 4:
            raise DNSFormatError("A record is not 4 octets")
        return socket.inet_ntop(socket.AF_INET, rdata)
    if rdtype == AAAA:
        if len(rdata) != 16:
            raise DNSFormatError("AAAA record is not 16 octets")
        return socket.inet_ntop(socket.AF_INET6, rdata)
    if rdtype == MX:
        if len(rdata) < 3:
            raise DNSFormatError("MX record too short")
        return struct.unpack_from("!H", msg, pos)[0], _rdata_name(msg, pos + 2, end)
    if rdtype in (PTR, CNAME):
        return _rdata_name(msg, pos, end)
    if rdtype == TXT:
        # RFC 7208 §3.3: the strings of one TXT record are joined without separator.
        return b"".join(_character_strings(rdata)).decode("utf-8", "replace")
    if rdtype == SOA:
        _, after = read_name(msg, pos)
        _, after = read_name(msg, after)
        if after + 20 > end:
            raise DNSFormatError("SOA record too short")
        return struct.unpack_from("!5I", msg, after)[4]
    return None


def _read_record(msg: bytes, pos: int) -> tuple[Record, int]:
    name, pos = read_name(msg, pos)
    if pos + _RR_FIXED.size > len(msg):
        raise DNSFormatError("truncated resource record")
    rdtype, rdclass, ttl, rdlength = _RR_FIXED.unpack_from(msg, pos)
    start = pos + _RR_FIXED.size
    end = start + rdlength
    if end > len(msg):
        raise DNSFormatError("record data runs past the end of the message")
    if ttl & 0x80000000:
        ttl = 0  # RFC 2181 §8: a TTL with the top bit set is treated as zero
    data = _decode_rdata(msg, rdtype, start, end)
    if rdtype == SOA:
        data = min(data, ttl)
    return Record(name, rdtype, rdclass, ttl, data), end


def parse_header(msg: bytes) -> tuple[int, int, int]:
    """(id, flags, qdcount) of a message, or DNSFormatError when shorter than a header."""
    if len(msg) < _HEADER.size:
        raise DNSFormatError("shorter than a DNS header")
    qid, flags, qdcount, _, _, _ = _HEADER.unpack_from(msg, 0)
    return qid, flags, qdcount


def parse_message(msg: bytes, sections: bool = True) -> Message:
    """Parse header, question and (when ``sections``) the answer and authority sections.

    The additional section is not needed by a stub resolver and is not read. Every record
    consumes at least 11 octets and every name at most 255 plus 127 jumps, so a hostile
    message costs work in proportion to its length.
    """
    qid, flags, qdcount = parse_header(msg)
    _, _, _, ancount, nscount, _ = _HEADER.unpack_from(msg, 0)
    if qdcount > 1:
        raise DNSFormatError("more than one question")
    question, pos = (None, _HEADER.size)
    if qdcount:
        question, pos = _read_question(msg, pos)
    message = Message(qid, flags, flags & 0x000F, question)
    if sections:
        for count, target in ((ancount, message.answers), (nscount, message.authority)):
            for _ in range(count):
                record, pos = _read_record(msg, pos)
                target.append(record)
    return message
# endregion


# region Configuration
def _sockaddr(ip: str, port: int) -> tuple[int, tuple[Any, ...]]:
    """(family, sockaddr) for a numeric address; never a name lookup (AI_NUMERICHOST)."""
    infos = socket.getaddrinfo(ip, port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST)
    return infos[0][0], infos[0][4]


def parse_nameserver(value: Any) -> tuple[str, int]:
    """(ip, port) from a tuple, ``ip``, ``ip:port``, ``[v6]:port`` or ``v6``; ValueError otherwise."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        ip, port = str(value[0]), int(value[1])
    else:
        text = str(value).strip()
        ip, port = text, 53
        if text.startswith("["):
            ip, _, rest = text[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else 53
        elif text.count(":") == 1:
            ip, _, port_text = text.partition(":")
            port = int(port_text)
    ipaddress.ip_address(ip.split("%", 1)[0])
    if not 0 < port < 65536:
        raise ValueError(f"nameserver port out of range: {value!r}")
    return ip, port


def parse_resolv_conf(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The ``nameserver`` lines of resolv.conf(5) (first three, port 53); 127.0.0.1 when none."""
    servers: list[tuple[str, int]] = []
    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_RESOLV_CONF).decode("ascii", "replace")
    except OSError as exc:
        log.warning("cannot read %s (%s); using the local nameserver", path, exc)
        text = ""
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver" and len(servers) < MAXNS:
            try:
                servers.append(parse_nameserver(words[1]))
            except ValueError:
                log.warning("%s: ignoring nameserver %r", path, words[1])
    # resolv.conf(5): with no nameserver line, the server on the local machine is used.
    return servers or [("127.0.0.1", 53)]
# endregion


# region Answers and the cache
@dataclass(frozen=True)
class Answer:
    """The outcome of one query.

    ``error`` is None for a definitive answer: data (``records`` non-empty), NXDOMAIN
    (``rcode == NXDOMAIN``) or NODATA (NOERROR, no records). Otherwise it names the failure
    ("timeout", "servfail", "refused", "malformed", ...) and ``rcode`` is the server's RCODE
    or SERVFAIL when no server answered.
    """

    name: str
    rdtype: int
    rcode: int
    records: list[Any]
    ttl: int
    error: str | None = None

    @property
    def nxdomain(self) -> bool:
        return self.error is None and self.rcode == NXDOMAIN

    @property
    def nodata(self) -> bool:
        return self.error is None and self.rcode == NOERROR and not self.records


def _failure(name: str, rdtype: int, error: str, rcode: int = SERVFAIL) -> Answer:
    return Answer(name, rdtype, rcode, [], 0, error)


@dataclass
class _CacheEntry:
    expires: float
    answer: Answer

    @property
    def negative(self) -> bool:
        return not self.answer.records


class Lookup:
    """A caller's handle on one ``query``: ``cancel()`` guarantees the callback is not called."""

    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[Answer], Any]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def _fire(self, answer: Answer) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.callback(answer)
# endregion


# region The exchange with the nameservers
class _Exchange:
    """One question being asked: the schedule of tries over the nameservers and the current try."""

    def __init__(self, qname: str, qtype: int, depth: int, done: Callable[[Answer], None],
                 schedule: list[int]) -> None:
        self.qname = qname
        self.qtype = qtype
        self.depth = depth
        self.done = done
        self.schedule = schedule
        self.index = 0
        self.token = 0  # bumped at every try; callbacks of an earlier try see a stale token
        self.sock: socket.socket | None = None
        self.timer: Timer | None = None
        self.qid = 0
        self.edns = True
        self.outgoing = b""
        self.incoming = bytearray()
        self.error = ERROR_TIMEOUT
        self.rcode = SERVFAIL

    @property
    def server(self) -> int:
        return self.schedule[self.index]


class Resolver:
    """A caching stub resolver (RFC 1123 §6.1.3.1) on the gateway's event loop.

    ``query(name, rdtype, callback)`` calls ``callback(Answer)`` exactly once, always from the
    loop and never from inside ``query``. Concurrent queries for the same name and type share
    one exchange with the nameservers.
    """

    def __init__(
        self,
        loop: EventLoop,
        nameservers: Iterable[Any] | None = None,
        timeout: float = 5.0,
        attempts: int = 2,
        negative_ttl: int = 600,
        *,
        max_in_flight: int = 256,
        max_pending: int = 4096,
        cache_size: int = 10000,
        max_ttl: int = 86400,
        mx_refresh: float = 43200,
        unresolved_refresh: float = 43200,
        ip_refresh: float = 43200,
        resolv_conf: str = "/etc/resolv.conf",
        edns: bool = True,
    ) -> None:
        self.loop = loop
        servers = [parse_nameserver(item) for item in nameservers or ()]
        self.nameservers: list[tuple[str, int]] = servers or parse_resolv_conf(resolv_conf)
        self._sockaddrs = [_sockaddr(ip, port) for ip, port in self.nameservers]
        self.timeout = max(0.001, float(timeout))
        self.attempts = max(1, int(attempts))
        self.negative_ttl = max(0, int(negative_ttl))
        self.max_in_flight = max(1, max_in_flight)
        self.max_pending = max(0, max_pending)
        self.cache_size = max(0, cache_size)
        self.max_ttl = max(0, max_ttl)
        self._edns_servers = set(range(len(self.nameservers))) if edns else set()
        self._cache: OrderedDict[tuple[str, int], _CacheEntry] = OrderedDict()
        self._waiting: dict[tuple[str, int], list[Lookup]] = {}
        self._active: set[_Exchange] = set()
        self._queue: deque[_Exchange] = deque()
        self._closed = False
        self._overloaded = False
        self.stats: dict[str, int] = dict.fromkeys(
            ("queries", "cache_hits", "udp_sent", "tcp_sent", "timeouts", "mismatched", "truncated"), 0)
        self._purge_timers: dict[str, Timer] = {}
        for kind, period in (("mx", mx_refresh), ("unresolved", unresolved_refresh), ("ip", ip_refresh)):
            self._schedule_purge(kind, float(period))

    @classmethod
    def from_config(cls, loop: EventLoop, resolve: Any, **overrides: Any) -> "Resolver":
        """Build from the ``[smtpgw.resolve]`` section (an empty Nameserver list means resolv.conf).

        ``IONetworkTimeout`` is the wait for one reply from one nameserver; ``DNSAttempts`` is
        how many rounds over the nameservers are made before a query fails.
        """
        def setting(key: str, default: Any) -> Any:
            value = getattr(resolve, key, None)
            return default if value is None else value

        settings: dict[str, Any] = {
            "nameservers": list(setting("Nameserver", [])),
            "timeout": setting("IONetworkTimeout", 5),
            "attempts": setting("DNSAttempts", 2),
            "negative_ttl": setting("UnresolvedTTL", 600),
            "mx_refresh": setting("MXCacheRefreshPeriod", 43200),
            "unresolved_refresh": setting("UnresolvedCacheRefreshPeriod", 43200),
            "ip_refresh": setting("IPCacheRefreshPeriod", 43200),
        }
        settings.update(overrides)
        return cls(loop, **settings)

    # -- public API ---------------------------------------------------------
    def query(self, name: str, rdtype: int | str, callback: Callable[[Answer], Any]) -> Lookup:
        """Ask for ``rdtype`` records of ``name``; ``callback(Answer)`` runs later on the loop."""
        handle = Lookup(callback)
        self.stats["queries"] += 1
        try:
            qtype = rdtype_code(rdtype)
        except ValueError:
            self._deliver(handle, _failure(str(name), 0, ERROR_BAD_NAME))
            return handle
        try:
            qname = normalise_name(name)
        except ValueError:
            self._deliver(handle, _failure(str(name), qtype, ERROR_BAD_NAME))
            return handle
        if self._closed:
            self._deliver(handle, _failure(qname, qtype, ERROR_CLOSED))
            return handle
        key = (qname, qtype)
        cached = self._cached(key)
        if cached is not None:
            self.stats["cache_hits"] += 1
            self._deliver(handle, cached)
            return handle
        waiters = self._waiting.get(key)
        if waiters is not None:
            waiters.append(handle)
            return handle
        self._waiting[key] = [handle]
        self._resolve(qname, qtype, 0, lambda answer: self._answered(key, answer))
        return handle

    def reverse(self, ip: str, callback: Callable[[Answer], Any]) -> Lookup:
        """PTR query for an address; an unparsable address answers ``bad-name``."""
        try:
            name = reverse_name(ip)
        except ValueError:
            handle = Lookup(callback)
            self._deliver(handle, _failure(str(ip), PTR, ERROR_BAD_NAME))
            return handle
        return self.query(name, PTR, callback)

    def close(self) -> None:
        """Stop every exchange and timer; pending callers get ``closed``. The cache is dropped."""
        if self._closed:
            return
        self._closed = True
        for timer in self._purge_timers.values():
            timer.cancel()
        for exchange in list(self._active) + list(self._queue):
            self._end_try(exchange)
            exchange.done(_failure(exchange.qname, exchange.qtype, ERROR_CLOSED))
        self._active.clear()
        self._queue.clear()
        self._cache.clear()

    def cache_len(self) -> int:
        return len(self._cache)

    # -- cache --------------------------------------------------------------
    def _cached(self, key: tuple[str, int]) -> Answer | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        left = entry.expires - self.loop.time()
        if left <= 0:
            return None  # expired entries are ignored at once and purged on the refresh period
        self._cache.move_to_end(key)
        return replace(entry.answer, records=list(entry.answer.records), ttl=int(left))

    def _store(self, answer: Answer) -> None:
        if answer.error is not None or answer.ttl <= 0 or not self.cache_size:
            return  # RFC 1035 §3.2.1: TTL zero means use once, do not cache
        key = (answer.name, answer.rdtype)
        self._cache[key] = _CacheEntry(self.loop.time() + answer.ttl, answer)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _schedule_purge(self, kind: str, period: float) -> None:
        if not self._closed:
            self._purge_timers[kind] = self.loop.call_later(max(1.0, period), self._purge, kind, period)

    def _purge(self, kind: str, period: float) -> None:
        """Drop expired entries of one cache ([smtpgw.resolve] *CacheRefreshPeriod)."""
        now = self.loop.time()
        for key, entry in list(self._cache.items()):
            if entry.expires > now:
                continue
            if entry.negative:
                belongs = kind == "unresolved"
            else:
                belongs = kind == ("mx" if key[1] == MX else "ip")
            if belongs:
                del self._cache[key]
        self._schedule_purge(kind, period)

    # -- lookups ------------------------------------------------------------
    def _answered(self, key: tuple[str, int], answer: Answer) -> None:
        for handle in self._waiting.pop(key, []):
            self._deliver(handle, replace(answer, records=list(answer.records)))

    def _deliver(self, handle: Lookup, answer: Answer) -> None:
        self.loop.call_soon(handle._fire, answer)

    def _resolve(self, qname: str, qtype: int, depth: int, done: Callable[[Answer], None]) -> None:
        schedule = [index for _ in range(self.attempts) for index in range(len(self.nameservers))]
        exchange = _Exchange(qname, qtype, depth, done, schedule)
        if len(self._active) < self.max_in_flight:
            self._active.add(exchange)
            self._send_udp(exchange)
        elif len(self._queue) < self.max_pending:
            self._queue.append(exchange)
        else:
            if not self._overloaded:  # once per episode, not once per refused query
                log.warning("DNS overloaded: %d queries in flight, %d waiting", len(self._active), len(self._queue))
            self._overloaded = True
            self.loop.call_soon(done, _failure(qname, qtype, ERROR_OVERLOADED))

    def _release(self, exchange: _Exchange) -> None:
        self._end_try(exchange)
        self._active.discard(exchange)
        while self._queue and len(self._active) < self.max_in_flight and not self._closed:
            waiting = self._queue.popleft()
            self._active.add(waiting)
            self._send_udp(waiting)
        if not self._queue:
            self._overloaded = False

    def _complete(self, exchange: _Exchange, answer: Answer) -> None:
        self._release(exchange)
        self._store(answer)
        exchange.done(answer)

    # -- one try --------------------------------------------------------------
    def _new_socket(self, exchange: _Exchange, kind: int) -> tuple[socket.socket, Any]:
        family, sockaddr = self._sockaddrs[exchange.server]
        sock = exchange.sock = socket.socket(family, kind)
        sock.setblocking(False)
        if kind == socket.SOCK_DGRAM:
            _bind_random_port(sock, family)
        exchange.token += 1
        exchange.qid = secrets.randbelow(65536)  # RFC 5452 §9.2: unpredictable ID and port
        return sock, sockaddr

    def _send_udp(self, exchange: _Exchange) -> None:
        exchange.edns = exchange.server in self._edns_servers
        try:
            sock, sockaddr = self._new_socket(exchange, socket.SOCK_DGRAM)
            # A connected UDP socket only receives datagrams from the server's address and port.
            sock.connect(sockaddr)
            sock.send(build_query(exchange.qid, exchange.qname, exchange.qtype, exchange.edns))
        except OSError as exc:
            log.debug("DNS send to %s failed: %s", self.nameservers[exchange.server], exc)
            self._try_failed(exchange, ERROR_UNREACHABLE, defer=True)
            return
        self._watch(exchange, self.loop.add_reader, self._on_udp, "udp_sent")

    def _watch(self, exchange: _Exchange, register: Callable[..., None],
               handler: Callable[[_Exchange, int], None], counter: str) -> None:
        """Wait for this try's socket (``register`` = add_reader/add_writer), at most ``timeout``."""
        self.stats[counter] += 1
        token = exchange.token
        register(exchange.sock, lambda: handler(exchange, token))
        exchange.timer = self.loop.call_later(self.timeout, self._on_timeout, exchange, token)

    def _on_udp(self, exchange: _Exchange, token: int) -> None:
        sock = exchange.sock
        for _ in range(MAX_DATAGRAMS_PER_WAKEUP):
            if exchange.token != token or sock is None:
                return
            try:
                data, peer = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ICMP port unreachable on a connected socket, and the like
                log.debug("DNS %s: %s", self.nameservers[exchange.server], exc)
                self._try_failed(exchange, ERROR_UNREACHABLE)
                return
            if not self._from_server(exchange, peer):
                self.stats["mismatched"] += 1
                continue
            self._on_reply(exchange, data, tcp=False)

    def _from_server(self, exchange: _Exchange, peer: Any) -> bool:
        # RFC 5452 §9.1: the reply must come from the address and port the query went to. Both
        # tuples come from the kernel / AI_NUMERICHOST in canonical form, so they compare as is.
        return tuple(peer[:2]) == tuple(self._sockaddrs[exchange.server][1][:2])

    def _on_reply(self, exchange: _Exchange, data: bytes, tcp: bool) -> None:
        """Check a reply against the query it claims to answer, then act on it."""
        try:
            qid, flags, _ = parse_header(data)
        except DNSFormatError as exc:
            self._mismatch(exchange, tcp, str(exc))
            return
        if qid != exchange.qid or not flags & _FLAG_QR:
            self._mismatch(exchange, tcp, "ID or QR mismatch")
            return
        try:
            head, complete = parse_message(data), True
        except DNSFormatError:
            try:  # a reply cut short (TC) or malformed past its question
                head, complete = parse_message(data, sections=False), False
            except DNSFormatError as exc:
                self._mismatch(exchange, tcp, str(exc))
                return
        question = head.question
        if question is None:
            # RFC 6891 §7: a server without EDNS may answer FORMERR with no question section.
            if head.rcode != FORMERR:
                self._mismatch(exchange, tcp, "reply without question")
            elif exchange.edns:
                self._retry_without_edns(exchange)
            else:
                self._try_failed(exchange, _RCODE_ERRORS[FORMERR], FORMERR)
            return
        if question[0].lower() != exchange.qname or question[1:] != (exchange.qtype, CLASS_IN):
            self._mismatch(exchange, tcp, f"reply for another question {question}")
            return
        if head.truncated and not tcp:
            # RFC 1035 §4.2.1 / RFC 7766 §5: a truncated UDP answer is asked again over TCP.
            self.stats["truncated"] += 1
            self._send_tcp(exchange)
            return
        if head.rcode == FORMERR and exchange.edns:
            self._retry_without_edns(exchange)
            return
        if head.rcode not in (NOERROR, NXDOMAIN):
            self._try_failed(exchange, _RCODE_ERRORS.get(head.rcode, f"rcode-{head.rcode}"), head.rcode)
            return
        if not complete:
            log.warning("malformed DNS reply from %s for %s/%s", self.nameservers[exchange.server],
                        exchange.qname, TYPE_NAMES.get(exchange.qtype, exchange.qtype))
            self._try_failed(exchange, ERROR_MALFORMED)
            return
        self._interpret(exchange, head)

    def _mismatch(self, exchange: _Exchange, tcp: bool, why: str) -> None:
        # RFC 5452 §9.1: a reply that does not match the outstanding query is dropped; over UDP
        # the genuine reply may still come, so the try goes on until its timeout.
        self.stats["mismatched"] += 1
        log.debug("DNS reply dropped (%s) for %s", why, exchange.qname)
        if tcp:
            self._try_failed(exchange, ERROR_MALFORMED)

    def _retry_without_edns(self, exchange: _Exchange) -> None:
        self._edns_servers.discard(exchange.server)
        self._end_try(exchange)
        self._send_udp(exchange)

    def _on_timeout(self, exchange: _Exchange, token: int) -> None:
        if exchange.token == token:
            self.stats["timeouts"] += 1
            self._try_failed(exchange, ERROR_TIMEOUT)

    def _try_failed(self, exchange: _Exchange, error: str, rcode: int = SERVFAIL, defer: bool = False) -> None:
        """Record why this try failed and move to the next nameserver, or give up."""
        self._end_try(exchange)
        exchange.error, exchange.rcode = error, rcode
        exchange.index += 1
        if exchange.index < len(exchange.schedule):
            if defer:
                exchange.token += 1
                self.loop.call_soon(self._next_try, exchange, exchange.token)
            else:
                self._send_udp(exchange)
            return
        log.info("DNS %s/%s failed: %s", exchange.qname, TYPE_NAMES.get(exchange.qtype, exchange.qtype), error)
        self._complete(exchange, _failure(exchange.qname, exchange.qtype, error, rcode))

    def _next_try(self, exchange: _Exchange, token: int) -> None:
        if exchange.token == token and exchange in self._active:
            self._send_udp(exchange)

    def _end_try(self, exchange: _Exchange) -> None:
        exchange.token += 1
        if exchange.timer is not None:
            exchange.timer.cancel()
            exchange.timer = None
        if exchange.sock is not None:
            self.loop.forget(exchange.sock)
            exchange.sock.close()
            exchange.sock = None

    # -- TCP (RFC 1035 §4.2.2, RFC 7766) ----------------------------------------
    def _send_tcp(self, exchange: _Exchange) -> None:
        self._end_try(exchange)
        try:
            sock, sockaddr = self._new_socket(exchange, socket.SOCK_STREAM)
            code = sock.connect_ex(sockaddr)
        except OSError as exc:
            log.debug("DNS TCP to %s failed: %s", self.nameservers[exchange.server], exc)
            self._try_failed(exchange, ERROR_UNREACHABLE, defer=True)
            return
        if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self._try_failed(exchange, ERROR_UNREACHABLE, defer=True)
            return
        query = build_query(exchange.qid, exchange.qname, exchange.qtype, exchange.edns)
        exchange.outgoing = struct.pack("!H", len(query)) + query  # two-octet length prefix
        exchange.incoming = bytearray()
        self._watch(exchange, self.loop.add_writer, self._on_tcp_writable, "tcp_sent")

    def _tcp_io(self, exchange: _Exchange, operation: Callable[[socket.socket], _T]) -> _T | None:
        """One non-blocking call on the TCP socket; None if it would block or failed (ending the try)."""
        assert exchange.sock is not None
        try:
            return operation(exchange.sock)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            log.debug("DNS TCP with %s: %s", self.nameservers[exchange.server], exc)
            self._try_failed(exchange, ERROR_UNREACHABLE)
            return None

    def _on_tcp_writable(self, exchange: _Exchange, token: int) -> None:
        if exchange.token != token or exchange.sock is None:
            return

        def send(sock: socket.socket) -> int:
            failure = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # the connect's outcome
            if failure:
                raise OSError(failure, errno.errorcode.get(failure, "connect failed"))
            return sock.send(exchange.outgoing)

        sent = self._tcp_io(exchange, send)
        if sent is None:
            return
        exchange.outgoing = exchange.outgoing[sent:]
        if not exchange.outgoing:
            self.loop.remove_writer(exchange.sock)
            self.loop.add_reader(exchange.sock, lambda: self._on_tcp_readable(exchange, token))

    def _on_tcp_readable(self, exchange: _Exchange, token: int) -> None:
        if exchange.token != token or exchange.sock is None:
            return
        buffer = exchange.incoming
        wanted = 2 + (int.from_bytes(buffer[:2], "big") if len(buffer) >= 2 else 0)
        chunk = self._tcp_io(exchange, lambda sock: sock.recv(max(2, wanted - len(buffer))))
        if chunk is None:
            return
        if not chunk:
            self._try_failed(exchange, ERROR_MALFORMED)  # closed before a whole reply
            return
        buffer += chunk  # bounded: never more than the 2-octet length plus 65535 octets
        if len(buffer) >= 2:
            wanted = 2 + int.from_bytes(buffer[:2], "big")
            if len(buffer) >= wanted:
                self._on_reply(exchange, bytes(buffer[2:wanted]), tcp=True)

    # -- making sense of a reply ----------------------------------------------
    def _negative_ttl(self, message: Message) -> int:
        # RFC 2308 §5: a negative answer lives min(SOA TTL, SOA MINIMUM); UnresolvedTTL caps it
        # and applies alone when the server sent no SOA.
        soa = [int(record.data) for record in message.authority if record.rdtype == SOA]
        return min([self.negative_ttl, *soa])

    def _interpret(self, exchange: _Exchange, message: Message) -> None:
        qname, qtype = exchange.qname, exchange.qtype
        if message.rcode == NXDOMAIN:
            # RFC 6604 §3: NXDOMAIN speaks of the last name of a CNAME chain, so of the query too.
            self._complete(exchange, Answer(qname, qtype, NXDOMAIN, [], self._negative_ttl(message)))
            return
        current, ttl, seen = qname, self.max_ttl, {qname}
        while True:  # bounded: ``seen`` grows at every turn and is capped
            owned = [r for r in message.answers if r.rdclass == CLASS_IN and r.name.lower() == current]
            found = [r for r in owned if r.rdtype == qtype and r.data is not None]
            if found:
                records = list(dict.fromkeys(r.data for r in found))
                ttl = min(ttl, *(r.ttl for r in found))
                self._complete(exchange, Answer(qname, qtype, NOERROR, records, ttl))
                return
            alias = next((r for r in owned if r.rdtype == CNAME), None)
            if alias is None:
                break
            ttl = min(ttl, alias.ttl)
            current = alias.data.lower()
            if current in seen or len(seen) > MAX_CNAME_CHAIN:
                self._complete(exchange, _failure(qname, qtype, ERROR_CNAME_CHAIN))  # loop or too long
                return
            seen.add(current)
        if current != qname:
            self._follow(exchange, current, ttl)  # the server stopped at an alias: ask for its target
            return
        self._complete(exchange, Answer(qname, qtype, NOERROR, [], self._negative_ttl(message)))

    def _follow(self, exchange: _Exchange, target: str, chain_ttl: int) -> None:
        """Ask for the target of a CNAME the nameserver did not resolve (RFC 1034 §3.6.2)."""
        self._release(exchange)
        qname, qtype = exchange.qname, exchange.qtype

        def finish(sub: Answer) -> None:
            ttl = min(chain_ttl, sub.ttl) if sub.error is None else 0
            answer = replace(sub, name=qname, ttl=ttl)
            self._store(answer)
            exchange.done(answer)

        if exchange.depth >= MAX_CNAME_CHAIN:
            exchange.done(_failure(qname, qtype, ERROR_CNAME_CHAIN))
            return
        cached = self._cached((target, qtype))
        if cached is not None:
            self.loop.call_soon(finish, cached)
            return
        self._resolve(target, qtype, exchange.depth + 1, finish)
# endregion


def _bind_random_port(sock: socket.socket, family: int) -> None:
    """Bind to a random unprivileged source port (RFC 5452 §4.5), the kernel's choice as fallback."""
    host = "::" if family == socket.AF_INET6 else "0.0.0.0"
    for _ in range(8):
        try:
            sock.bind((host, 1024 + secrets.randbelow(65536 - 1024)))
            return
        except OSError:
            continue
    sock.bind((host, 0))
