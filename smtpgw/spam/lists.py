"""White and black lists of senders, recipients and client IPs ([smtpgw.antispam]).

Owns: deciding Trusted or Blacklisted from WhiteListSenders / BlackListSenders
/ WhiteListRecipients / BlackListRecipients (address masks) and WhiteListIPs /
BlackListIPs (IP masks). The mask languages are those of ``smtpgw.masks`` —
``wildcard_match`` for addresses (``*`` any run of characters, ``?`` one
character, case-insensitive) and ``parse_ip_mask`` for IPs (an address, a CIDR
network, an address/netmask, or ``any``) — the very functions the config loader
validates these lists with, so a mask the config accepts matches here exactly as
it does everywhere else in smtpgw.

Decision order (our choice; the reference does not document it): white lists
first, so a listed partner is never blocked by a broad black mask.
* Trusted when the client IP is white, or the envelope sender or From: address
  is white, or every recipient is white (one white recipient, e.g. postmaster,
  does not carry spam to the others).
* Blacklisted when the client IP is black, the envelope sender or From: address
  is black, or any recipient is black (a spam trap).

Must never: raise on a malformed mask (it is logged and ignored: the config
loader already refuses such a line, so only hand-built sections carry one), or
match a mask against more than ``MAX_ADDRESS`` characters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from smtpgw.rules.masks import IPMask, client_address, parse_ip_mask, wildcard_match

log = logging.getLogger("smtpgw.spam.lists")

TRUSTED = "Trusted"
BLACKLISTED = "Blacklisted"
MAX_ADDRESS = 320  # RFC 5321 §4.5.3.1: 64-octet local part + @ + 255-octet domain


def bare_address(address: str) -> str:
    """``<User@Example.org>`` → ``user@example.org``; "" for the null sender."""
    return address.strip().strip("<>").strip().lower()[:MAX_ADDRESS]


class AddressList:
    """Address masks; ``matches`` tells whether any mask covers an address."""

    def __init__(self, masks: Iterable[str] | None) -> None:
        self.masks = [m.strip() for m in masks or () if m and m.strip()]

    def __bool__(self) -> bool:
        return bool(self.masks)

    def matches(self, address: str) -> str | None:
        """The first mask matching ``address``, or None."""
        address = bare_address(address)
        if not address:
            return None
        for mask in self.masks:
            if wildcard_match(mask, address):
                return mask
        return None


class IPList:
    """Client IP masks: ``192.0.2.7``, ``192.0.2.0/24``, ``192.0.2.0/255.255.255.0``, ``2001:db8::/32``, ``any``."""

    def __init__(self, masks: Iterable[str] | None) -> None:
        self.masks: list[IPMask] = []
        for mask in masks or ():
            if not mask or not mask.strip():
                continue
            try:
                self.masks.append(parse_ip_mask(mask.strip()))
            except ValueError as exc:
                log.warning("ignoring IP list entry: %s", exc)

    def __bool__(self) -> bool:
        return bool(self.masks)

    def matches(self, ip: str | None) -> str | None:
        """The first mask covering the client ``ip`` (IPv4-mapped IPv6 unmapped), or None."""
        if not self.masks:  # an empty list (the default) parses no address
            return None
        address = client_address(ip.split("%", 1)[0]) if ip else None
        if address is None:
            return None
        for mask in self.masks:
            if mask.matches(address):
                return mask.text
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
