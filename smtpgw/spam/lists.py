"""White and black lists of senders, recipients and client IPs ([smtpgw.antispam]).

Owns: matching envelope and header addresses against the address masks of
WhiteListSenders / BlackListSenders / WhiteListRecipients / BlackListRecipients
(``*`` any run of characters, ``?`` one character, case-insensitive), and
client IPs against WhiteListIPs / BlackListIPs (an address, a CIDR network, or a
mask with ``*``), and deciding Trusted or Blacklisted.

Decision order (our choice; the reference does not document it): white lists
first, so a listed partner is never blocked by a broad black mask.
* Trusted when the client IP is white, or the envelope sender or From: address
  is white, or every recipient is white (one white recipient, e.g. postmaster,
  does not carry spam to the others).
* Blacklisted when the client IP is black, the envelope sender or From: address
  is black, or any recipient is black (a spam trap).

Must never: raise on a malformed mask (it is logged once and ignored), or match
a mask against more than ``MAX_ADDRESS`` characters.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger("smtpgw.spam.lists")

TRUSTED = "Trusted"
BLACKLISTED = "Blacklisted"
MAX_ADDRESS = 320  # RFC 5321 §4.5.3.1: 64-octet local part + @ + 255-octet domain


def _mask_regex(mask: str) -> re.Pattern[str]:
    pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in mask.strip().lower())
    return re.compile(f"^{pattern}$", re.S)


def bare_address(address: str) -> str:
    """``<User@Example.org>`` → ``user@example.org``; "" for the null sender."""
    return address.strip().strip("<>").strip().lower()[:MAX_ADDRESS]


class AddressList:
    """Address masks; ``matches`` tells whether any mask covers an address."""

    def __init__(self, masks: Iterable[str] | None) -> None:
        self.masks = [m.strip() for m in masks or () if m and m.strip()]
        self._regexes = [_mask_regex(m) for m in self.masks]

    def __bool__(self) -> bool:
        return bool(self._regexes)

    def matches(self, address: str) -> str | None:
        """The first mask matching ``address``, or None."""
        address = bare_address(address)
        if not address:
            return None
        for mask, regex in zip(self.masks, self._regexes):
            if regex.match(address):
                return mask
        return None


class IPList:
    """Client IP masks: ``192.0.2.7``, ``192.0.2.0/24``, ``2001:db8::/32`` or ``192.0.2.*``."""

    def __init__(self, masks: Iterable[str] | None) -> None:
        self.networks: list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]] = []
        self.patterns: list[tuple[str, re.Pattern[str]]] = []
        for mask in masks or ():
            mask = mask.strip()
            if not mask:
                continue
            if "*" in mask or "?" in mask:
                self.patterns.append((mask, _mask_regex(mask)))
                continue
            try:
                self.networks.append((mask, ipaddress.ip_network(mask, strict=False)))
            except ValueError:
                log.warning("ignoring malformed IP mask %r", mask)

    def __bool__(self) -> bool:
        return bool(self.networks or self.patterns)

    def matches(self, ip: str | None) -> str | None:
        if not ip:
            return None
        try:
            address = ipaddress.ip_address(ip.strip().strip("[]").split("%", 1)[0])
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:192.0.2.1 is the IPv4 client (RFC 4291 §2.5.5.2)
        for mask, network in self.networks:
            if address.version == network.version and address in network:
                return mask
        text = str(address)
        for mask, regex in self.patterns:
            if regex.match(text):
                return mask
        return None


@dataclass(frozen=True)
class ListDecision:
    status: str  # "Trusted" or "Blacklisted"
    method: str  # X-SpamTest-Method
    reason: str


class SenderLists:
    """The six lists of one [smtpgw.antispam] section."""

    def __init__(self, section: object) -> None:
        def masks(name: str) -> list[str]:
            return list(getattr(section, name, None) or [])

        self.white_senders = AddressList(masks("WhiteListSenders"))
        self.black_senders = AddressList(masks("BlackListSenders"))
        self.white_recipients = AddressList(masks("WhiteListRecipients"))
        self.black_recipients = AddressList(masks("BlackListRecipients"))
        self.white_ips = IPList(masks("WhiteListIPs"))
        self.black_ips = IPList(masks("BlackListIPs"))

    def decide(
        self, client_ip: str | None, senders: list[str], recipients: list[str]
    ) -> ListDecision | None:
        """Trusted, Blacklisted or None (go on with content analysis)."""
        mask = self.white_ips.matches(client_ip)
        if mask:
            return ListDecision(TRUSTED, "white list", f"client {client_ip} in WhiteListIPs ({mask})")
        found = _first(self.white_senders, senders, "sender", "WhiteListSenders")
        if found:
            return ListDecision(TRUSTED, "white list", found)
        if recipients and self.white_recipients and all(self.white_recipients.matches(r) for r in recipients):
            return ListDecision(TRUSTED, "white list", "every recipient in WhiteListRecipients")
        mask = self.black_ips.matches(client_ip)
        if mask:
            return ListDecision(BLACKLISTED, "black list", f"client {client_ip} in BlackListIPs ({mask})")
        found = _first(self.black_senders, senders, "sender", "BlackListSenders") or _first(
            self.black_recipients, recipients, "recipient", "BlackListRecipients"
        )
        if found:
            return ListDecision(BLACKLISTED, "black list", found)
        return None


def _first(masks: AddressList, addresses: list[str], role: str, list_name: str) -> str | None:
    """The reason naming the first of ``addresses`` that ``masks`` covers, or None."""
    for address in addresses:
        mask = masks.matches(address)
        if mask:
            return f"{role} {bare_address(address)} in {list_name} ({mask})"
    return None
