"""Next-hop resolution (RFC 5321 §5.1, RFC 7505) against dnsmasq and the scripted server."""

from __future__ import annotations

from typing import Any

import pytest

from smtpgw.deliver.mx import NextHops, resolve_next_hops
from smtpgw.net.dns import Resolver
from smtpgw.net.dnswire import A
from smtpgw.net.loop import EventLoop
from tests.support.dns import (
    DANGLING_MX_DOMAIN, HOSTS, IMPLICIT_MX_DOMAIN, MISSING_NAME, NULL_MX_DOMAIN, ZONE, ScriptedDNSServer,
)


def next_hops(loop: EventLoop, resolver: Resolver, domain: str, **options: Any) -> NextHops:
    results: list[NextHops] = []
    resolve_next_hops(resolver, domain, results.append, **options)
    assert loop.run_until(lambda: bool(results), 10)
    return results[0]


@pytest.fixture
def resolver(dns_loop: EventLoop, dns_server: Any) -> Resolver:
    return Resolver(dns_loop, [dns_server.address], timeout=3, attempts=1)


def test_mx_ordered_by_preference_equal_ones_shuffled(dns_loop: EventLoop, resolver: Resolver) -> None:
    orders = set()
    for _ in range(40):
        hops = next_hops(dns_loop, resolver, ZONE)
        assert hops.permanent_error is None and hops.temporary_error is None
        assert hops.hosts[:2] == [("mail1.example.test", ip) for ip in HOSTS["mail1.example.test"]]
        orders.add(tuple(host for host, _ in hops.hosts[2:]))
    assert orders == {("mail2.example.test", "mail3.example.test"), ("mail3.example.test", "mail2.example.test")}


def test_address_types_choose_and_order_families(dns_loop: EventLoop, resolver: Resolver) -> None:
    hops = next_hops(dns_loop, resolver, "Example.Test.", address_types=(A,))
    assert [ip for _, ip in hops.hosts][:1] == ["192.0.2.11"] and all(":" not in ip for _, ip in hops.hosts)


def test_implicit_mx(dns_loop: EventLoop, resolver: Resolver) -> None:
    hops = next_hops(dns_loop, resolver, IMPLICIT_MX_DOMAIN)
    assert hops == NextHops([(IMPLICIT_MX_DOMAIN, ip) for ip in HOSTS[IMPLICIT_MX_DOMAIN]])


def test_null_mx_is_permanent(dns_loop: EventLoop, resolver: Resolver) -> None:
    hops = next_hops(dns_loop, resolver, NULL_MX_DOMAIN)
    assert hops.hosts == [] and hops.temporary_error is None
    assert hops.permanent_error is not None and hops.permanent_error.startswith("5.1.10 ")


def test_nxdomain_is_permanent(dns_loop: EventLoop, resolver: Resolver) -> None:
    hops = next_hops(dns_loop, resolver, MISSING_NAME)
    assert hops.permanent_error is not None and hops.permanent_error.startswith("5.1.2 ")
    assert hops.temporary_error is None


def test_mx_host_without_address_is_permanent(dns_loop: EventLoop, resolver: Resolver) -> None:
    hops = next_hops(dns_loop, resolver, DANGLING_MX_DOMAIN)
    assert hops.permanent_error is not None and hops.permanent_error.startswith("5.4.4 ")


@pytest.mark.parametrize("behaviour", ["servfail", "silent"])
def test_dns_failure_is_temporary(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer, behaviour: str) -> None:
    scripted_dns.behave("flaky.test", behaviour)
    resolver = Resolver(dns_loop, [scripted_dns.address], timeout=0.2, attempts=1)
    hops = next_hops(dns_loop, resolver, "flaky.test")
    assert hops.hosts == [] and hops.permanent_error is None
    assert hops.temporary_error is not None and hops.temporary_error.startswith("4.4.3 ")


def test_failing_exchange_does_not_hide_the_others(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.add("mixed.test", "MX", (10, "down.mixed.test")).add("mixed.test", "MX", (20, "up.mixed.test"))
    scripted_dns.behave("down.mixed.test", "servfail").add("up.mixed.test", "A", "192.0.2.30")
    resolver = Resolver(dns_loop, [scripted_dns.address], timeout=1, attempts=1)
    assert next_hops(dns_loop, resolver, "mixed.test", address_types=(A,)) == \
        NextHops([("up.mixed.test", "192.0.2.30")])
    scripted_dns.add("alldown.test", "MX", (10, "down.mixed.test"))
    hops = next_hops(dns_loop, resolver, "alldown.test", address_types=(A,))
    assert hops.temporary_error is not None and "down.mixed.test: servfail" in hops.temporary_error


def test_null_mx_beside_real_mx_is_ignored(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.add("odd.test", "MX", (0, ".")).add("odd.test", "MX", (10, "mx.odd.test"))
    scripted_dns.add("mx.odd.test", "A", "192.0.2.31")
    resolver = Resolver(dns_loop, [scripted_dns.address], attempts=1)
    assert next_hops(dns_loop, resolver, "odd.test", address_types=(A,)).hosts == [("mx.odd.test", "192.0.2.31")]


@pytest.mark.parametrize(("domain", "expected"), [
    ("[192.0.2.40]", NextHops([("[192.0.2.40]", "192.0.2.40")])),
    ("[IPv6:2001:db8::40]", NextHops([("[IPv6:2001:db8::40]", "2001:db8::40")])),
])
def test_address_literals(dns_loop: EventLoop, resolver: Resolver, domain: str, expected: NextHops) -> None:
    assert next_hops(dns_loop, resolver, domain) == expected


@pytest.mark.parametrize("domain", ["[192.0.2.300]", "[2001:db8::1]", "[IPv6:192.0.2.1]", "", "a..b"])
def test_bad_destinations_are_permanent(dns_loop: EventLoop, resolver: Resolver, domain: str) -> None:
    hops = next_hops(dns_loop, resolver, domain)
    assert hops.hosts == [] and hops.permanent_error is not None and hops.permanent_error.startswith("5.1.2 ")
