"""The stub resolver against real DNS servers on loopback: dnsmasq and the scripted server."""

from __future__ import annotations

import random
import socket
import struct
import types
from functools import partial
from typing import Any

import pytest

from smtpgw.net import dns
from smtpgw.net.dns import Resolver
from smtpgw.net.dnswire import AAAA, MX, NXDOMAIN, PTR, SERVFAIL, TXT, A
from smtpgw.net.loop import EventLoop
from tests.support.dns import (
    CNAMES, HOSTS, MISSING_NAME, MX_RECORDS, PTR_RECORDS, TTL, TXT_RECORDS, ZONE, ScriptedDNSServer, ask,
)

FAST = 0.3  # per-try timeout against servers that are meant to stay silent


def resolver(loop: EventLoop, *servers: Any, **options: Any) -> Resolver:
    options.setdefault("timeout", 3.0)
    options.setdefault("attempts", 1)
    return Resolver(loop, list(servers), **options)


class ShiftedClockLoop(EventLoop):
    """An event loop whose clock can be moved forward, to expire TTLs without waiting."""

    def __init__(self) -> None:
        self.shift = 0.0
        super().__init__()

    def time(self) -> float:  # type: ignore[override]
        return super().time() + self.shift


# region Record types against dnsmasq
def test_a_and_aaaa(dns_loop: EventLoop, dns_server: Any) -> None:
    r = resolver(dns_loop, dns_server.address)
    name, addresses = "mail1.example.test", HOSTS["mail1.example.test"]
    a = ask(dns_loop, r, name, A)
    aaaa = ask(dns_loop, r, name, "AAAA")
    assert (a.records, a.error, a.ttl) == ([addresses[0]], None, TTL)
    assert (aaaa.rdtype, aaaa.records) == (AAAA, [addresses[1]])


def test_mx_txt_ptr(dns_loop: EventLoop, dns_server: Any) -> None:
    r = resolver(dns_loop, dns_server.address)
    mx = ask(dns_loop, r, ZONE + ".", MX)
    expected = sorted((pref, host) for domain, host, pref in MX_RECORDS if domain == ZONE)
    assert (mx.name, sorted(mx.records)) == (ZONE, expected)
    assert ask(dns_loop, r, ZONE, TXT).records == [TXT_RECORDS[0][1]]
    ip, host = PTR_RECORDS[0]
    answers: list[dns.Answer] = []
    r.reverse(ip, answers.append)
    assert dns_loop.run_until(lambda: bool(answers), 10)
    assert (answers[0].name, answers[0].rdtype, answers[0].records) == (dns.reverse_name(ip), PTR, [host])


def test_reverse_ipv6(dns_loop: EventLoop, dns_server: Any) -> None:
    r = resolver(dns_loop, dns_server.address)
    answers: list[dns.Answer] = []
    r.reverse("2001:db8::11", answers.append)
    assert dns_loop.run_until(lambda: bool(answers), 10)
    assert answers[0].name.endswith(".8.b.d.0.1.0.0.2.ip6.arpa")
    assert answers[0].records == ["mail1.example.test"]


def test_cname_in_answer_is_followed(dns_loop: EventLoop, dns_server: Any) -> None:
    alias, target = CNAMES[0]
    answer = ask(dns_loop, resolver(dns_loop, dns_server.address), alias, A)
    assert (answer.name, answer.records) == (alias, [HOSTS[target][0]])


def test_nxdomain_and_nodata_are_answers_not_errors(dns_loop: EventLoop, dns_server: Any) -> None:
    r = resolver(dns_loop, dns_server.address)
    missing = ask(dns_loop, r, MISSING_NAME, A)
    nodata = ask(dns_loop, r, "mail2.example.test", AAAA)
    assert (missing.rcode, missing.error, missing.nxdomain, missing.nodata) == (NXDOMAIN, None, True, False)
    assert (nodata.records, nodata.error, nodata.nxdomain, nodata.nodata) == ([], None, False, True)


def test_refused_is_an_error(dns_loop: EventLoop, dns_server: Any) -> None:
    answer = ask(dns_loop, resolver(dns_loop, dns_server.address), "outside.invalid", A)
    assert (answer.error, answer.rcode) == ("refused", dns.REFUSED)
# endregion


# region Caching
def test_positive_cache_answers_without_traffic(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.add("www.cache.test", "A", "192.0.2.1", ttl=120)
    r = resolver(dns_loop, scripted_dns.address)
    first = ask(dns_loop, r, "www.cache.test", A)
    second = ask(dns_loop, r, "WWW.Cache.Test.", A)
    assert first.records == second.records == ["192.0.2.1"]
    assert 0 < second.ttl <= 120
    assert scripted_dns.count() == 1


def test_ttl_zero_is_not_cached(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.add("zero.cache.test", "A", "192.0.2.2", ttl=0)
    r = resolver(dns_loop, scripted_dns.address)
    ask(dns_loop, r, "zero.cache.test", A)
    ask(dns_loop, r, "zero.cache.test", A)
    assert scripted_dns.count() == 2


def test_negative_cache_nxdomain_and_nodata(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.add("v4only.cache.test", "A", "192.0.2.3")
    r = resolver(dns_loop, scripted_dns.address, negative_ttl=600)
    for _ in range(2):
        missing = ask(dns_loop, r, "missing.cache.test", A)
        nodata = ask(dns_loop, r, "v4only.cache.test", AAAA)
    assert missing.nxdomain and nodata.nodata and 0 < missing.ttl <= 600
    assert scripted_dns.count() == 2


def test_negative_ttl_capped_by_soa_minimum(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.soa("soa.test", 30)  # RFC 2308 §5
    answer = ask(dns_loop, resolver(dns_loop, scripted_dns.address, negative_ttl=600), "gone.soa.test", A)
    assert answer.nxdomain and answer.ttl == 30


def test_unresolved_ttl_zero_disables_negative_cache(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    r = resolver(dns_loop, scripted_dns.address, negative_ttl=0)
    ask(dns_loop, r, "missing.cache.test", A)
    ask(dns_loop, r, "missing.cache.test", A)
    assert scripted_dns.count() == 2


def test_concurrent_queries_share_one_exchange(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.add("shared.cache.test", "A", "192.0.2.4")
    r = resolver(dns_loop, scripted_dns.address)
    answers: list[dns.Answer] = []
    for _ in range(5):
        r.query("shared.cache.test", A, answers.append)
    assert dns_loop.run_until(lambda: len(answers) == 5, 10)
    assert {tuple(a.records) for a in answers} == {("192.0.2.4",)}
    assert scripted_dns.count() == 1


def test_expiry_and_periodic_purge(scripted_dns: ScriptedDNSServer) -> None:
    loop = ShiftedClockLoop()
    scripted_dns.add("host.purge.test", "A", "192.0.2.5", ttl=300).add("purge.test", "MX", (10, "host.purge.test"))
    r = resolver(loop, scripted_dns.address, negative_ttl=600,
                 mx_refresh=1000, unresolved_refresh=2000, ip_refresh=3000)
    ask(loop, r, "host.purge.test", A)
    ask(loop, r, "purge.test", MX)
    ask(loop, r, "missing.purge.test", A)
    assert r.cache_len() == 3
    loop.shift = 700  # everything expired: ignored at once, though not purged yet
    ask(loop, r, "host.purge.test", A)
    assert scripted_dns.count("host.purge.test") == 2 and r.cache_len() == 3
    loop.shift = 1500  # the MX purge ran; the fresh A entry is kept
    assert loop.run_until(lambda: r.cache_len() == 2, 5)
    loop.shift = 2500
    assert loop.run_until(lambda: r.cache_len() == 1, 5)
    loop.shift = 3500  # the address entry refreshed at 700 has expired by now
    assert loop.run_until(lambda: r.cache_len() == 0, 5)
    r.close()
    loop.close()


def test_cache_size_is_bounded(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    r = resolver(dns_loop, scripted_dns.address, cache_size=2)
    for n in range(4):
        scripted_dns.add(f"h{n}.bound.test", "A", f"192.0.2.{n + 10}")
        ask(dns_loop, r, f"h{n}.bound.test", A)
    assert r.cache_len() == 2
    ask(dns_loop, r, "h3.bound.test", A)  # the newest entries are the ones kept
    assert scripted_dns.count("h3.bound.test") == 1
# endregion


# region Failures, retries, transports
def test_timeout_then_second_nameserver(dns_loop: EventLoop, silent_nameserver: Any,
                                        scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.add("retry.test", "A", "192.0.2.6")
    r = resolver(dns_loop, silent_nameserver, scripted_dns.address, timeout=FAST)
    answer = ask(dns_loop, r, "retry.test", A)
    assert (answer.records, answer.error) == (["192.0.2.6"], None)
    assert r.stats["timeouts"] == 1 and scripted_dns.count() == 1


def test_closed_port_fails_over_at_once(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()
    scripted_dns.add("failover.test", "A", "192.0.2.23")
    r = resolver(dns_loop, closed, scripted_dns.address, timeout=30)
    assert ask(dns_loop, r, "failover.test", A).records == ["192.0.2.23"]
    assert r.stats["timeouts"] == 0  # the ICMP port unreachable ended the first try


def test_silence_is_a_timeout_after_every_attempt(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.behave("quiet.test", "silent")
    answer = ask(dns_loop, resolver(dns_loop, scripted_dns.address, timeout=FAST, attempts=3), "quiet.test", A)
    assert (answer.error, answer.records, answer.nxdomain) == ("timeout", [], False)
    assert scripted_dns.count("quiet.test") == 3


def test_servfail_is_an_error_and_tried_again(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.behave("broken.test", "servfail")
    r = resolver(dns_loop, scripted_dns.address, attempts=2)
    answer = ask(dns_loop, r, "broken.test", MX)
    assert (answer.error, answer.rcode) == ("servfail", SERVFAIL)
    assert scripted_dns.count("broken.test") == 2
    ask(dns_loop, r, "broken.test", MX)  # failures are not cached
    assert scripted_dns.count("broken.test") == 4


def test_referral_is_a_failure_not_nodata(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    # RFC 2308 §2.2.1: NS records and no SOA in the authority section make a referral from a
    # server that did not recurse; taken for NODATA it would make the domain "have no MX".
    scripted_dns.behave("lame.test", "referral")
    r = resolver(dns_loop, scripted_dns.address, negative_ttl=600)
    answer = ask(dns_loop, r, "lame.test", MX)
    assert (answer.error, answer.nodata, answer.nxdomain) == ("referral", False, False)
    ask(dns_loop, r, "lame.test", MX)  # a failure is not cached
    assert scripted_dns.count("lame.test") == 2
    with ScriptedDNSServer() as good:
        good.add("lame.test", "MX", (10, "mx.lame.test"))
        r = resolver(dns_loop, scripted_dns.address, good.address)
        assert ask(dns_loop, r, "lame.test", MX).records == [(10, "mx.lame.test")]


def test_truncated_answer_is_asked_again_over_tcp(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.behave("big.test", "truncate").add("big.test", "A", "192.0.2.7")
    answer = ask(dns_loop, resolver(dns_loop, scripted_dns.address), "big.test", A)
    assert answer.records == ["192.0.2.7"]
    assert (scripted_dns.count(transport="udp"), scripted_dns.count(transport="tcp")) == (1, 1)


def test_answer_larger_than_udp_payload_comes_over_tcp(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    texts = [f"{n:02d}" + "x" * 400 for n in range(8)]  # 3.2 KB: beyond the 1232-octet EDNS payload
    for text in texts:
        scripted_dns.add("long.test", "TXT", text)
    answer = ask(dns_loop, resolver(dns_loop, scripted_dns.address), "long.test", TXT)
    assert sorted(answer.records) == texts
    assert scripted_dns.count(transport="tcp") == 1


@pytest.mark.parametrize("forgery", ["wrong-id", "wrong-question", "wrong-source"])
def test_spoofed_reply_is_ignored(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer, forgery: str) -> None:
    scripted_dns.behave("bank.test", forgery).add("bank.test", "A", "192.0.2.8")
    r = resolver(dns_loop, scripted_dns.address)
    answer = ask(dns_loop, r, "bank.test", A)
    assert answer.records == ["192.0.2.8"]
    assert ScriptedDNSServer.POISON not in answer.records
    if forgery != "wrong-source":  # a connected socket never even sees the other port's datagram
        assert r.stats["mismatched"] == 1


@pytest.mark.parametrize("loop_kind", ["pointer-loop", "pointer-self"])
def test_compression_loop_is_an_error_not_a_hang(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer,
                                                 loop_kind: str) -> None:
    scripted_dns.behave("evil.test", loop_kind)
    answer = ask(dns_loop, resolver(dns_loop, scripted_dns.address, timeout=30), "evil.test", A)
    assert (answer.error, answer.records) == ("malformed", [])


def test_server_without_edns_is_asked_again_without_opt(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.behave("old.test", "formerr-edns").add("old.test", "A", "192.0.2.9")
    r = resolver(dns_loop, scripted_dns.address)
    assert ask(dns_loop, r, "old.test", A).records == ["192.0.2.9"]
    assert scripted_dns.count("old.test") == 2
    scripted_dns.add("old.test", "MX", (5, "old.test"))
    assert ask(dns_loop, r, "old.test", MX).records == [(5, "old.test")]
    assert scripted_dns.count("old.test") == 3  # the server is remembered as pre-EDNS


def test_unanswered_cname_target_is_asked_for(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.add("www.alias.test", "CNAME", "real.alias.test", ttl=60).add("real.alias.test", "A", "192.0.2.20")
    r = resolver(dns_loop, scripted_dns.address)
    answer = ask(dns_loop, r, "www.alias.test", A)
    assert (answer.name, answer.records, answer.ttl) == ("www.alias.test", ["192.0.2.20"], 60)
    ask(dns_loop, r, "www.alias.test", A)
    assert scripted_dns.count() == 2


def test_cname_loop_is_an_error(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.add("a.loop.test", "CNAME", "b.loop.test").add("b.loop.test", "CNAME", "a.loop.test")
    answer = ask(dns_loop, resolver(dns_loop, scripted_dns.address), "a.loop.test", A)
    assert answer.error == "cname-chain"
    assert scripted_dns.count() <= dns.MAX_CNAME_CHAIN + 1


def test_cname_to_a_name_no_query_can_carry_is_an_error(dns_loop: EventLoop,
                                                        scripted_dns: ScriptedDNSServer) -> None:
    # A label may hold any octet (RFC 2181 §11): the space comes back as "\\032" (RFC 1035 §5.1),
    # a name no query can be built for. The lookup must fail, not raise out of the loop.
    scripted_dns.add("www.odd.test", "CNAME", "sp ace.odd.test").add("next.odd.test", "A", "192.0.2.24")
    r = resolver(dns_loop, scripted_dns.address, max_in_flight=1)
    answer = ask(dns_loop, r, "www.odd.test", A, timeout=5)
    assert (answer.error, answer.records) == ("cname-chain", [])
    # the one slot for a query in flight was given back
    assert ask(dns_loop, r, "next.odd.test", A, timeout=5).records == ["192.0.2.24"]


def test_ids_and_source_ports_are_random(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    r = resolver(dns_loop, scripted_dns.address)
    for n in range(20):
        ask(dns_loop, r, f"n{n}.random.test", A)
    ids = {qid for qid, _ in scripted_dns.sources}
    ports = {port for _, port in scripted_dns.sources}
    assert len(ids) >= 18 and len(ports) >= 18


def test_in_flight_limit_and_overload(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.behave("q1.test", "silent").add("q2.test", "A", "192.0.2.21")
    r = resolver(dns_loop, scripted_dns.address, timeout=FAST, max_in_flight=1, max_pending=1)
    answers: dict[str, dns.Answer] = {}
    for name in ("q1.test", "q2.test", "q3.test"):
        r.query(name, A, partial(answers.__setitem__, name))
    assert dns_loop.run_until(lambda: len(answers) == 3, 10)
    assert answers["q3.test"].error == "overloaded"
    assert answers["q1.test"].error == "timeout" and answers["q2.test"].records == ["192.0.2.21"]


def test_close_answers_pending_queries(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.behave("hang.test", "silent")
    r = resolver(dns_loop, scripted_dns.address, timeout=30)
    answers: list[dns.Answer] = []
    r.query("hang.test", A, answers.append)
    assert scripted_dns.wait_for_queries(1)
    r.close()
    assert dns_loop.run_until(lambda: bool(answers), 5)
    assert answers[0].error == "closed"
    assert ask(dns_loop, r, "other.test", A).error == "closed"


def test_cancelled_query_is_not_called_back(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer) -> None:
    scripted_dns.add("c.test", "A", "192.0.2.22")
    r = resolver(dns_loop, scripted_dns.address)
    called: list[dns.Answer] = []
    r.query("c.test", A, called.append).cancel()
    assert ask(dns_loop, r, "c.test", A).records == ["192.0.2.22"]
    assert called == []


@pytest.mark.parametrize("name", ["a..b", "x" * 64 + ".test", ("a" * 60 + ".") * 5, "sp ace.test", "back\\slash"])
def test_bad_names_fail_without_traffic(dns_loop: EventLoop, scripted_dns: ScriptedDNSServer, name: str) -> None:
    answer = ask(dns_loop, resolver(dns_loop, scripted_dns.address), name, A)
    assert answer.error == "bad-name" and scripted_dns.count() == 0
# endregion


# region Configuration
def test_from_config_and_resolv_conf(dns_loop: EventLoop, tmp_path: Any, dns_server: Any) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(f"# comment\nsearch example.test\nnameserver {dns_server.address[0]}\n"
                    "nameserver 2001:db8::53\nnameserver bogus\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n")
    assert dns.parse_resolv_conf(str(conf)) == [("127.0.0.1", 53), ("2001:db8::53", 53), ("192.0.2.53", 53)]
    assert dns.parse_resolv_conf(str(tmp_path / "absent")) == [("127.0.0.1", 53)]
    section = types.SimpleNamespace(Nameserver=[dns_server.address], IONetworkTimeout=2, DNSAttempts=3,
                                    UnresolvedTTL=0, MXCacheRefreshPeriod=60,
                                    UnresolvedCacheRefreshPeriod=120, IPCacheRefreshPeriod=None, DNSCacheSize=7)
    r = Resolver.from_config(dns_loop, section)
    assert (r.nameservers, r.timeout, r.attempts, r.negative_ttl, r.cache_size) == ([dns_server.address], 2.0, 3, 0, 7)
    assert ask(dns_loop, r, "mail2.example.test", A).records == list(HOSTS["mail2.example.test"])
    empty = types.SimpleNamespace(Nameserver=[])
    assert Resolver.from_config(dns_loop, empty, resolv_conf=str(conf)).nameservers[0] == ("127.0.0.1", 53)


def test_nameserver_spellings() -> None:
    assert dns.parse_nameserver("192.0.2.1") == ("192.0.2.1", 53)
    assert dns.parse_nameserver("192.0.2.1:5353") == ("192.0.2.1", 5353)
    assert dns.parse_nameserver("[2001:db8::1]:5353") == ("2001:db8::1", 5353)
    assert dns.parse_nameserver(("::1", 53)) == ("::1", 53)
    for bad in ("ns.example.test", "192.0.2.1:0", "[::1]:70000"):
        with pytest.raises(ValueError):
            dns.parse_nameserver(bad)
# endregion


# region Wire format
_OWNER = 12 + len(dns.encode_name("x.test")) + 4  # where the answer's owner name starts
_TO_SELF = struct.pack("!H", 0xC000 | _OWNER)


def _reply_with(owner: bytes) -> bytes:
    question = dns.encode_name("x.test") + struct.pack("!HH", A, 1)
    record = owner + struct.pack("!HHIH", A, 1, 60, 4) + bytes([192, 0, 2, 1])
    return struct.pack("!HHHHHH", 1, 0x8180, 1, 1, 0, 0) + question + record


def test_read_name_compression() -> None:
    msg = _reply_with(b"\x03www\xc0\x0c")
    assert dns.parse_message(msg).answers[0].name == "www.x.test"


@pytest.mark.parametrize("owner", [
    _TO_SELF,  # points at itself
    b"\x03www" + _TO_SELF,  # a label, then back to its own start
    struct.pack("!H", 0xC000 | (_OWNER + 2)),  # forward
    b"\xc0",  # cut in half
    b"\x40abc\x00",  # extended label type (RFC 6891 §5)
    b"\x3f" + b"a" * 63 + b"\x3f" + b"b" * 63 + b"\x3f" + b"c" * 63 + b"\x3f" + b"d" * 63 + b"\x00",  # 257 octets
])
def test_read_name_rejects_hostile_names(owner: bytes) -> None:
    with pytest.raises(dns.DNSFormatError):
        dns.parse_message(_reply_with(owner))


def test_parser_never_raises_anything_else_on_garbage() -> None:
    rng = random.Random(5782)
    base = _reply_with(b"\x03www\xc0\x0c") + struct.pack("!HHIH", MX, 1, 1, 0)
    for _ in range(3000):
        msg = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            msg[rng.randrange(len(msg))] = rng.randrange(256)
        msg = msg[: rng.randint(0, len(msg))]
        try:
            dns.parse_message(bytes(msg))
        except dns.DNSFormatError:
            pass


def test_query_encoding() -> None:
    query = dns.build_query(0xBEEF, "mail.example.test", MX, edns=True)
    qid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", query)
    assert (qid, flags, qd, an, ns, ar) == (0xBEEF, 0x0100, 1, 0, 0, 1)
    assert dns.read_name(query, 12) == ("mail.example.test", 12 + 19)
    assert query.endswith(b"\x00\x00\x29\x04\xd0" + b"\x00" * 6)


def test_names_and_reverse_names() -> None:
    assert dns.normalise_name("Mail.Example.TEST.") == "mail.example.test"
    assert dns.normalise_name("bücher.example") == "xn--bcher-kva.example"
    assert dns.reverse_name("192.0.2.1") == "1.2.0.192.in-addr.arpa"
    assert dns.reverse_name("::ffff:192.0.2.1") == "1.2.0.192.in-addr.arpa"
    assert dns.reverse_name("2001:db8::1") == "1." + "0." * 23 + "8.b.d.0.1.0.0.2.ip6.arpa"
    with pytest.raises(ValueError):
        dns.reverse_name("not-an-ip")
# endregion
