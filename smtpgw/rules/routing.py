"""ForwardRoute: where each recipient's mail goes ([smtpgw.forward], kmg-spec §3.5).

Owns: parsing ForwardRoute values, choosing the first matching route for a
recipient, and grouping a message's recipients by destination so the sender
opens one SMTP transaction per destination.
Must never: resolve names or touch the network (the sender looks up MX and
address records at delivery time), or change a recipient address.

Grammar, one route per ForwardRoute line (the gateway has no local delivery)::

    <address mask> [host:port]     deliver to that host and port
    <address mask> [host]          deliver to that host, port 25
    <address mask> [host]:port     the same as [host:port]
    <address mask> domain          deliver to the MX hosts of ``domain``
    <address mask> [IPv6:::1]:port an IPv6 literal (RFC 5321 §4.1.3), or [::1]:port

The host in brackets is a name or an IP literal and is used as it is: no MX
lookup (RFC 5321 §5.1, an address literal or a named host is contacted
directly). The mask (``*``, ``?``, case-insensitive) is matched against the
whole recipient address; the first matching route wins; a recipient no route
matches goes to the MX hosts of its own domain.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from smtpgw.rules.access import recipient_mask
from smtpgw.rules.masks import domain_match, wildcard_match

__all__ = [
    "Destination",
    "Route",
    "first_route",
    "group_by_route",
    "is_hostname",
    "parse_port",
    "parse_route",
    "recipient_domain",
]

SMTP_PORT = 25  # RFC 5321 §4.5.4.2 (well-known port for relay)

# ("host", host, port) for a direct host; ("mx", domain) for MX delivery.
Destination = tuple[str, str, int] | tuple[str, str]

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_SHAPE = "expected '<address mask> [host:port]', '<address mask> [host]' or '<address mask> domain'"


def is_hostname(name: str) -> bool:
    """RFC 1123 §2.1 host name syntax (letters, digits, hyphens; labels of 1-63)."""
    name = name[:-1] if name.endswith(".") else name
    return 0 < len(name) <= 253 and all(_LABEL.match(label) for label in name.split("."))


@dataclass(frozen=True)
class Route:
    """One ForwardRoute: ``kind`` is "host" (``host``, ``port``) or "mx" (``host`` is the domain)."""

    mask: str
    kind: str
    host: str
    port: int | None
    where: str

    @property
    def destination(self) -> Destination:
        if self.kind == "mx":
            return ("mx", self.host.lower())
        return ("host", self.host.lower(), self.port or SMTP_PORT)

    def matches(self, recipient: str) -> bool:
        return wildcard_match(self.mask, recipient)


def parse_port(text: str) -> int:
    """A TCP port number (1-65535) from its decimal text; ValueError otherwise."""
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"'{text}' is not a port (1-65535)")
    return int(text)


def _bracketed(target: str) -> tuple[str, int]:
    """Host and port of ``[host]``, ``[host:port]``, ``[host]:port`` or an IPv6 literal."""
    inside, closed, after = target[1:].partition("]")
    if not closed or (after and not after.startswith(":")):
        raise ValueError(f"'{target}': {_SHAPE}")
    port = parse_port(after[1:]) if after else None
    if inside[:5].lower() == "ipv6:":
        try:
            return str(ipaddress.IPv6Address(inside[5:])), port or SMTP_PORT
        except ValueError:
            raise ValueError(f"'{inside}' is not an IPv6 address literal") from None
    try:
        return str(ipaddress.ip_address(inside)), port or SMTP_PORT
    except ValueError:
        pass
    host, colon, inner_port = inside.partition(":")
    if colon and port is not None:
        raise ValueError(f"'{target}' gives the port twice")
    if colon:
        port = parse_port(inner_port)
    if not is_hostname(host):
        raise ValueError(f"'{host}' is not a host name or IP address")
    return host, port or SMTP_PORT


def parse_route(text: str, where: str) -> Route:
    """Parse one ForwardRoute value; ValueError says what is wrong."""
    words = text.split()
    if len(words) != 2:
        raise ValueError(f"{_SHAPE}, got '{text}'")
    mask = recipient_mask(words[0])
    target = words[1]
    if target.startswith("["):
        host, port = _bracketed(target)
        return Route(mask, "host", host, port, where)
    if not is_hostname(target):
        raise ValueError(f"'{target}' is not a domain; a host needs brackets: [{target}]")
    return Route(mask, "mx", target.rstrip(".").lower(), None, where)


def first_route(routes: list[Route], recipient: str) -> Route | None:
    """The first route whose mask matches ``recipient``, or None (MX of its domain)."""
    for route in routes:
        if route.matches(recipient):
            return route
    return None


def recipient_domain(recipient: str) -> str:
    """The domain of an address (after its last ``@``), lower-cased, without a root dot."""
    return recipient.rpartition("@")[2].rstrip(".").lower()


def is_protected(protected_domains: Iterable[str], address: str) -> bool:
    """``address`` is in one of the ProtectedDomains (the organisation's own mail)."""
    domain = recipient_domain(address)
    return any(domain_match(mask, domain) for mask in protected_domains)


def group_by_route(routes: list[Route], recipients: list[str]) -> dict[Destination, list[str]]:
    """Recipients by destination, in first-seen order; unmatched ones by ("mx", their domain)."""
    groups: dict[Destination, list[str]] = {}
    for recipient in recipients:
        route = first_route(routes, recipient)
        key = route.destination if route else ("mx", recipient_domain(recipient))
        groups.setdefault(key, []).append(recipient)
    return groups
