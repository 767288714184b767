"""DKIM verification (smtpgw.mail.dkim) and the key lookups before a scan (smtpgw.scan.dkimkeys).

Keys are made by the openssl command line and published through dnsmasq on loopback; the
signatures come from tests/support/dkimsign.py, a signer written from RFC 6376 apart from the
verifier.
"""

from __future__ import annotations

import base64
import os
import random
from collections.abc import Iterator
from typing import Any

import pytest

from smtpgw.mail import dkim
from smtpgw.scan.dkimkeys import FailedKeys, fetch_keys
from smtpgw.net.dns import Resolver
from smtpgw.net.loop import EventLoop
from smtpgw.spam import mailview
from smtpgw.spam.signs import detail, run_check
from tests.support import fuzz
from tests.support.components import require
from tests.support.dkimsign import DKIMKey, make_key, sign, txt_record_args
from tests.support.dns import DnsmasqServer, start_dnsmasq

MESSAGE = (b"From: PayPal <service@paypal.com>\r\nTo: bob@example.test\r\nSubject: Your receipt  from\r\n"
           b"\t PayPal\r\nDate: Mon, 7 Dec 2026 10:00:00 +0000\r\nMessage-ID: <r1@paypal.com>\r\n\r\n"
           b"Hello Bob,\r\n\r\nyou sent $12.00 USD to Example Shop.  \r\n\r\nPayPal\r\n\r\n\r\n")
DOMAIN = "paypal.com"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DKIMKey]:
    require("openssl")
    folder = str(tmp_path_factory.mktemp("dkim-keys"))
    return {"rsa": make_key(folder, "rsa"), "small": make_key(folder, "small", bits=512),
            "ed": make_key(folder, "ed", kind="ed25519")}


def published(keys: dict[str, DKIMKey]) -> dict[str, str]:
    return {f"s1._domainkey.{DOMAIN}": keys["rsa"].record(), f"weak._domainkey.{DOMAIN}": keys["small"].record(),
            f"ed._domainkey.{DOMAIN}": keys["ed"].record(), f"gone._domainkey.{DOMAIN}": "v=DKIM1; k=rsa; p=",
            f"strict._domainkey.{DOMAIN}": keys["rsa"].record("t=s; ")}


@pytest.fixture(scope="module")
def key_dns(keys: dict[str, DKIMKey], tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsmasqServer]:
    """dnsmasq on loopback answering for paypal.com: the keys above, NXDOMAIN for any other name."""
    require("dnsmasq", "dnsmasq")
    server = start_dnsmasq(str(tmp_path_factory.mktemp("dkim-dns")),
                           (f"--local=/{DOMAIN}/", *txt_record_args(published(keys))))
    yield server
    server.stop()


def lookup(address: tuple[str, int], raw: bytes, timeout: float = 5.0) -> dict[str, Any]:
    """The keys of ``raw``'s signatures as the gateway fetches them (smtpgw.scan.dkimkeys)."""
    loop = EventLoop()
    return fetch_on(Resolver(loop, [address], timeout=timeout / 2, attempts=1), loop, raw, timeout)


def fetch_on(resolver: Resolver, loop: EventLoop, raw: bytes, timeout: float) -> dict[str, Any]:
    """The keys of ``raw`` fetched through ``resolver`` with the deadline ``timeout``; closes both."""
    try:
        return fetch_again(resolver, loop, raw, timeout)
    finally:
        resolver.close()
        loop.close()


def fetch_again(resolver: Resolver, loop: EventLoop, raw: bytes, timeout: float,
                failed: FailedKeys | None = None) -> dict[str, Any]:
    """The keys of ``raw`` fetched through ``resolver`` (and ``failed``), which stay open."""
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dkim-fetch-{os.getpid()}.eml")
    with open(path, "wb") as f:
        f.write(raw)
    answers: list[dict[str, Any]] = []
    try:
        assert fetch_keys(loop, resolver, path, timeout, answers.append, failed) is not None
        assert loop.run_until(lambda: bool(answers), timeout + 10)
    finally:
        os.unlink(path)
    return answers[0]


def verify_through_dns(server: DnsmasqServer, raw: bytes) -> list[dkim.Result]:
    return dkim.verify(raw, lookup(server.address, raw))


# -- canonicalisation: RFC 6376 §3.4.5 ------------------------------------------------------

EXAMPLE_HEADER = [("a", b"A: X"), ("b", b"B : Y\t\r\n\tZ  ")]
EXAMPLE_BODY = b" C \r\nD \t E\r\n\r\n\r\n"


def test_relaxed_canonicalisation_of_the_rfc_example() -> None:
    assert b"".join(dkim.canonical_header(n, f, "relaxed") for n, f in EXAMPLE_HEADER) == b"a:X\r\nb:Y Z\r\n"
    assert dkim.canonical_body(EXAMPLE_BODY, "relaxed") == b" C\r\nD E\r\n"


def test_simple_canonicalisation_of_the_rfc_example() -> None:
    assert (b"".join(dkim.canonical_header(n, f, "simple") for n, f in EXAMPLE_HEADER)
            == b"A: X\r\nB : Y\t\r\n\tZ  \r\n")
    assert dkim.canonical_body(EXAMPLE_BODY, "simple") == b" C \r\nD \t E\r\n"


def test_empty_bodies() -> None:
    """§3.4.3: an empty body is one CRLF in simple; §3.4.4 (erratum 3192): empty in relaxed."""
    assert dkim.canonical_body(b"", "simple") == b"\r\n"
    assert dkim.canonical_body(b"\r\n\r\n", "relaxed") == b""


# -- signatures through the DNS ---------------------------------------------------------------


@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed"])
def test_a_real_signature_passes(keys, key_dns, canon) -> None:
    raw = sign(MESSAGE, keys["rsa"], DOMAIN, "s1", canon=canon)
    [result] = verify_through_dns(key_dns, raw)
    assert (result.result, result.domain, result.selector, result.reason) == ("pass", DOMAIN, "s1", "good signature")


def test_line_endings_of_the_spool_do_not_matter(keys) -> None:
    """§5.3: the message is verified in its CRLF form, whatever line endings it is kept with."""
    raw = sign(MESSAGE, keys["rsa"], DOMAIN, "s1")
    answers = {f"s1._domainkey.{DOMAIN}": {"txt": [keys["rsa"].record()]}}
    assert [r.result for r in dkim.verify(raw.replace(b"\r\n", b"\n"), answers)] == ["pass"]


def test_a_body_changed_by_one_byte_fails_on_the_body_hash(keys, key_dns) -> None:
    raw = sign(MESSAGE, keys["rsa"], DOMAIN, "s1").replace(b"$12.00", b"$92.00")
    [result] = verify_through_dns(key_dns, raw)
    assert (result.result, result.reason) == ("fail", "body hash mismatch (bh=)")


def test_a_signed_header_changed_fails(keys, key_dns) -> None:
    raw = sign(MESSAGE, keys["rsa"], DOMAIN, "s1").replace(b"Subject: Your receipt", b"Subject: Your refund")
    [result] = verify_through_dns(key_dns, raw)
    assert (result.result, result.reason) == ("fail", "signature does not verify")


def test_a_selector_with_no_key_is_a_permerror(keys, key_dns) -> None:
    [result] = verify_through_dns(key_dns, sign(MESSAGE, keys["rsa"], DOMAIN, "madeup"))
    assert result.result == "permerror" and "no key for selector madeup (nxdomain)" == result.reason


def test_a_revoked_key_is_a_permerror(keys, key_dns) -> None:
    [result] = verify_through_dns(key_dns, sign(MESSAGE, keys["rsa"], DOMAIN, "gone"))
    assert (result.result, result.reason) == ("permerror", "key revoked (empty p=)")


def test_a_512_bit_key_is_a_permerror(keys, key_dns) -> None:
    """RFC 8301 §3.2: verifiers MUST NOT consider signatures with keys under 1024 bits valid."""
    [result] = verify_through_dns(key_dns, sign(MESSAGE, keys["small"], DOMAIN, "weak"))
    assert (result.result, result.reason) == ("permerror", "RSA key of 512 bits, under 1024")


def test_rsa_sha1_is_not_accepted(keys, key_dns) -> None:
    """RFC 8301 §3.1: a correct rsa-sha1 signature is still no valid signature."""
    [result] = verify_through_dns(key_dns, sign(MESSAGE, keys["rsa"], DOMAIN, "s1", algorithm="rsa-sha1"))
    assert result.result == "permerror" and "rsa-sha1" in result.reason


def test_ed25519_sha256(keys, key_dns) -> None:
    """RFC 8463: Ed25519 over the SHA-256 of the signed data, with the raw key in p=."""
    raw = sign(MESSAGE, keys["ed"], DOMAIN, "ed")
    assert [r.result for r in verify_through_dns(key_dns, raw)] == ["pass"]
    assert [r.result for r in verify_through_dns(key_dns, raw.replace(b"Bob,", b"Rob,"))] == ["fail"]


def test_a_strict_key_refuses_a_subdomain_identity(keys, key_dns) -> None:
    """§3.6.1 t=s: i= must be in d= itself."""
    raw = sign(MESSAGE, keys["rsa"], DOMAIN, "strict", extra_tags=f" i=@mail.{DOMAIN};")
    [result] = verify_through_dns(key_dns, raw)
    assert result.result == "permerror" and "t=s" in result.reason


def test_a_body_signed_only_in_part_passes_but_says_so(keys, key_dns) -> None:
    """l= (§3.5, §8.2): text appended after the signed part keeps the signature good, and the
    result says the body is not covered, so no sign takes it for the message's."""
    raw = sign(MESSAGE, keys["rsa"], DOMAIN, "s1", length=20) + b"Click http://paypa1.example/login\r\n"
    [result] = verify_through_dns(key_dns, raw)
    assert result.result == "pass" and not result.whole_body and "signed only in part" in result.reason
    with dkim.verified([result]):
        assert not run_check("consistent_sender", mailview.build(raw))


def test_dns_down_is_a_temperror(keys, silent_nameserver) -> None:
    raw = sign(MESSAGE, keys["rsa"], DOMAIN, "s1")
    answers = lookup(silent_nameserver, raw, timeout=1.0)
    assert answers == {f"s1._domainkey.{DOMAIN}": {"error": "temp: timeout"}}
    [result] = dkim.verify(raw, answers)
    assert (result.result, result.reason) == ("temperror", "key lookup failed (temp: timeout)")


def test_the_lookup_deadline_answers_for_the_names_still_waiting(keys, silent_nameserver) -> None:
    """The resolver would still try: the fetch's own deadline ends the wait (no deferral)."""
    loop = EventLoop()
    resolver = Resolver(loop, [silent_nameserver], timeout=30, attempts=1)
    answers = fetch_on(resolver, loop, sign(MESSAGE, keys["rsa"], DOMAIN, "s1"), 0.3)
    assert answers == {f"s1._domainkey.{DOMAIN}": {"error": "temp: lookup timeout"}}


def test_a_question_still_queued_at_the_deadline_is_not_the_dns_failing(keys, silent_nameserver) -> None:
    """A key question that waited behind the gateway's other queries (max_in_flight) was never
    asked: neutral at the deadline, so it earns no mark."""
    raw = sign(MESSAGE, keys["rsa"], DOMAIN, "s1")
    loop = EventLoop()
    resolver = Resolver(loop, [silent_nameserver], timeout=30, attempts=1, max_in_flight=1)
    resolver.query("busy.example", "TXT", lambda answer: None)  # takes the only slot
    assert resolver.asking("busy.example", "TXT")
    answers = fetch_on(resolver, loop, raw, 0.3)
    assert answers == {f"s1._domainkey.{DOMAIN}": {"error": "local: lookup not sent in time"}}
    assert [r.result for r in dkim.verify(raw, answers)] == ["neutral"]


def test_a_lookup_our_own_resolver_refused_is_neutral_and_earns_no_mark(keys, silent_nameserver) -> None:
    """A flood of the gateway's own resolver (ERROR_OVERLOADED) is not the brand's DNS failing: the
    result is neutral, so a forged signature cannot count as read under load."""
    raw = sign(MESSAGE, keys["rsa"], DOMAIN, "s1").replace(b"$12.00", b"$920.00")
    loop = EventLoop()
    resolver = Resolver(loop, [silent_nameserver], timeout=30, attempts=1, max_in_flight=1, max_pending=0)
    resolver.query("busy.example", "TXT", lambda answer: None)  # takes the only slot, never answered
    answers = fetch_on(resolver, loop, raw, 10.0)
    assert answers == {f"s1._domainkey.{DOMAIN}": {"error": "local: overloaded"}}
    [result] = dkim.verify(raw, answers)
    assert (result.result, result.reason) == ("neutral", "key not looked up (overloaded)")
    assert classify_signs(raw, [result])["branded_sender"] is False


def test_a_failed_key_lookup_is_answered_from_the_negative_cache_until_it_expires(keys, scripted_dns) -> None:
    """RFC 2308 §7: a SERVFAIL for a selector is remembered (FailedKeys), so the next message signed
    with it neither asks the DNS again nor waits; once expired, it is asked again."""
    name = f"s1._domainkey.{DOMAIN}"
    scripted_dns.behave(name, "servfail")
    raw = sign(MESSAGE, keys["rsa"], DOMAIN, "s1")
    loop = EventLoop()
    resolver = Resolver(loop, [scripted_dns.address], timeout=2.0, attempts=1, cache_size=0)
    failed = FailedKeys(loop)
    try:
        first = fetch_again(resolver, loop, raw, 5.0, failed)
        assert first[name]["error"].startswith("temp: ") and scripted_dns.count(name) == 1
        assert fetch_again(resolver, loop, raw, 5.0, failed) == first
        assert scripted_dns.count(name) == 1  # answered from the cache: no second question
        [result] = dkim.verify(raw, first)
        assert result.result == "temperror"
        expired = FailedKeys(loop, ttl=0)
        fetch_again(resolver, loop, raw, 5.0, expired)
        fetch_again(resolver, loop, raw, 5.0, expired)
        assert scripted_dns.count(name) == 3  # nothing kept past its time
    finally:
        resolver.close()
        loop.close()


def test_the_negative_cache_keeps_only_failures_of_their_dns_and_is_bounded() -> None:
    loop = EventLoop()
    failed = FailedKeys(loop, size=2)
    for name, answer in [("a", {"error": "local: overloaded"}), ("b", {"error": "nxdomain"}),
                         ("c", {"txt": ["v=DKIM1; p=x"]}), ("d", {"error": "temp: servfail"})]:
        failed.remember(name, answer)
    assert [name for name in "abcd" if failed.get(name)] == ["d"]
    failed.remember("e", {"error": "temp: timeout"})
    failed.remember("f", {"error": "temp: lookup timeout"})
    assert [name for name in "def" if failed.get(name)] == ["e", "f"]  # the oldest forgotten
    loop.close()


# -- the signs ---------------------------------------------------------------------------------


def classify_signs(raw: bytes, results: list[dkim.Result] | None) -> dict[str, bool | str]:
    with dkim.verified(results):
        view = mailview.build(raw)
        fired = {name: run_check(name, view) for name in ("branded_sender", "consistent_sender")}
        return {**fired, "detail": detail("branded_sender", view)}


def test_a_forged_signature_earns_no_branded_sender_and_a_good_one_does(keys, key_dns) -> None:
    forged = sign(MESSAGE, keys["rsa"], DOMAIN, "s1").replace(b"$12.00", b"$920.00")
    assert classify_signs(forged, None)["branded_sender"] is True  # read, not verified: what it earned before
    for raw in (forged, sign(MESSAGE, keys["rsa"], DOMAIN, "madeup")):
        signs = classify_signs(raw, verify_through_dns(key_dns, raw))
        assert signs == {"branded_sender": False, "consistent_sender": False, "detail": ""}
    genuine = sign(MESSAGE, keys["rsa"], DOMAIN, "s1")
    signs = classify_signs(genuine, verify_through_dns(key_dns, genuine))
    assert signs == {"branded_sender": True, "consistent_sender": True, "detail": " (dkim=pass d=paypal.com)"}


def test_a_temperror_of_the_from_domain_counts_as_read(keys) -> None:
    """The brand's own DNS failing now is no attacker's doing: the signature counts as read."""
    raw = sign(MESSAGE, keys["rsa"], DOMAIN, "s1")
    results = dkim.verify(raw, {f"s1._domainkey.{DOMAIN}": {"error": "temp: servfail"}})
    assert classify_signs(raw, results)["detail"] == " (dkim=temperror d=paypal.com)"


def test_another_domain_s_pass_is_no_mark_of_the_from_domain(keys) -> None:
    raw = sign(MESSAGE, keys["rsa"], "esp.example", "s1")
    results = dkim.verify(raw, {"s1._domainkey.esp.example": {"txt": [keys["rsa"].record()]}})
    assert [r.result for r in results] == ["pass"]
    assert classify_signs(raw, results)["branded_sender"] is False


def test_without_a_verification_the_signature_is_read_as_before() -> None:
    """The offline tools (bench, training) have no DNS: a d= of the From domain counts, as it
    always did, whatever the corpus did to the other tags."""
    raw = MESSAGE.replace(b"\r\n\r\n", b"\r\nDKIM-Signature: v=1; d=paypal.com; s=s1; t=555-123-4567\r\n\r\n", 1)
    assert classify_signs(raw, None)["branded_sender"] is True
    assert classify_signs(raw, dkim.verify(raw, {}))["branded_sender"] is False  # malformed: permerror


# -- malformed input ---------------------------------------------------------------------------


@pytest.mark.parametrize("value, reason", [
    ("v=1; a=rsa-sha256; d=x.example; s=s; h=from; bh=eA==", "missing tag b="),
    ("v=1; a=rsa-sha256; d=x.example; d=y.example; s=s; h=from; bh=eA==; b=eQ==", "tag d= given twice"),
    ("v=2; a=rsa-sha256; d=x.example; s=s; h=from; bh=eA==; b=eQ==", "unknown version v=2"),
    ("v=1; a=rsa-sha256; d=x.example; s=s; h=to; bh=eA==; b=eQ==", "From is not signed"),
    ("v=1; a=rsa-sha256; d=x.example; s=s; h=from; bh=eA==; b=eQ==; i=@evil.example",
     "i= is not in d= or a subdomain of it"),
    ("v=1; a=rsa-sha256; d=x.example; s=s; h=from; bh=e!A==; b=eQ==", "bh= is not base64"),
    ("v=1; a=rsa-sha256; d=x.example; s=s; h=from; bh=eA==; b=eQ==; t=20; x=10", "x= before t="),
    ("v=1; a=rsa-sha256; d=x.example; s=s; h=from; bh=eA==; b=eQ==; c=fancy", "unknown canonicalization c=fancy"),
    ("v=1; a=rsa-sha256; d=x.example; s=s; h=from; bh=eA==; b=eQ==; x=1000", "signature expired (x=)"),
    ("v=1; a=rsa-md5; d=x.example; s=s; h=from; bh=eA==; b=eQ==", "unsupported algorithm rsa-md5"),
    ("v=1; a=rsa-sha256; d=x.example; s=s; h=from; bh=eA==; b=eQ==; q=http", "no supported query method in q="),
    ("garbage", "malformed tag 'garbage'"),
])
def test_malformed_signatures_get_their_reason(value: str, reason: str) -> None:
    raw = f"DKIM-Signature: {value}\r\nFrom: a@x.example\r\n\r\nbody\r\n".encode()
    [result] = dkim.verify(raw, {})
    assert result.reason == reason and result.result in ("permerror", "neutral")


@pytest.mark.parametrize("record, reason", [
    ("v=DKIM1; k=rsa; p=MII!", "p= is not base64"),
    ("v=DKIM1; k=rsa; p=" + base64.b64encode(b"\x30\x82\xff\xff\x02").decode(), "malformed public key"),
    ("v=DKIM1; k=rsa; s=web; p=eA==", "key not for email (s=)"),
    ("k=rsa; v=DKIM1; p=eA==", "not a DKIM1 key record"),
])
def test_unusable_key_records_are_permerrors(keys, record: str, reason: str) -> None:
    raw = sign(MESSAGE, keys["rsa"], DOMAIN, "s1")
    [result] = dkim.verify(raw, {f"s1._domainkey.{DOMAIN}": {"txt": [record]}})
    assert (result.result, result.reason) == ("permerror", reason)


def test_only_the_first_signatures_are_read(keys) -> None:
    raw = MESSAGE
    for selector in ("a", "b", "c", "d", "e", "f"):
        raw = sign(raw, keys["rsa"], DOMAIN, selector)
    names = dkim.key_names(raw)
    assert names == [f"{s}._domainkey.{DOMAIN}" for s in ("f", "e", "d", "c")]
    assert len(dkim.verify(raw, {})) == dkim.MAX_SIGNATURES


def test_a_signature_the_lookup_did_not_see_earns_nothing(keys) -> None:
    """Keys are looked up for the signatures in the first 64 KB: one pushed further down by filler
    fields is a permerror, never a temperror that would count as read."""
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"x" * 900) for n in range(80))
    raw = filler + sign(MESSAGE, keys["rsa"], DOMAIN, "s1")
    assert dkim.key_names(raw) == []
    [result] = dkim.verify(raw, {})
    assert result.result == "permerror" and "beyond the first 64 KB" in result.reason
    assert classify_signs(raw, [result])["branded_sender"] is False


def test_a_key_name_too_long_for_the_dns_is_a_permerror(keys) -> None:
    selector = ".".join(["s" * 60] * 3 + ["t" * 52])  # 234 octets: with "._domainkey.paypal.com", over 253
    [result] = dkim.verify(sign(MESSAGE, keys["rsa"], DOMAIN, selector), {})
    assert (result.result, result.reason) == ("permerror", "d= or s= is not a domain name")


def test_a_message_without_signature_is_none() -> None:
    assert [(r.result, r.reason) for r in dkim.verify(MESSAGE, {})] == [("none", "no signature")]
    assert dkim.authentication_results("gw.example.test", dkim.verify(MESSAGE, {})) == \
        'gw.example.test; dkim=none reason="no signature"'


def test_the_authentication_results_field_replaces_a_forged_one_of_ours(keys) -> None:
    """RFC 8601 §5: a field with our authserv-id that came with the message is removed; another
    host's stays; ours goes on top, in ASCII whatever the reason says."""
    raw = (b"Authentication-Results: gw.example.test; dkim=pass header.d=paypal.com\r\n"
           b"Authentication-Results: mx.upstream.example; spf=pass\r\n") + sign(MESSAGE, keys["rsa"], DOMAIN, "s1")
    results = dkim.verify(raw, {f"s1._domainkey.{DOMAIN}": {"txt": [keys["rsa"].record()]}})
    results.append(dkim.Result("permerror", "rsa-sha1 is not accepted (RFC 8301 §3.1)", "x.example", "s", "rsa-sha1"))
    out = dkim.stamp(raw, "GW.example.test", results)
    assert out.replace(b"\r\n ", b" ").startswith(  # folded at white space: unfolded here
        b'Authentication-Results: GW.example.test; dkim=pass reason="good signature" header.d=paypal.com'
        b' header.s=s1; dkim=permerror reason="rsa-sha1 is not accepted (RFC 8301 3.1)" header.d=x.example'
        b' header.s=s\r\n')
    assert out.count(b"Authentication-Results:") == 2 and b"mx.upstream.example; spf=pass" in out
    assert [r.result for r in dkim.verify(out, {f"s1._domainkey.{DOMAIN}": {"txt": [keys["rsa"].record()]}})] \
        == ["pass"]  # an unsigned field on top does not disturb the signature


def test_corpus_messages_never_raise_and_real_signatures_without_keys_are_no_pass(keys) -> None:
    """The malformed corpus, mutations of it and of a signed message, and the real DKIM-signed mail
    of the corpus whose keys cannot be fetched here (no network): a result for each signature,
    never a pass, never a raise."""
    seeds = fuzz.load_seeds(every=40)
    signed = sign(MESSAGE, keys["rsa"], DOMAIN, "s1")
    rng = random.Random(6376)
    mutated = [fuzz.mutate(rng, seed, seeds, 1 << 20)[0] for seed in [signed] * 150 + rng.sample(seeds, 150)]
    real = [raw for raw in seeds if b"DKIM-Signature:" in raw]
    assert real, "the corpus holds DKIM-signed mail"
    for raw in [*seeds, *mutated]:
        results = dkim.verify(raw, {name: {"error": "temp: no network"} for name in dkim.key_names(raw)})
        assert results and all(r.result in ("none", "temperror", "permerror", "neutral", "fail") for r in results)
        assert raw in mutated or all(r.result != "fail" for r in results)
    assert any(r.result == "temperror" for raw in real for r in dkim.verify(raw, None))
