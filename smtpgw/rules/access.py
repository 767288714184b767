"""SMTP access rules of [smtpgw.access]: RelayRule, ConnectRule, HeloRule, MailfromRule.

Owns: parsing the rule lines (and the ``file:`` lists they name) into rule
objects that remember their text and ``FILE:LINE``, and deciding with them.
Must never: let a recipient through that no RelayRule allows (the gateway must
never be an open relay, RFC 2505 §2.1), touch the network (DNS facts are looked
up by the caller), or raise on a client address it cannot parse.

Grammar (kmg-spec §3.4), keywords case-insensitive, exactly five words::

    RelayRule=allow|deny from <ip>|<ip mask>|any|file:<path> to <rcpt mask>|file:<path>
    ConnectRule=allow|deny from in_dnsbl|out_dnsbl|has_name|no_name|any to <rcpt mask>|file:<path>
    HeloRule=allow|deny from has_ip|no_ip|same_ip|diff_ip|any to <rcpt mask>|file:<path>
    MailfromRule=allow|deny from has_ip|no_ip|has_mx|no_mx|any to <rcpt mask>|file:<path>

IP masks are those of ``smtpgw.masks.parse_ip_mask``. A recipient mask is an
address mask (``*``, ``?``; ``*`` alone matches every recipient) matched
against the whole recipient address as given in RCPT TO, without the angle
brackets. A ``file:`` list holds one entry per line (IP masks on the ``from``
side, recipient masks on the ``to`` side); ``#`` comment lines and blank lines
are skipped; a relative path is relative to ``folder`` (the config's folder).
Lists are read once, when the configuration is loaded (and reloaded on HUP).

Decisions:

* ``relay_decision(rules, client_ip, recipient)``: the first RelayRule whose
  source matches the client address and whose recipient mask matches the
  recipient decides; when none matches, the recipient is refused
  (``Decision(False, None)``). A client address that is not an IP (a Unix
  socket, garbage) matches only ``any``.
  Untrusted routing: a recipient with sender-specified routing in its local
  part (``user%other.test@example.test``, ``other.test!user@example.test``,
  ``"user@other.test"@example.test``; ``smtp.routed``) is never allowed by a
  rule that allows every client (``allow from any``, or a ``/0`` network) to
  some recipients only: such a rule is skipped, so only a rule naming the
  client's own networks (a trusted client) can allow it. This is Postfix's allow_untrusted_routing=no,
  whose permit_auth_destination skips a routed address so that
  reject_unauth_destination refuses it; without it a domain rule would pass
  the address to a next hop that may honour the route and relay to
  other.test. The refusal names the rule skipped (``untrusted_routing``); the
  client gets the gateway's one relay refusal, 550 5.7.1 (Postfix answers
  with its relay_domains_reject_code, 554 5.7.1).
* ``first_match(rules, facts, recipient)``: for ConnectRule, HeloRule and
  MailfromRule, the first rule whose condition holds and whose recipient mask
  matches, or None (no rule applies: the caller lets the command through).
  ``facts`` holds what the caller found out for the rules' kind (each kind
  has facts of its own: HeloRule's ``has_ip`` is not MailfromRule's):
  ``in_dnsbl`` (client IP listed in
  a DNSBlackList zone), ``has_name`` (client IP has a reverse DNS name),
  ``has_ip`` (HELO name, or MAIL FROM domain, resolves to an address),
  ``same_ip`` (HELO name resolves to the client's own address), ``has_mx``
  (MAIL FROM domain has MX records). The negative conditions (``out_dnsbl``,
  ``no_name``, ``no_ip``, ``diff_ip``, ``no_mx``) hold when the fact is False.
  A condition whose fact is absent from ``facts`` (the lookup failed or was not
  made) holds neither way, so its rule is skipped; ``any`` always holds.
* ``verdict_for_all(rules, facts)``: what ``first_match`` would decide for
  every recipient, when that is already known before any RCPT TO (e.g. at
  connect time), else None: the caller then asks again per recipient.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from smtpgw.net import smtp
from smtpgw.rules.masks import (
    IPAddress,
    IPMask,
    address_mask_problem,
    client_address,
    match_any,
    parse_ip_mask,
)

__all__ = [
    "CONDITIONS",
    "ConditionRule",
    "Decision",
    "RelayRule",
    "Rule",
    "RuleError",
    "expand_list",
    "first_match",
    "parse_condition_rule",
    "parse_relay_rule",
    "read_include",
    "recipient_mask",
    "relay_decision",
    "verdict_for_all",
]

T = TypeVar("T")

MAX_INCLUDE_BYTES = 16 * 1024 * 1024
MAX_INCLUDE_LINE = 4096

# Condition word -> (fact it reads, value of the fact for which it holds).
CONDITIONS: dict[str, dict[str, tuple[str, bool]]] = {
    "ConnectRule": {
        "in_dnsbl": ("in_dnsbl", True),
        "out_dnsbl": ("in_dnsbl", False),
        "has_name": ("has_name", True),
        "no_name": ("has_name", False),
    },
    "HeloRule": {
        "has_ip": ("has_ip", True),
        "no_ip": ("has_ip", False),
        "same_ip": ("same_ip", True),
        "diff_ip": ("same_ip", False),
    },
    "MailfromRule": {
        "has_ip": ("has_ip", True),
        "no_ip": ("has_ip", False),
        "has_mx": ("has_mx", True),
        "no_mx": ("has_mx", False),
    },
}


class RuleError(ValueError):
    """Problems in a ``file:`` list; each is a complete ``FILE:LINE: message``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def read_include(spec: str, folder: str, where: str) -> list[tuple[str, str]]:
    """Entries of a ``file:`` list as (entry, ``FILE:LINE``) pairs.

    ``spec`` is the path after ``file:``. An unreadable, oversized or
    undecodable file raises RuleError located at ``where`` (the line naming it)
    or at the offending line of the list.
    """
    path = os.path.normpath(os.path.join(folder, spec.strip()))
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_INCLUDE_BYTES + 1)
    except OSError as error:
        raise RuleError([f"{where}: cannot read include file {path}: {error.strerror}"]) from None
    if len(data) > MAX_INCLUDE_BYTES:
        raise RuleError([f"{where}: include file {path} is larger than {MAX_INCLUDE_BYTES} bytes"])
    entries: list[tuple[str, str]] = []
    problems: list[str] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            problems.append(f"{path}:{number}: not valid UTF-8")
            continue
        if len(line) > MAX_INCLUDE_LINE:
            problems.append(f"{path}:{number}: line longer than {MAX_INCLUDE_LINE} characters")
        elif line and not line.startswith("#"):
            entries.append((line, f"{path}:{number}"))
    if problems:
        raise RuleError(problems)
    return entries


def expand_list(
    token: str, folder: str, where: str, convert: Callable[[str, str], T]
) -> list[T]:
    """``convert(entry, where)`` over a value, or over each line of its ``file:`` list.

    A plain token's ValueError propagates (the caller locates it); the problems
    of a list's entries are all collected, each at its own line, into RuleError.
    """
    if token[:5].lower() != "file:":
        return [convert(token, where)]
    values: list[T] = []
    problems: list[str] = []
    for entry, entry_where in read_include(token[5:], folder, where):
        try:
            values.append(convert(entry, entry_where))
        except RuleError as error:
            problems.extend(error.problems)
        except ValueError as error:
            problems.append(f"{entry_where}: {error}")
    if problems:
        raise RuleError(problems)
    return values


def recipient_mask(mask: str, where: str = "") -> str:
    """``mask`` when it is a usable address mask, else ValueError saying why."""
    problem = address_mask_problem(mask)
    if problem:
        raise ValueError(problem)
    return mask


def _ip_mask(text: str, where: str) -> IPMask:
    return parse_ip_mask(text)


def _split_rule(text: str, kind: str, conditions: str) -> tuple[bool, str, str]:
    words = text.split()
    shape = f"expected 'allow|deny from {conditions} to <recipient mask>|file:<path>'"
    if len(words) != 5 or words[1].lower() != "from" or words[3].lower() != "to":
        raise ValueError(f"{shape}, got '{text}'")
    verb = words[0].lower()
    if verb not in ("allow", "deny"):
        raise ValueError(f"'{words[0]}' is neither allow nor deny ({kind}={text})")
    return verb == "allow", words[2], words[4]


@dataclass(frozen=True)
class RelayRule:
    """``allow|deny from <sources> to <recipients>``; ``where`` is ``FILE:LINE``."""

    allow: bool
    sources: tuple[IPMask, ...]
    recipients: tuple[str, ...]
    text: str
    where: str
    kind: str = "RelayRule"

    def matches(self, client: IPAddress | None, recipient: str) -> bool:
        return any(source.matches(client) for source in self.sources) and match_any(
            self.recipients, recipient
        )

    @property
    def for_every_client(self) -> bool:
        """True when a source matches every client (``any``, ``0.0.0.0/0``, ``::/0``)."""
        return any(source.is_any or any(net.prefixlen == 0 for net in source.networks) for source in self.sources)

    @property
    def untrusted_routing(self) -> bool:
        """True when a routed recipient must not pass this rule: it allows every client, but not to
        every recipient (``allow from any to *`` lets anything through, routed or not)."""
        return self.allow and self.for_every_client and not _every_recipient(self.recipients)


def _every_recipient(masks: tuple[str, ...]) -> bool:
    return any(not mask.strip("*") for mask in masks)


@dataclass(frozen=True)
class ConditionRule:
    """A ConnectRule, HeloRule or MailfromRule: ``allow|deny from <condition> to <recipients>``."""

    kind: str
    allow: bool
    condition: str
    recipients: tuple[str, ...]
    text: str
    where: str

    def holds(self, facts: dict[str, bool]) -> bool:
        if self.condition == "any":
            return True
        fact, wanted = CONDITIONS[self.kind][self.condition]
        return fact in facts and bool(facts[fact]) is wanted

    @property
    def for_everyone(self) -> bool:
        """True when the recipient mask matches every recipient (``*``)."""
        return _every_recipient(self.recipients)


Rule = RelayRule | ConditionRule


@dataclass(frozen=True)
class Decision:
    """The outcome of a rule list, with the rule that decided (None: no rule matched)."""

    allowed: bool
    rule: Rule | None
    untrusted_routing: bool = False  # refused: a routed recipient only a rule for every client allows

    @property
    def reason(self) -> str:
        """A log-ready account of why, e.g. ``RelayRule=deny from any to * (smtpgw.conf:14)``."""
        if self.rule is None:
            return "no rule matched"
        said = f"{self.rule.kind}={self.rule.text} ({self.rule.where})"
        return f"untrusted routing, not allowed by {said}" if self.untrusted_routing else said


def parse_relay_rule(text: str, where: str, folder: str) -> RelayRule:
    """Parse one RelayRule value; ValueError for its syntax, RuleError for its file: lists."""
    allow, source, target = _split_rule(text, "RelayRule", "<ip>|<ip mask>|any|file:<path>")
    sources = tuple(expand_list(source, folder, where, _ip_mask))
    recipients = tuple(expand_list(target, folder, where, recipient_mask))
    return RelayRule(allow, sources, recipients, " ".join(text.split()), where)


def parse_condition_rule(kind: str, text: str, where: str, folder: str) -> ConditionRule:
    """Parse a ConnectRule, HeloRule or MailfromRule value (``kind`` names which)."""
    words = "|".join([*CONDITIONS[kind], "any"])
    allow, condition, target = _split_rule(text, kind, words)
    condition = condition.lower()
    if condition != "any" and condition not in CONDITIONS[kind]:
        raise ValueError(f"'{condition}' is not a {kind} condition ({words.replace('|', ', ')})")
    recipients = tuple(expand_list(target, folder, where, recipient_mask))
    return ConditionRule(kind, allow, condition, recipients, " ".join(text.split()), where)


def relay_decision(
    rules: list[RelayRule], client_ip: str | IPAddress | None, recipient: str
) -> Decision:
    """First matching RelayRule decides; no match refuses (never an open relay).

    A routed recipient skips the allow rules for every client (see the module docstring).
    """
    client = client_address(client_ip)
    routed = smtp.routed(recipient)
    skipped: RelayRule | None = None
    for rule in rules:
        if not rule.matches(client, recipient):
            continue
        if routed and rule.untrusted_routing:
            skipped = skipped or rule
            continue
        if skipped is not None and not rule.allow:
            break  # the refusal is owed to the routing, not to a catch-all deny
        return Decision(rule.allow, rule)
    if skipped is not None:
        return Decision(False, skipped, untrusted_routing=True)
    return Decision(False, None)


def first_match(
    rules: list[ConditionRule], facts: dict[str, bool], recipient: str
) -> ConditionRule | None:
    """The first rule whose condition holds and whose recipient mask matches, or None."""
    for rule in rules:
        if rule.holds(facts) and match_any(rule.recipients, recipient):
            return rule
    return None


def verdict_for_all(rules: list[ConditionRule], facts: dict[str, bool]) -> Decision | None:
    """The decision for every recipient when it does not depend on the recipient.

    Walks the rules whose condition holds: if they all agree up to and
    including the first one for everyone (``to *``), that one decides. When no
    holding rule is for everyone and none of them denies, everything is allowed
    (``Decision(True, None)``). Otherwise the answer depends on the recipient
    and None is returned.
    """
    verdict: bool | None = None
    for rule in rules:
        if not rule.holds(facts):
            continue
        if verdict is not None and rule.allow is not verdict:
            return None
        verdict = rule.allow
        if rule.for_everyone:
            return Decision(rule.allow, rule)
    # No rule for everyone holds: recipients no rule matches are let through,
    # so the outcome is the same for all only if every holding rule allows.
    return Decision(True, None) if verdict in (None, True) else None
