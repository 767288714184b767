"""SMTP-time DNS checks of one session: the facts ConnectRule, HeloRule and MailfromRule read.

Owns: starting the lookups a session's rules need (reverse name of the client
at connect, DNSBL zones at connect, the HELO name's addresses at HELO, the
sender domain's MX and addresses at MAIL), collecting them as facts
(``in_dnsbl``, ``has_name``, ``has_ip``, ``same_ip``, ``has_mx``) apart for each
rule kind, and deciding at RCPT with the rules of kmg-spec §3.4 (first match wins).

Must never: look anything up that no configured rule or zone needs (no DNS
traffic by default); turn a DNS failure into a rejection: a DNSBL that does
not answer is not a listing, and a name that could not be checked makes a
rule that would deny on it answer 450 (try later), never 5xx; let one kind's
fact stand for another's (a MAIL FROM replaces the sender's facts, never the
HELO name's), or an answer for an earlier HELO or MAIL set a current fact.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Callable, Protocol

from smtpgw.config import Config
from smtpgw.net import smtp
from smtpgw.net.dns import Answer, Resolver
from smtpgw.net.dnsbl import DNSBLChecker
from smtpgw.net.dnswire import AAAA, MX, A
from smtpgw.net.smtp import Reply
from smtpgw.rules import access, routing

RULE_KINDS = ("ConnectRule", "HeloRule", "MailfromRule")


class Lookups(Protocol):
    """What the checks need: the configuration in force and the resolver in use (both are
    replaced at a reload, so they are read at each use)."""

    cfg: Config
    resolver: Resolver


@dataclass
class RelayVerdict:
    allowed: bool
    why: str


def relay_verdict(cfg: Config, ip: str, rcpt: str) -> RelayVerdict:
    """May the client ``ip`` send to ``rcpt`` (kmg-spec §3.4)? The first RelayRule that matches; with
    no RelayRule at all, mail to ProtectedDomains only (never an open relay), from any client, so
    never with sender-specified routing (``rules/access.py``: untrusted routing)."""
    rules = cfg.access.RelayRule
    if rules:
        decision = access.relay_decision(rules, ip, rcpt)
        return RelayVerdict(decision.allowed, decision.reason)
    if smtp.routed(rcpt):
        return RelayVerdict(False, "untrusted routing, not allowed by ProtectedDomains (no RelayRule configured)")
    allowed = routing.is_protected(cfg.network.ProtectedDomains, rcpt)
    return RelayVerdict(allowed, "ProtectedDomains (no RelayRule configured)")


class SessionChecks:
    """The facts of one session, kept per rule kind: HeloRule's ``has_ip`` (the HELO name resolves)
    and MailfromRule's ``has_ip`` (the sender domain resolves) are different facts, and a new HELO
    or MAIL replaces only its own kind's facts."""

    def __init__(self, host: Lookups, client_ip: str) -> None:
        self.host = host
        self.ip = client_ip
        self.facts: dict[str, dict[str, bool]] = {kind: {} for kind in RULE_KINDS}
        self.unknown: dict[str, set[str]] = {}  # per kind, the lookups that failed (made on the first)
        self.generation: dict[str, int] = {}  # per kind, bumped when its facts are replaced (0 before)
        self.pending = 0
        self.waiters: list[Callable[[], None]] = []
        self.client_name: str | None = None
        self.dnsbl_listed: list[str] = []
        self.lookups: list[object] = []
        self.access = host.cfg.access  # the rules as the session began (a reload does not change them)

    def rules(self, kind: str) -> list[access.ConditionRule]:
        return getattr(self.access, kind)

    def _needs(self, kind: str, *facts: str) -> bool:
        return any(r.condition != "any" and access.CONDITIONS[kind][r.condition][0] in facts for r in self.rules(kind))

    def _renew(self, kind: str) -> Callable[[str, bool, bool], None]:
        """Forget ``kind``'s facts; returns the recorder of the facts that replace them."""
        self.facts[kind].clear()
        self.unknown.pop(kind, None)
        self.generation[kind] = self.generation.get(kind, 0) + 1
        return self._recorder(kind)

    def _recorder(self, kind: str) -> Callable[[str, bool, bool], None]:
        generation = self.generation.get(kind, 0)

        def record(fact: str, value: bool, failed: bool) -> None:
            if self.generation.get(kind, 0) != generation:
                return  # the answer for an earlier HELO or MAIL, whose facts were replaced since
            if failed:
                self.unknown.setdefault(kind, set()).add(fact)
            else:
                self.facts[kind][fact] = value

        return record

    # -- starting lookups ---------------------------------------------------------
    def _start(self) -> Callable[[], None]:
        self.pending += 1

        def finished() -> None:
            self.pending -= 1
            if self.pending == 0:
                waiters, self.waiters = self.waiters, []
                for waiter in waiters:
                    waiter()

        return finished

    def connected(self) -> None:
        resolver = self.host.resolver
        zones = self.host.cfg.access.DNSBlackList
        record = self._recorder("ConnectRule")
        if zones:
            finished = self._start()

            def dnsbl_done(listed: list[str], errors: list[str]) -> None:
                # a zone that did not answer lists nobody: a DNS failure never blocks mail
                self.dnsbl_listed = listed
                record("in_dnsbl", bool(listed), False)
                finished()

            self.lookups.append(DNSBLChecker(resolver, zones).check(self.ip, dnsbl_done))
        if self._needs("ConnectRule", "has_name"):
            finished = self._start()

            def ptr_done(answer: Answer) -> None:
                record("has_name", bool(answer.records), answer.error is not None)
                if answer.records:
                    self.client_name = str(answer.records[0])
                finished()

            self.lookups.append(resolver.reverse(self.ip, ptr_done))

    def helo(self, name: str) -> None:
        record = self._renew("HeloRule")
        if not self._needs("HeloRule", "has_ip", "same_ip"):
            return
        literal = name[1:-1].removeprefix("IPv6:") if name.startswith("[") and name.endswith("]") else None
        if literal is not None:
            record("has_ip", _is_ip(literal), False)
            record("same_ip", _same(literal, self.ip), False)
            return
        self._addresses(name, lambda ips, failed: self._helo_facts(record, ips, failed))

    def _helo_facts(self, record: Callable[[str, bool, bool], None], ips: list[str], failed: bool) -> None:
        record("has_ip", bool(ips), failed and not ips)
        same = any(_same(ip, self.ip) for ip in ips)
        # With the A or the AAAA lookup failed, the client's address may be among the addresses
        # not seen: only a match is certain, a mismatch is unknown (450, never 5xx).
        record("same_ip", same, failed and not same)

    def mail(self, sender: str) -> None:
        record = self._renew("MailfromRule")
        domain = sender.rpartition("@")[2]
        if not domain or domain.startswith("["):
            return  # the null sender or an address literal: nothing to look up
        if self._needs("MailfromRule", "has_mx"):
            finished = self._start()

            def mx_done(answer: Answer) -> None:
                record("has_mx", any(host != "." for _, host in answer.records), answer.error is not None)
                finished()

            self.lookups.append(self.host.resolver.query(domain, MX, mx_done))
        if self._needs("MailfromRule", "has_ip"):
            self._addresses(domain, lambda ips, failed: record("has_ip", bool(ips), failed and not ips))

    def _addresses(self, name: str, done: Callable[[list[str], bool], None]) -> None:
        finished = self._start()
        answers: list[Answer] = []

        def one(answer: Answer) -> None:
            answers.append(answer)
            if len(answers) == 2:
                ips = [str(ip) for a in answers for ip in a.records]
                done(ips, any(a.error is not None for a in answers))
                finished()

        for rdtype in (A, AAAA):
            self.lookups.append(self.host.resolver.query(name, rdtype, one))

    # -- deciding ---------------------------------------------------------------------
    def when_ready(self, callback: Callable[[], None]) -> bool:
        """True when every lookup has answered; else ``callback`` runs when they have."""
        if self.pending == 0:
            return True
        self.waiters.append(callback)
        return False

    def decide(self, recipient: str) -> Reply | None:
        """The refusal for this recipient, or None; the first matching rule of each list decides."""
        for kind in RULE_KINDS:
            rules, facts = self.rules(kind), self.facts[kind]
            if not rules:
                continue
            rule = access.first_match(rules, facts, recipient)
            unknown = self.unknown.get(kind)
            if unknown:
                # What if the facts we could not check were the worst ones?
                worst = dict(facts)
                for fact in unknown:
                    worst[fact] = _worst_value(rules, fact)
                pessimistic = access.first_match(rules, worst, recipient)
                if pessimistic is not None and not pessimistic.allow and (rule is None or rule.allow):
                    return smtp.UNVERIFIED.format(pessimistic.condition.replace("_", " "))
            if rule is not None and not rule.allow:
                return smtp.ACCESS_DENIED.format(f"{kind}={rule.text}")
        return None

    def cancel(self) -> None:
        for lookup in self.lookups:
            lookup.cancel()  # type: ignore[attr-defined]
        self.waiters.clear()


def _worst_value(rules: list[access.ConditionRule], fact: str) -> bool:
    """The value of ``fact`` that makes the first deny rule reading it hold."""
    for rule in rules:
        if rule.condition != "any" and not rule.allow:
            name, wanted = access.CONDITIONS[rule.kind][rule.condition]
            if name == fact:
                return wanted
    return True


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _same(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False
