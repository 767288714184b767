"""Next hops for a recipient domain: MX records, their addresses, the implicit MX (RFC 5321 §5.1).

Owns: ordering the MX records of a domain (by preference, equal preferences shuffled), resolving
every exchange to its addresses, falling back to the domain's own addresses when it has no MX,
recognising the null MX of RFC 7505, address literals ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]``
(RFC 5321 §4.1.3), and classifying failures as permanent or temporary.

Must never: turn a DNS failure (timeout, SERVFAIL) into a permanent failure, return a null MX's
"." as a host, or block the loop. Errors start with an RFC 3463 enhanced status code.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

from smtpgw.net.dns import ERROR_BAD_NAME, Answer, Lookup, Resolver
from smtpgw.net.dnswire import AAAA, MX, A

__all__ = ["NextHops", "NextHopLookup", "address_literal", "resolve_host", "resolve_next_hops", "MAX_MX_HOSTS"]

MAX_MX_HOSTS = 10  # exchanges tried per domain; more only adds DNS traffic to a doomed delivery


@dataclass(frozen=True)
class NextHops:
    """Where to deliver: (host name, IP) in the order to try, or why there is nowhere.

    ``permanent_error`` / ``temporary_error`` read "<enhanced code> <text>", for example
    "5.1.10 null MX: example.com accepts no mail (RFC 7505)".
    """

    hosts: list[tuple[str, str]] = field(default_factory=list)
    permanent_error: str | None = None
    temporary_error: str | None = None


def address_literal(domain: str) -> str | None:
    """The IP of an address literal (RFC 5321 §4.1.3), None when ``domain`` is not bracketed.

    Raises ValueError for a bracketed value that is not an IPv4 or ``IPv6:`` address.
    """
    text = domain.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        return str(ipaddress.IPv6Address(inner[5:]))
    return str(ipaddress.IPv4Address(inner))


class NextHopLookup:
    """The resolution of one domain; ``cancel()`` guarantees the callback is not called."""

    def __init__(self, resolver: Resolver, domain: str, callback: Callable[[NextHops], object],
                 address_types: Sequence[int], max_hosts: int) -> None:
        self.resolver = resolver
        self.domain = domain.strip().rstrip(".").lower()
        self.callback: Callable[[NextHops], object] | None = callback
        self.address_types = tuple(address_types)
        self.max_hosts = max_hosts
        self.exchanges: list[str] = []
        self.implicit = False
        self.answers: dict[tuple[str, int], Answer] = {}
        self.lookups: list[Lookup] = []

    def cancel(self) -> None:
        self.callback = None
        for lookup in self.lookups:
            lookup.cancel()

    def start(self) -> None:
        self.lookups.append(self.resolver.query(self.domain, MX, self._on_mx))

    def _on_mx(self, answer: Answer) -> None:
        if answer.error == ERROR_BAD_NAME:
            self._done(permanent=f"5.1.2 bad destination domain {self.domain!r}")
        elif answer.error is not None:
            self._done(temporary=f"4.4.3 MX lookup for {self.domain} failed: {answer.error}")
        elif answer.nxdomain:
            self._done(permanent=f"5.1.2 domain {self.domain} does not exist (NXDOMAIN)")
        elif not answer.records:
            # RFC 5321 §5.1: no MX records, so the domain itself is the implicit MX.
            self.implicit = True
            self._resolve_exchanges([self.domain])
        else:
            usable = [(pref, host.lower()) for pref, host in answer.records if host != "."]
            if not usable:
                # RFC 7505 §3: a null MX ("." preference 0) says the domain accepts no mail.
                self._done(permanent=f"5.1.10 null MX: {self.domain} accepts no mail (RFC 7505)")
                return
            # RFC 5321 §5.1: lowest preference first, equal preferences in random order.
            usable.sort(key=lambda mx: (mx[0], random.random()))
            hosts = list(dict.fromkeys(host for _, host in usable))
            self._resolve_exchanges(hosts[: self.max_hosts])

    def _resolve_exchanges(self, hosts: list[str]) -> None:
        self.exchanges = hosts
        for host in hosts:
            for rdtype in self.address_types:
                self.lookups.append(self.resolver.query(host, rdtype, partial(self._on_address, (host, rdtype))))

    def _on_address(self, key: tuple[str, int], answer: Answer) -> None:
        self.answers[key] = answer
        if len(self.answers) < len(self.exchanges) * len(self.address_types):
            return
        hops: list[tuple[str, str]] = []
        failures: list[str] = []
        seen: set[str] = set()
        for host in self.exchanges:
            for rdtype in self.address_types:
                result = self.answers[(host, rdtype)]
                if result.error is not None:
                    failures.append(f"{host}: {result.error}")
                for ip in result.records:
                    if ip not in seen:
                        seen.add(ip)
                        hops.append((host, ip))
        if hops:
            self._done(hosts=hops)
        elif failures:
            self._done(temporary=f"4.4.3 address lookup failed for {self.domain}: {', '.join(failures)}")
        elif self.implicit:
            self._done(permanent=f"5.1.2 domain {self.domain} has no MX and no address")
        else:
            self._done(permanent=f"5.4.4 no MX host of {self.domain} has an address")

    def _done(self, hosts: list[tuple[str, str]] | None = None, permanent: str | None = None,
              temporary: str | None = None) -> None:
        callback, self.callback = self.callback, None
        if callback is not None:
            callback(NextHops(hosts or [], permanent, temporary))


def resolve_next_hops(resolver: Resolver, domain: str, callback: Callable[[NextHops], object], *,
                      address_types: Sequence[int] = (A, AAAA), max_hosts: int = MAX_MX_HOSTS) -> NextHopLookup:
    """Find where mail for ``domain`` goes; ``callback(NextHops)`` runs once, later, on the loop.

    ``address_types`` orders (and limits) the address families tried for each exchange.
    """
    lookup = NextHopLookup(resolver, domain, callback, address_types, max_hosts)
    try:
        literal = address_literal(domain)
        valid = bool(lookup.domain)
    except ValueError:
        literal, valid = None, False
    if not valid:
        resolver.loop.call_soon(lookup._done, None, f"5.1.2 bad destination domain {domain.strip()!r}")
        return lookup
    if literal is not None:
        resolver.loop.call_soon(lookup._done, [(domain.strip(), literal)])
        return lookup
    lookup.start()
    return lookup


def resolve_host(resolver: Resolver, host: str, callback: Callable[[NextHops], object], *,
                 address_types: Sequence[int] = (A, AAAA)) -> NextHopLookup:
    """The addresses of a named host (a ForwardRoute ``[host]``): no MX lookup (RFC 5321 §5.1)."""
    lookup = NextHopLookup(resolver, host, callback, address_types, 1)
    lookup.implicit = True
    lookup._resolve_exchanges([lookup.domain])
    return lookup
