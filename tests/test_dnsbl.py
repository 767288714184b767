"""DNSBL checks against dnsmasq serving two test lists, and against a silent list."""

from __future__ import annotations

from typing import Any

import pytest

from smtpgw.net.dns import Resolver
from smtpgw.net.dnsbl import DNSBLChecker, is_listing
from smtpgw.net.dnswire import reverse_labels
from smtpgw.net.loop import EventLoop
from tests.support.dns import DNSBL_ZONES, ScriptedDNSServer


def run_check(loop: EventLoop, checker: DNSBLChecker, ip: str) -> tuple[list[str], list[str]]:
    results: list[tuple[list[str], list[str]]] = []
    checker.check(ip, lambda listed, errors: results.append((listed, errors)))
    assert loop.run_until(lambda: bool(results), 10)
    loop.run_once(max_wait=0)  # a second callback would be due by now
    assert len(results) == 1
    return results[0]


@pytest.fixture
def checker(dns_loop: EventLoop, dns_server: Any) -> DNSBLChecker:
    return DNSBLChecker(Resolver(dns_loop, [dns_server.address], timeout=3, attempts=1), DNSBL_ZONES)


@pytest.mark.parametrize("ip", ["192.0.2.66", "127.0.0.2", "::ffff:192.0.2.66"])
def test_listed_in_both_zones(dns_loop: EventLoop, checker: DNSBLChecker, ip: str) -> None:
    assert run_check(dns_loop, checker, ip) == (list(DNSBL_ZONES), [])


def test_ipv6_nibble_query_listed(dns_loop: EventLoop, checker: DNSBLChecker) -> None:
    assert run_check(dns_loop, checker, "2001:db8::66") == (["dnsbl.test"], [])


def test_not_listed(dns_loop: EventLoop, checker: DNSBLChecker) -> None:
    assert run_check(dns_loop, checker, "192.0.2.99") == ([], [])


def test_operator_error_code_is_not_a_listing(dns_loop: EventLoop, checker: DNSBLChecker) -> None:
    listed, errors = run_check(dns_loop, checker, "192.0.2.67")
    assert listed == [] and errors == ["dnsbl.test: query refused by the list (127.255.255.254)"]


def test_answer_outside_loopback_is_ignored(dns_loop: EventLoop, checker: DNSBLChecker) -> None:
    assert run_check(dns_loop, checker, "192.0.2.68") == ([], [])


def test_bad_address(dns_loop: EventLoop, checker: DNSBLChecker) -> None:
    listed, errors = run_check(dns_loop, checker, "999.1.2.3")
    assert listed == [] and len(errors) == len(DNSBL_ZONES) and "not an IP address" in errors[0]


def test_no_zones(dns_loop: EventLoop, dns_server: Any) -> None:
    checker = DNSBLChecker(Resolver(dns_loop, [dns_server.address]), [" ", ""])
    assert run_check(dns_loop, checker, "192.0.2.66") == ([], [])


def test_timeout_never_lists(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    silent_zone = "silent.bl.test"
    scripted_dns.behave(f"{reverse_labels('192.0.2.66')}.{silent_zone}", "silent")
    resolver = Resolver(dns_loop, [scripted_dns.address], timeout=0.2, attempts=1)
    checker = DNSBLChecker(resolver, [silent_zone])
    assert run_check(dns_loop, checker, "192.0.2.66") == ([], [f"{silent_zone}: timeout"])


def test_overall_deadline_reports_pending_zones(dns_loop: EventLoop,
                                                scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.behave(f"{reverse_labels('192.0.2.66')}.slow.bl.test", "silent")
    scripted_dns.add(f"{reverse_labels('192.0.2.66')}.fast.bl.test", "A", "127.0.0.2")
    resolver = Resolver(dns_loop, [scripted_dns.address], timeout=30, attempts=1)
    checker = DNSBLChecker(resolver, ["slow.bl.test", "fast.bl.test."], timeout=0.2)
    assert run_check(dns_loop, checker, "192.0.2.66") == (["fast.bl.test"], ["slow.bl.test: timeout"])
    resolver.close()


def test_servfail_is_an_error(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.behave(f"{reverse_labels('192.0.2.66')}.broken.bl.test", "servfail")
    checker = DNSBLChecker(Resolver(dns_loop, [scripted_dns.address], attempts=1), ["broken.bl.test"])
    assert run_check(dns_loop, checker, "192.0.2.66") == ([], ["broken.bl.test: servfail"])


def test_cancel(dns_loop: EventLoop, checker: DNSBLChecker) -> None:
    called: list[Any] = []
    checker.check("192.0.2.66", lambda *result: called.append(result)).cancel()
    assert run_check(dns_loop, checker, "192.0.2.66")[0] == list(DNSBL_ZONES)
    assert called == []


def test_rfc5782_query_names_and_listing_rule() -> None:
    # RFC 5782 §2.1 and §2.4 examples.
    assert reverse_labels("192.168.1.234") == "234.1.168.192"
    assert reverse_labels("2001:db8:1:2:3:4:567:89ab") == \
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2"
    assert is_listing("127.0.0.2") and is_listing("127.1.2.3")
    assert not any(is_listing(ip) for ip in ("127.255.255.252", "127.255.255.255", "10.0.0.2", "::1", "x"))
