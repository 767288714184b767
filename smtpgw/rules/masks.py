"""Wildcard masks over addresses, names and domains, and IP address masks.

Owns: the one mask language of smtpgw.conf, where ``*`` stands for any run of
characters (also none) and ``?`` for exactly one character, compared without
regard to case; and the IP mask forms of RelayRule and the IP lists:
``x.x.x.x``, ``x.x.x.x/n``, ``x.x.x.x/x.x.x.x`` (netmask), IPv6 addresses and
networks (``::1``, ``2001:db8::/32``, also in brackets), and ``any``.

Must never: build a regular expression from mask text without escaping it
(every character but ``*`` and ``?`` is literal, so ``a.b+c`` matches only
``a.b+c``), or backtrack without bound: a mask is cut at its stars into
fixed-length segments that are found left to right, so matching costs at most
len(mask) * len(value) steps whatever the input.

Client addresses: an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, as an IPv6
listener reports IPv4 clients) is unmapped to IPv4 before it is compared, so
IPv4 masks apply to it.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "IP_MASK_FORMS",
    "IPAddress",
    "IPMask",
    "address_mask_problem",
    "client_address",
    "domain_match",
    "ip_match",
    "match_any",
    "parse_ip_mask",
    "wildcard_match",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_MASK = 1024  # characters; a longer mask is refused by address_mask_problem
IP_MASK_FORMS = "x.x.x.x, x.x.x.x/n, x.x.x.x/x.x.x.x, an IPv6 address or network, or any"


class _Glob:
    """A compiled mask: literal head and tail, and the segments between stars."""

    def __init__(self, mask: str) -> None:
        parts = re.sub(r"\*+", "*", mask).split("*")
        compiled = [_segment(part) for part in parts]
        self.star = len(parts) > 1
        self.head, self.tail = compiled[0], compiled[-1]
        self.head_len, self.tail_len = len(parts[0]), len(parts[-1])
        self.middle = compiled[1:-1]

    def match(self, value: str) -> bool:
        if not self.star:
            return self.head.fullmatch(value) is not None
        end = len(value) - self.tail_len
        if end < self.head_len:
            return False
        if not self.head.match(value) or not self.tail.fullmatch(value, end):
            return False
        pos = self.head_len
        for segment in self.middle:
            # Segments have a fixed length, so the leftmost occurrence is always
            # the best choice: no backtracking is ever needed.
            found = segment.search(value, pos, end)
            if found is None:
                return False
            pos = found.end()
        return True


def _segment(part: str) -> re.Pattern[str]:
    body = "".join("." if char == "?" else re.escape(char) for char in part)
    return re.compile(body, re.IGNORECASE | re.DOTALL)


@functools.lru_cache(maxsize=4096)
def _compiled(mask: str) -> _Glob:
    return _Glob(mask)


def wildcard_match(mask: str, value: str) -> bool:
    """True when ``value`` matches ``mask`` as a whole (``*``, ``?``; case-insensitive)."""
    return _compiled(mask).match(value)


def match_any(masks: list[str] | tuple[str, ...], value: str) -> bool:
    """True when any of ``masks`` matches ``value``."""
    return any(wildcard_match(mask, value) for mask in masks)


def domain_match(mask: str, domain: str) -> bool:
    """Match a domain mask (``example.test``, ``*.example.test``) against a domain.

    A trailing root dot on either side is ignored. ``*.example.test`` matches
    subdomains only, not ``example.test`` itself: list both when both are meant.
    """
    return wildcard_match(mask.rstrip("."), domain.rstrip("."))


def address_mask_problem(mask: str) -> str | None:
    """Why ``mask`` cannot be an address mask, or None when it can.

    An address mask is matched against the whole address (``local@domain``), so
    it is either made of stars only or contains an ``@``: a bare domain would
    match no address at all, which is never what the writer meant.
    """
    if not mask:
        return "empty address mask"
    if len(mask) > MAX_MASK:
        return f"address mask longer than {MAX_MASK} characters"
    if any(char.isspace() or char == "," or ord(char) < 32 for char in mask):
        return f"'{mask}' is not one address mask (no spaces or commas inside)"
    if "@" not in mask and mask.strip("*"):
        return f"'{mask}' has no '@'; did you mean '*@{mask}'?"
    return None


@dataclass(frozen=True)
class IPMask:
    """One parsed IP mask; ``networks`` is empty for ``any`` (which matches all)."""

    text: str
    networks: tuple[IPNetwork, ...]

    @property
    def is_any(self) -> bool:
        return not self.networks

    def matches(self, address: IPAddress | None) -> bool:
        if self.is_any:
            return True
        return address is not None and any(address in network for network in self.networks)


def _netmask_prefix(netmask: str) -> int:
    """Prefix length of a dotted IPv4 netmask; refuses non-contiguous masks."""
    value = int(ipaddress.IPv4Address(netmask))
    inverse = ~value & 0xFFFFFFFF
    if inverse & (inverse + 1):
        raise ValueError(f"'{netmask}' is not a contiguous netmask")
    return 32 - inverse.bit_length()


@functools.lru_cache(maxsize=4096)
def parse_ip_mask(text: str) -> IPMask:
    """Parse an IP mask (see the module docstring); ValueError names the forms.

    Host bits set under the prefix are ignored (``192.0.2.7/24`` means
    ``192.0.2.0/24``), as a network address is what such a line means.
    """
    mask = text.strip()
    if mask.lower() == "any":
        return IPMask(text=mask, networks=())
    bare = mask[1:-1] if mask.startswith("[") and mask.endswith("]") else mask
    address, slash, prefix = bare.partition("/")
    try:
        if slash and "." in prefix:
            prefix = str(_netmask_prefix(prefix))
        network = ipaddress.ip_network(f"{address}/{prefix}" if slash else address, strict=False)
    except ValueError:
        raise ValueError(f"'{mask}' is not an IP mask ({IP_MASK_FORMS})") from None
    return IPMask(text=mask, networks=(_unmapped(network),))


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")  # RFC 4291 §2.5.5.2 IPv4-mapped IPv6 addresses


def _unmapped(network: IPNetwork) -> IPNetwork:
    """``::ffff:192.0.2.0/120`` → ``192.0.2.0/24``: ``client_address`` unmaps every client, so a
    mask written in the mapped form must be IPv4 too, or it would match nobody."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
    return network


def client_address(value: str | IPAddress | None) -> IPAddress | None:
    """The client's address for mask matching, or None when it is not an IP.

    Accepts ``192.0.2.1``, ``::1``, ``[::1]`` and the RFC 5321 §4.1.3 literal
    ``[IPv6:::1]``; IPv4-mapped IPv6 addresses are unmapped to IPv4.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return _client_text(value)
    if isinstance(value, ipaddress.IPv6Address) and value.ipv4_mapped is not None:
        return value.ipv4_mapped
    return value


@functools.lru_cache(maxsize=1024)
def _client_text(value: str) -> IPAddress | None:
    """``client_address`` of a text (each recipient of a session asks again for the same client)."""
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        return client_address(ipaddress.ip_address(text))
    except ValueError:
        return None


def ip_match(mask: str, address: str | IPAddress | None) -> bool:
    """True when the client ``address`` falls in the IP ``mask``; a bad mask matches nothing."""
    try:
        parsed = parse_ip_mask(mask)
    except ValueError:
        return False
    return parsed.matches(client_address(address))
