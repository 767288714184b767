"""Masks, access rules and routes: relay decisions (never an open relay), condition
rules with DNS facts, wildcard edge cases and ForwardRoute grammar."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from smtpgw.rules.access import (
    Decision,
    RuleError,
    first_match,
    parse_condition_rule,
    parse_relay_rule,
    relay_decision,
    verdict_for_all,
)
from smtpgw.rules.masks import client_address, domain_match, ip_match, parse_ip_mask, wildcard_match
from smtpgw.rules.routing import first_route, group_by_route, parse_route

HERE = "/etc/smtpgw"


def relay_rules(*lines: str, folder: str = HERE) -> list:
    return [parse_relay_rule(line, f"smtpgw.conf:{n}", folder) for n, line in enumerate(lines, 1)]


def condition_rules(kind: str, *lines: str) -> list:
    return [parse_condition_rule(kind, line, f"smtpgw.conf:{n}", HERE) for n, line in enumerate(lines, 1)]


# --- wildcard masks ------------------------------------------------------------------------

@pytest.mark.parametrize(("mask", "value", "expected"), [
    ("*", "", True),
    ("*", "anything@at.all", True),
    ("*@example.test", "User@EXAMPLE.test", True),
    ("*@example.test", "user@example.test.evil", False),
    ("*@example.test", "user@sub.example.test", False),
    ("*@*.example.test", "user@sub.example.test", True),
    ("?@example.test", "a@example.test", True),
    ("?@example.test", "ab@example.test", False),
    ("?", "", False),
    ("a**b", "ab", True),
    ("*a*b*", "xxbxxaxxbxx", True),
    ("*a*b*", "xxbxxa", False),
    ("*ab*ab", "abab", True),
    ("*ab*ab", "aba", False),
    ("post*@*", "postmaster@example.test", True),
    ("", "", True),
    ("", "x", False),
    # Regular-expression metacharacters are literal.
    ("a.b@example.test", "axb@example.test", False),
    ("a.b@example.test", "a.b@example.test", True),
    ("(a|b)@*", "a@x", False),
    ("(a|b)@*", "(a|b)@x", True),
    ("[ab]*", "a", False),
    ("[ab]*", "[ab]", True),
    ("a+@*", "aa@x", False),
    ("a+@*", "a+@x", True),
    ("^x$", "x", False),
    ("^x$", "^x$", True),
    ("\\d*", "1", False),
    ("\\d*", "\\d1", True),
    ("*.exe", "virus.EXE", True),
    ("*.exe", "virus.exe.txt", False),
    ("*", "line\nbreak", True),
    ("?", "\n", True),
])
def test_wildcard_match(mask: str, value: str, expected: bool) -> None:
    assert wildcard_match(mask, value) is expected


def test_wildcard_match_has_no_catastrophic_backtracking() -> None:
    # A backtracking matcher needs ~len(value)**5 steps here; this one is linear-ish.
    assert wildcard_match("*a*a*a*a*a*b", "a" * 20000) is False
    assert wildcard_match("*a*a*a*a*a*b", "a" * 20000 + "b") is True


@pytest.mark.parametrize(("mask", "domain", "expected"), [
    ("example.test", "EXAMPLE.TEST.", True),
    ("example.test.", "example.test", True),
    ("example.test", "sub.example.test", False),
    ("*.example.test", "sub.example.test", True),
    ("*.example.test", "example.test", False),
    ("example.?est", "example.best", True),
])
def test_domain_match(mask: str, domain: str, expected: bool) -> None:
    assert domain_match(mask, domain) is expected


# --- IP masks ------------------------------------------------------------------------------

@pytest.mark.parametrize(("mask", "address", "expected"), [
    ("192.0.2.1", "192.0.2.1", True),
    ("192.0.2.1", "192.0.2.2", False),
    ("192.0.2.0/24", "192.0.2.200", True),
    ("192.0.2.0/24", "192.0.3.1", False),
    ("192.0.2.77/24", "192.0.2.1", True),  # host bits ignored
    ("10.0.0.0/255.0.0.0", "10.200.1.1", True),
    ("10.0.0.0/255.255.255.128", "10.0.0.128", False),
    ("::1", "::1", True),
    ("[::1]", "::1", True),
    ("2001:db8::/32", "2001:db8:1::5", True),
    ("2001:db8::/32", "2001:db9::5", False),
    ("127.0.0.0/8", "::ffff:127.0.0.9", True),  # IPv4-mapped client
    ("127.0.0.0/8", "[IPv6:::ffff:127.0.0.1]", True),
    ("127.0.0.0/8", "::1", False),
    ("any", "2001:db8::1", True),
    ("ANY", "not an address", True),
    ("127.0.0.0/8", "not an address", False),
    ("127.0.0.0/8", "", False),
    ("192.0.2.0/33", "192.0.2.1", False),  # a bad mask matches nothing
])
def test_ip_match(mask: str, address: str, expected: bool) -> None:
    assert ip_match(mask, address) is expected


@pytest.mark.parametrize("mask", ["10.0.0.256", "10.0.0.0/33", "10.0.0.0/255.0.255.0", "10.0.0.0/0.0.0.255",
                                  "example.test", "", "10.0.0.0/", "::1/129"])
def test_bad_ip_masks(mask: str) -> None:
    with pytest.raises(ValueError, match="is not an IP mask"):
        parse_ip_mask(mask)


def test_client_address_unmaps_ipv4() -> None:
    assert client_address("::ffff:192.0.2.1") == ipaddress.IPv4Address("192.0.2.1")
    assert client_address(ipaddress.IPv6Address("::ffff:10.0.0.1")) == ipaddress.IPv4Address("10.0.0.1")
    assert client_address("2001:db8::1") == ipaddress.IPv6Address("2001:db8::1")
    assert client_address("/run/smtpgw.sock") is None and client_address(None) is None


# --- RelayRule -----------------------------------------------------------------------------

CANONICAL = (
    "allow from 192.168.0.0/16 to *",
    "allow from ::1 to *",
    "allow from any to *@example.test",
    "allow from any to *@other.test",
    "deny from any to *",
)


@pytest.mark.parametrize(("client", "recipient", "allowed", "line"), [
    ("192.168.5.5", "anyone@far.away", True, 1),           # internal net sends anywhere
    ("::ffff:192.168.0.9", "anyone@far.away", True, 1),    # through an IPv6 listener
    ("::1", "anyone@far.away", True, 2),
    ("203.0.113.9", "user@EXAMPLE.TEST", True, 3),        # anyone to a protected domain
    ("2001:db8::9", "user@other.test", True, 4),
    ("203.0.113.9", "user@far.away", False, 5),           # everything else refused
    ("203.0.113.9", "user@example.test.far.away", False, 5),
    ("203.0.113.9", "user%far.away@example.test", False, 3),  # untrusted routing: rule 3 skipped
    ("192.168.1.1", "user%far.away@example.test", True, 1),  # a trusted client may route
    ("unix socket", "user@far.away", False, 5),
])
def test_relay_decision(client: str, recipient: str, allowed: bool, line: int) -> None:
    decision = relay_decision(relay_rules(*CANONICAL), client, recipient)
    assert decision.allowed is allowed
    assert decision.rule is not None and decision.rule.where == f"smtpgw.conf:{line}"


@pytest.mark.parametrize("recipient", [
    "user%other.test@example.test", "other.test!user@example.test", '"user@other.test"@example.test',
    '"user\\@other.test"@example.test', "a%b%c.test@EXAMPLE.test",
])
def test_untrusted_routing_is_refused_to_clients_allowed_by_a_domain_rule(recipient: str) -> None:
    """Postfix's allow_untrusted_routing=no: a rule for every client never allows a routed address."""
    rules = relay_rules("allow from 10.0.0.0/8 to *", "allow from any to *@example.test",
                        "allow from 0.0.0.0/0 to *@example.test", "deny from any to *")
    outside = relay_decision(rules, "203.0.113.9", recipient)
    assert outside == Decision(False, rules[1], untrusted_routing=True)
    assert outside.reason == "untrusted routing, not allowed by RelayRule=allow from any to *@example.test (smtpgw.conf:2)"
    assert relay_decision(rules, "10.1.2.3", recipient) == Decision(True, rules[0])  # trusted client
    plain = recipient.replace("%", ".").replace("!", ".").replace('"', "").replace("\\", "").replace("@other", ".other")
    assert relay_decision(rules, "203.0.113.9", plain) == Decision(True, rules[1])


def test_routed_recipient_reaches_a_later_rule_for_the_client() -> None:
    # As Postfix's permit_auth_destination answers DUNNO for a routed address: the next rules decide.
    rules = relay_rules("allow from any to *@example.test", "allow from 10.0.0.0/8 to *", "deny from any to *")
    assert relay_decision(rules, "10.9.9.9", "u%x.test@example.test") == Decision(True, rules[1])
    assert relay_decision(rules, "192.0.2.1", "u%x.test@example.test").untrusted_routing is True
    open_relay = relay_rules("allow from any to *")  # routing reaches nothing it does not already
    assert relay_decision(open_relay, "192.0.2.1", "u%x.test@example.test") == Decision(True, open_relay[0])
    denied = relay_rules("deny from 192.0.2.0/24 to *", "allow from any to *@example.test")
    assert relay_decision(denied, "192.0.2.1", "u%x.test@example.test") == Decision(False, denied[0])


def test_unmatched_recipient_is_refused() -> None:
    rules = relay_rules("allow from 10.0.0.0/8 to *", "allow from any to *@example.test")
    decision = relay_decision(rules, "203.0.113.1", "user@far.away")
    assert decision == Decision(False, None) and decision.reason == "no rule matched"
    assert relay_decision([], "127.0.0.1", "user@example.test").allowed is False


def test_deny_before_allow_and_reason() -> None:
    rules = relay_rules("deny from 10.6.6.0/24 to *", "allow  from 10.0.0.0/8   to *")
    decision = relay_decision(rules, "10.6.6.6", "user@far.away")
    assert decision.allowed is False
    assert decision.reason == "RelayRule=deny from 10.6.6.0/24 to * (smtpgw.conf:1)"
    assert relay_decision(rules, "10.1.1.1", "u@x").reason == "RelayRule=allow from 10.0.0.0/8 to * (smtpgw.conf:2)"


def test_relay_rule_file_lists(tmp_path: Path) -> None:
    (tmp_path / "nets.list").write_text("# offices\n10.1.0.0/16\n\n  2001:db8:5::/48  \n")
    (tmp_path / "rcpts.list").write_text("*@example.test\n# partners\n*@partner.test\n")
    rules = relay_rules("allow from file:nets.list to *", "allow from any to file:rcpts.list",
                        "deny from any to *", folder=str(tmp_path))
    assert relay_decision(rules, "10.1.2.3", "x@far.away").rule is rules[0]
    assert relay_decision(rules, "2001:db8:5::1", "x@far.away").rule is rules[0]
    assert relay_decision(rules, "2001:db8:6::1", "x@PARTNER.test").rule is rules[1]
    assert relay_decision(rules, "10.2.0.1", "x@far.away").allowed is False


def test_relay_rule_file_list_problems(tmp_path: Path) -> None:
    (tmp_path / "rcpts.list").write_text("*@example.test\nexample.org\nbad mask@x\n")
    with pytest.raises(RuleError) as caught:
        relay_rules("allow from any to file:rcpts.list", folder=str(tmp_path))
    assert caught.value.problems == [
        f"{tmp_path}/rcpts.list:2: 'example.org' has no '@'; did you mean '*@example.org'?",
        f"{tmp_path}/rcpts.list:3: 'bad mask@x' is not one address mask (no spaces or commas inside)",
    ]
    with pytest.raises(RuleError, match=r"smtpgw.conf:1: cannot read include file .*absent.list"):
        relay_rules("allow from file:absent.list to *", folder=str(tmp_path))
    (tmp_path / "binary.list").write_bytes(b"10.0.0.1\n\xff\xfe\n")
    with pytest.raises(RuleError, match=r"binary.list:2: not valid UTF-8"):
        relay_rules("allow from file:binary.list to *", folder=str(tmp_path))


@pytest.mark.parametrize(("line", "message"), [
    ("allow from any", "expected 'allow|deny from"),
    ("allow from any to * extra", "expected 'allow|deny from"),
    ("allow by any to *", "expected 'allow|deny from"),
    ("accept from any to *", "'accept' is neither allow nor deny"),
    ("allow from 300.0.0.1 to *", "'300.0.0.1' is not an IP mask"),
    ("allow from any to example.test", "did you mean '\\*@example.test'"),
    ("allow from any to *@a.test,*@b.test", "is not one address mask"),
])
def test_relay_rule_syntax_errors(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        relay_rules(line)


# --- ConnectRule, HeloRule, MailfromRule ---------------------------------------------------

def test_connect_rules_with_facts() -> None:
    rules = condition_rules("ConnectRule", "allow from any to postmaster@example.test",
                            "deny from in_dnsbl to *", "deny from no_name to *@example.test")
    listed = {"in_dnsbl": True, "has_name": True}
    assert first_match(rules, listed, "postmaster@example.test") is rules[0]
    assert first_match(rules, listed, "user@example.test") is rules[1]
    nameless = {"in_dnsbl": False, "has_name": False}
    assert first_match(rules, nameless, "user@example.test") is rules[2]
    assert first_match(rules, nameless, "user@elsewhere.test") is None
    # A fact that is unknown (lookup failed) makes its conditions hold neither way.
    assert first_match(rules, {}, "user@example.test") is None


def test_negative_conditions() -> None:
    helo = condition_rules("HeloRule", "deny from diff_ip to *", "deny from no_ip to *")
    assert first_match(helo, {"has_ip": True, "same_ip": False}, "u@x.test") is helo[0]
    assert first_match(helo, {"has_ip": False}, "u@x.test") is helo[1]
    assert first_match(helo, {"has_ip": True, "same_ip": True}, "u@x.test") is None
    mail = condition_rules("MailfromRule", "deny from no_mx to *", "allow from has_ip to *")
    assert first_match(mail, {"has_mx": False, "has_ip": True}, "u@x.test") is mail[0]
    assert first_match(mail, {"has_mx": True, "has_ip": True}, "u@x.test") is mail[1]


def test_verdict_before_any_recipient() -> None:
    rules = condition_rules("ConnectRule", "allow from any to postmaster@*", "deny from in_dnsbl to *")
    # postmaster may still be reachable: the answer waits for RCPT TO.
    assert verdict_for_all(rules, {"in_dnsbl": True}) is None
    assert verdict_for_all(rules, {"in_dnsbl": False}) == Decision(True, None)
    strict = condition_rules("ConnectRule", "deny from in_dnsbl to *@example.test", "deny from in_dnsbl to *")
    assert verdict_for_all(strict, {"in_dnsbl": True}) == Decision(False, strict[1])
    assert verdict_for_all(strict[:1], {"in_dnsbl": True}) is None
    assert verdict_for_all([], {}) == Decision(True, None)


@pytest.mark.parametrize(("kind", "line", "message"), [
    ("ConnectRule", "deny from has_ip to *", "'has_ip' is not a ConnectRule condition"),
    ("HeloRule", "deny from in_dnsbl to *", "'in_dnsbl' is not a HeloRule condition"),
    ("MailfromRule", "deny from same_ip to *", "'same_ip' is not a MailfromRule condition"),
    ("MailfromRule", "deny from 10.0.0.0/8 to *", "is not a MailfromRule condition"),
    ("HeloRule", "deny has_ip to *", "expected 'allow|deny from has_ip|no_ip|same_ip|diff_ip|any to"),
])
def test_condition_rule_errors(kind: str, line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        condition_rules(kind, line)


def test_condition_words_are_case_insensitive() -> None:
    (rule,) = condition_rules("ConnectRule", "DENY FROM In_DnsBL TO *")
    assert (rule.allow, rule.condition) == (False, "in_dnsbl")


# --- ForwardRoute --------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "kind", "host", "port"), [
    ("*@a.test [localhost:1025]", "host", "localhost", 1025),
    ("*@a.test [relay.example.test]", "host", "relay.example.test", 25),
    ("*@a.test [127.0.0.1]:2526", "host", "127.0.0.1", 2526),
    ("*@a.test [IPv6:::1]:2526", "host", "::1", 2526),
    ("*@a.test [::1]:2526", "host", "::1", 2526),
    ("*@a.test [2001:db8::1]", "host", "2001:db8::1", 25),
    ("*@a.test Other.Test.", "mx", "other.test", None),
])
def test_route_forms(text: str, kind: str, host: str, port: int | None) -> None:
    route = parse_route(text, "smtpgw.conf:9")
    assert (route.mask, route.kind, route.host, route.port, route.where) == ("*@a.test", kind, host, port,
                                                                           "smtpgw.conf:9")


@pytest.mark.parametrize(("text", "message"), [
    ("*@a.test", "expected '<address mask> \\[host:port\\]'"),
    ("*@a.test [host:0]", "'0' is not a port"),
    ("*@a.test [host:1025]:25", "gives the port twice"),
    ("*@a.test [host", "is not a domain; a host needs brackets|expected"),
    ("*@a.test [IPv6:1.2.3.4]", "is not an IPv6 address literal"),
    ("*@a.test [bad_host]", "'bad_host' is not a host name or IP address"),
    ("*@a.test [host]x", "expected"),
    ("a.test [host]", "did you mean '\\*@a.test'"),
])
def test_route_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_route(text, "smtpgw.conf:9")


def test_first_route_and_grouping() -> None:
    routes = [parse_route(text, f"smtpgw.conf:{n}") for n, text in enumerate([
        "*@slow.test [127.0.0.1:2527]", "*@a.test [LOCALHOST:2526]", "*@b.test [localhost]:2526",
        "*@c.test c-mail.test", "*@*.internal.test [::1]:2528"], 1)]
    assert first_route(routes, "x@SLOW.test") is routes[0]
    assert first_route(routes, "x@elsewhere.test") is None
    groups = group_by_route(routes, ["a1@a.test", "x@far.test", "b1@b.test", "c1@c.test", "y@Far.Test.",
                                     "z@c-mail.test", "i@eng.internal.test", "s@slow.test"])
    assert groups == {
        ("host", "localhost", 2526): ["a1@a.test", "b1@b.test"],
        ("mx", "far.test"): ["x@far.test", "y@Far.Test."],
        ("mx", "c-mail.test"): ["c1@c.test", "z@c-mail.test"],
        ("host", "::1", 2528): ["i@eng.internal.test"],
        ("host", "127.0.0.1", 2527): ["s@slow.test"],
    }
