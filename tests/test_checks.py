"""The session's DNS facts (checks.py) against the scripted DNS server on loopback."""

from __future__ import annotations

import types
from typing import Any, cast

import pytest

from smtpgw.net import smtp
from smtpgw.net.dns import Resolver
from smtpgw.net.loop import EventLoop
from smtpgw.receive.checks import SessionChecks
from smtpgw.rules.access import parse_condition_rule
from tests.support.dns import ScriptedDNSServer


def session(loop: EventLoop, server: ScriptedDNSServer, client_ip: str, **rules: list[str]) -> SessionChecks:
    access = types.SimpleNamespace(DNSBlackList=[], ConnectRule=[], HeloRule=[], MailfromRule=[])
    for kind, lines in rules.items():
        setattr(access, kind, [parse_condition_rule(kind, line, f"smtpgw.conf:{n}", ".")
                               for n, line in enumerate(lines, 1)])
    resolver = Resolver(loop, [server.address], timeout=3, attempts=1)
    gateway = types.SimpleNamespace(resolver=resolver, cfg=types.SimpleNamespace(access=access))
    return SessionChecks(cast(Any, gateway), client_ip)  # the two attributes SessionChecks reads


def settled(loop: EventLoop, checks: SessionChecks) -> SessionChecks:
    done: list[bool] = []
    if checks.when_ready(lambda: done.append(True)):
        done.append(True)
    assert loop.run_until(lambda: bool(done), 10)
    return checks


@pytest.mark.parametrize(("client", "found", "failing"), [
    ("192.0.2.5", ("AAAA", "2001:db8::9"), "A"),
    ("2001:db8::5", ("A", "192.0.2.9"), "AAAA"),
])
def test_helo_address_lookup_failing_in_the_client_family_is_not_diff_ip(
        dns_loop: EventLoop, scripted_dns: ScriptedDNSServer, client: str, found: tuple[str, str],
        failing: str) -> None:
    # The HELO name's addresses of the client's family could not be looked up: whether they hold
    # the client's address is unknown, so a rule denying on diff_ip answers 450, never 554.
    scripted_dns.add("helo.partial.test", found[0], found[1]).behave("helo.partial.test", "servfail", failing)
    checks = session(dns_loop, scripted_dns, client, HeloRule=["deny from diff_ip to *"])
    checks.helo("helo.partial.test")
    settled(dns_loop, checks)
    assert checks.facts["HeloRule"].get("has_ip") is True
    assert checks.decide("u@x.test") == smtp.UNVERIFIED.format("diff ip")


def test_helo_address_lookup_in_the_other_family_failing_keeps_a_match(
        dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.add("helo.match.test", "A", "192.0.2.5").behave("helo.match.test", "servfail", "AAAA")
    checks = session(dns_loop, scripted_dns, "192.0.2.5", HeloRule=["deny from diff_ip to *"])
    checks.helo("helo.match.test")
    settled(dns_loop, checks)
    assert checks.facts["HeloRule"] == {"has_ip": True, "same_ip": True} and checks.decide("u@x.test") is None


def test_mail_from_keeps_the_helo_facts_apart(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    # HeloRule's has_ip (the HELO name resolves) and MailfromRule's has_ip (the sender domain
    # resolves) are two facts: MAIL FROM neither erases nor overwrites the HELO name's.
    scripted_dns.add("sender.test", "A", "192.0.2.7")
    checks = session(dns_loop, scripted_dns, "192.0.2.5", HeloRule=["deny from no_ip to *"],
                     MailfromRule=["deny from no_ip to *"])
    checks.helo("nonexistent.test")
    checks.mail("a@sender.test")
    settled(dns_loop, checks)
    assert checks.facts == {"ConnectRule": {}, "HeloRule": {"has_ip": False, "same_ip": False}, "MailfromRule": {"has_ip": True}}
    assert checks.decide("u@x.test") == smtp.ACCESS_DENIED.format("HeloRule=deny from no_ip to *")
    checks.helo("sender.test")
    settled(dns_loop, checks)
    assert checks.decide("u@x.test") is None


def test_answers_for_an_earlier_helo_are_dropped(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.add("first.test", "A", "192.0.2.5").behave("first.test", "truncate")  # TCP: answers last
    checks = session(dns_loop, scripted_dns, "192.0.2.5", HeloRule=["deny from no_ip to *"])
    checks.helo("first.test")
    checks.helo("second.test")  # before the first name's answers came: they must not count
    settled(dns_loop, checks)
    assert checks.facts["HeloRule"] == {"has_ip": False, "same_ip": False}
