"""The stub resolver: DNS queries on the event loop, with positive and negative caches.

Owns: asking the configured recursive nameservers over UDP with TCP fallback on truncation (the
messages themselves are built and parsed by ``smtpgw.dnswire``), checking each reply against the
query it answers (ID, question, source), following CNAME chains, caching answers for their TTL and
"name not in DNS" answers for ``UnresolvedTTL``, purging expired entries on the ``[smtpgw.resolve]``
refresh periods, and bounding the queries in flight and the cache size.

Must never: block the loop (no ``getaddrinfo`` on names, no blocking socket call, no sleep), resolve
iteratively from the root itself, accept a reply that does not match the query it sent, or let a
malformed reply raise out of the parser or loop forever. A failure (timeout, SERVFAIL, ...) is
reported as ``Answer.error`` and never confused with "no such name" or "no such data".
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import secrets
import socket
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, TypeVar

from smtpgw.net.dnswire import (
    AAAA, CLASS_IN, CNAME, FLAG_QR, FORMERR, MX, NOERROR, NOTIMP, NS, NXDOMAIN, PTR, REFUSED, SERVFAIL, SOA, TXT,
    TYPE_NAMES, A, DNSFormatError, Message, Record, build_query, encode_name, normalise_name, parse_header,
    parse_message, rdtype_code, read_name, reverse_labels, reverse_name,
)
from smtpgw.net.loop import EventLoop, Timer

# The wire-format names are also this module's (smtpgw.dnswire defines them), so that one
# import serves a caller of the resolver.
__all__ = [
    "A", "AAAA", "CNAME", "MX", "PTR", "SOA", "TXT",
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED",
    "ERROR_TIMEOUT", "ERROR_SERVFAIL", "ERROR_BAD_NAME", "ERROR_MALFORMED", "ERROR_OVERLOADED",
    "ERROR_CLOSED", "ERROR_UNREACHABLE", "ERROR_CNAME_CHAIN", "ERROR_REFERRAL",
    "Answer", "DNSFormatError", "Lookup", "Message", "Record", "Resolver",
    "build_query", "encode_name", "normalise_name", "parse_header", "parse_message", "parse_nameserver",
    "parse_resolv_conf",
    "read_name", "reverse_labels", "reverse_name", "rdtype_code",
]

log = logging.getLogger("smtpgw.net.dns")
_T = TypeVar("_T")

# region Limits and failures
MAX_CNAME_CHAIN = 8  # CNAME hops followed for one query, in the answer and by re-querying
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
ERROR_REFERRAL = "referral"
_RCODE_ERRORS = {FORMERR: "formerr", SERVFAIL: ERROR_SERVFAIL, NOTIMP: "notimp", REFUSED: "refused"}
# endregion


# region Configuration
def _sockaddr(ip: str, port: int) -> tuple[int, tuple[Any, ...]]:
    """(family, sockaddr) for a numeric address; never a name lookup (AI_NUMERICHOST)."""
    # ip as bytes: a str host is passed through the "idna" codec first (encodings.idna, stringprep,
    # unicodedata: 0.5 MiB a process), which a numeric address never needs
    infos = socket.getaddrinfo(ip.encode("ascii"), port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST)
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
            "cache_size": setting("DNSCacheSize", 10000),
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

    def asking(self, name: str, rdtype: int | str) -> bool:
        """Whether a question for ``name`` is out to a nameserver now (False while it waits for a
        slot behind ``max_in_flight`` others, or when none is asked)."""
        try:
            key = (normalise_name(name), rdtype_code(rdtype))
        except ValueError:
            return False
        return any((exchange.qname, exchange.qtype) == key for exchange in self._active)

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
        if qid != exchange.qid or not flags & FLAG_QR:
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
        authority = {record.rdtype for record in message.authority}
        if NS in authority and SOA not in authority:
            # RFC 2308 §2.2.1: NS records and no SOA in the authority section make a referral, not
            # NODATA: this server did not recurse and has no answer; the next one may.
            self._try_failed(exchange, ERROR_REFERRAL)
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
        try:
            encode_name(target)
        except ValueError:
            # A label may hold any octet (RFC 2181 §11); read_name shows the ones a query name
            # cannot carry as \DDD (RFC 1035 §5.1), so such an alias cannot be followed.
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
