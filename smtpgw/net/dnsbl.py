"""DNS black list (DNSBL) lookups of a client address, as ``DNSBlackList`` zones configure them.

Owns: turning an address into the DNSBL query name (RFC 5782 §2.1 reversed octets, §2.4 IPv6
nibbles), asking every zone at once through the resolver, and deciding what counts as a listing:
an A record inside 127.0.0.0/8 (RFC 5782 §2.1), minus the operators' error codes
127.255.255.252-255.

Must never: count a timeout, a server failure or an answer outside 127.0.0.0/8 as a listing (a
failing or expired list must not block mail), call back more than once, or block the loop.
"""

from __future__ import annotations

import ipaddress
import logging
from functools import partial
from typing import Callable, Iterable

from smtpgw.net.dns import Answer, Lookup, Resolver
from smtpgw.net.dnswire import A, reverse_labels
from smtpgw.net.loop import Timer

__all__ = ["DNSBLChecker", "DNSBLCheck", "is_listing"]

log = logging.getLogger("smtpgw.net.dnsbl")

_LISTING_NET = ipaddress.ip_network("127.0.0.0/8")
# Not listings: operators answer these to say the query itself was refused (e.g. sent through a
# public resolver, over quota, or a malformed query name).
_ERROR_TEXTS = frozenset(f"127.255.255.{n}" for n in range(252, 256))
_ERROR_CODES = frozenset(ipaddress.ip_address(text) for text in _ERROR_TEXTS)

Result = Callable[[list[str], list[str]], object]


def is_listing(record: str) -> bool:
    """Whether an A record of a DNSBL answer means "listed" (RFC 5782 §2.1)."""
    try:
        address = ipaddress.ip_address(record)
    except ValueError:
        return False
    return address in _LISTING_NET and address not in _ERROR_CODES


class DNSBLCheck:
    """One address being checked against every zone; ``cancel()`` stops the callback."""

    def __init__(self, zones: list[str], callback: Result) -> None:
        self.zones = zones
        self.callback: Result | None = callback
        self.listed: set[str] = set()
        self.errors: dict[str, str] = {}
        self.pending = set(zones)
        self.lookups: list[Lookup] = []
        self.timer: Timer | None = None

    def cancel(self) -> None:
        self.callback = None
        for lookup in self.lookups:
            lookup.cancel()
        if self.timer is not None:
            self.timer.cancel()


class DNSBLChecker:
    """Check addresses against DNSBL zones: ``check(ip, callback)``.

    ``callback(listed_zones, errors)`` runs once, on the loop, after every zone answered or
    failed, or after ``timeout`` seconds (the zones still pending then are reported as errors).
    ``listed_zones`` keeps the configured zone order; ``errors`` are "zone: reason" strings.
    """

    def __init__(self, resolver: Resolver, zones: Iterable[str], timeout: float | None = None) -> None:
        self.resolver = resolver
        cleaned = (zone.strip().strip(".").lower() for zone in zones)
        self.zones = list(dict.fromkeys(zone for zone in cleaned if zone))
        self.timeout = timeout

    def check(self, ip: str, callback: Result) -> DNSBLCheck:
        state = DNSBLCheck(self.zones, callback)
        loop = self.resolver.loop
        try:
            labels = reverse_labels(ip)
        except ValueError:
            state.errors = {zone: f"not an IP address: {ip!r}" for zone in self.zones}
            state.pending.clear()
            loop.call_soon(self._finish, state)
            return state
        if not self.zones:
            loop.call_soon(self._finish, state)
            return state
        if self.timeout is not None:
            state.timer = loop.call_later(self.timeout, self._expire, state)
        for zone in self.zones:
            state.lookups.append(self.resolver.query(f"{labels}.{zone}", A, partial(self._answered, state, zone)))
        return state

    def _answered(self, state: DNSBLCheck, zone: str, answer: Answer) -> None:
        if zone not in state.pending:
            return
        state.pending.discard(zone)
        if answer.error is not None:
            state.errors[zone] = answer.error
        elif any(is_listing(record) for record in answer.records):
            state.listed.add(zone)
        else:
            refused = [r for r in answer.records if r in _ERROR_TEXTS]
            if refused:
                state.errors[zone] = f"query refused by the list ({refused[0]})"
            elif answer.records:
                log.info("DNSBL %s answered %s for %s: not a listing (RFC 5782 §2.1)", zone,
                         ",".join(answer.records), answer.name)
        if not state.pending:
            self._finish(state)

    def _expire(self, state: DNSBLCheck) -> None:
        for zone in state.pending:
            state.errors[zone] = "timeout"
        state.pending.clear()
        self._finish(state)

    def _finish(self, state: DNSBLCheck) -> None:
        callback, state.callback = state.callback, None
        if state.timer is not None:
            state.timer.cancel()
        for lookup in state.lookups:
            lookup.cancel()
        if callback is None:
            return
        listed = [zone for zone in state.zones if zone in state.listed]
        errors = [f"{zone}: {state.errors[zone]}" for zone in state.zones if zone in state.errors]
        callback(listed, errors)
