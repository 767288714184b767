"""Received trace fields read as hops, and the sending-host hints they give the classifier.

Owns: parsing one Received field's "from" clause (the HELO/EHLO name, the
reverse-DNS name and the connecting IP address of RFC 5321 §4.4
``From-domain`` and ``TCP-info``) and its ``with`` protocol (RFC 3848:
SMTP, ESMTP, ESMTPA, ESMTPS, ESMTPSA), in the Postfix/Sendmail, Exim and
qmail spellings; and turning the hops into hint tokens about *how* a message
was sent: an IP-literal or dot-less HELO, a HELO naming another address than
the connection, a missing or dynamic-looking reverse DNS name, the protocol.

Must never: emit a host name, domain, IP address, date or queue ID (those
describe where a corpus was collected, not spam), look at more than
``MAX_HOPS`` fields or more than ``MAX_FIELD`` characters of one, or raise
for any field text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from smtpgw.spam.formalsigns import registered_domain

MAX_HOPS = 12
MAX_FIELD = 600

_IPV4 = r"\d{1,3}(?:\.\d{1,3}){3}"
_IP_LITERAL = re.compile(rf"^\[?(?:ipv6:)?({_IPV4})\]?$")
_BRACKET_IP = re.compile(rf"\[({_IPV4})\]")
_PAREN_IP = re.compile(rf"\(({_IPV4})\)")  # qmail: "(HELO name) (1.2.3.4)"
_RDNS_BEFORE_IP = re.compile(rf"\((?:[^\s()@]*@)?([^\s()\[\]]*)\s*\[{_IPV4}\]")
_EXIM_HELO = re.compile(r"helo=([^\s()\]]+)")
_QMAIL_HELO = re.compile(r"\(helo ([^\s()]+)\)")
_WITH = re.compile(r"\bwith\s+([a-z0-9]+)")
_BY = re.compile(r"^([^\s;()\[\]]+)")
_PROTOCOLS = frozenset({"smtp", "esmtp", "esmtpa", "esmtps", "esmtpsa", "lmtp", "http", "https", "local",
                        "imap", "pop3", "qmqp", "microsoft", "asmtp", "smtps", "utf8smtp", "utf8esmtp"})
# Words in the reverse-DNS names ISPs give their dial-up, DSL and cable customers: the
# providers' naming conventions, which no standard fixes.
_DYNAMIC_WORD = re.compile(
    r"(?:^|[.\-\d])(?:dsl|adsl|xdsl|dial|dialup|dialin|ppp|pppoe|cable|catv|dyn|dynamic|pool|dhcp|client|"
    r"modem|dip|static|user|host|customer|cust|broadband|bb|res|resnet|nat)(?:[.\-\d]|$)")


@dataclass(frozen=True)
class Hop:
    helo: str  # the HELO/EHLO argument, lower case, "" if not given
    rdns: str  # the receiver's reverse-DNS name of the client, "" if none, "unknown" as written
    ip: str  # the connecting IPv4 address, "" if not found
    protocol: str  # the "with" keyword, lower case, "" if none
    by: str = ""  # the host that received it (RFC 5321 §4.4 By-domain), lower case, "" if none


def parse(value: str) -> Hop | None:
    """The hop described by one Received field, None if it has no "from" clause."""
    low = " ".join(value[:MAX_FIELD].lower().split())
    if not low.startswith("from "):
        return None
    clause, _, by_part = low[5:].partition(" by ")
    by_match = _BY.match(by_part)
    words = clause.split()
    first = words[0] if words else ""
    with_match = _WITH.search(low)
    protocol = with_match.group(1) if with_match else ""
    if protocol.startswith("microsoft"):
        protocol = "microsoft"
    ip_match = _BRACKET_IP.search(clause) or _PAREN_IP.search(clause)
    exim = _EXIM_HELO.search(clause)
    qmail = _QMAIL_HELO.search(clause)
    if exim or qmail:  # "from rdns ([ip] helo=name)" / "from rdns (HELO name) (ip)"
        helo = (exim or qmail).group(1)  # type: ignore[union-attr]
        rdns = "" if first.startswith(("(", "[")) or _IP_LITERAL.match(first) else first
    else:  # "from helo (rdns [ip])"
        helo = "" if first.startswith("(") else first
        rdns_match = _RDNS_BEFORE_IP.search(clause)
        rdns = rdns_match.group(1) if rdns_match else ""
    return Hop(helo.strip("[]()"), rdns.strip("."), ip_match.group(1) if ip_match else "", protocol,
               by_match.group(1).strip(".") if by_match else "")


def hops(fields: list[str]) -> list[Hop]:
    """The hops of a message's Received fields (newest first, as they appear)."""
    return [hop for hop in (parse(value) for value in fields[:MAX_HOPS]) if hop is not None]


def past_site_relays(chain: list[Hop]) -> list[Hop]:
    """The hops from the first one that did not stay inside the receiving site (newest first).

    A site often relays mail between its own hosts after its border MX took it in
    ("from mx1.site.example (...) by store.site.example", the hop below it "by
    mx1.site.example"): such a hop describes the receiving site, not the sender, and
    taken as the entry hop it taught the classifier the collector's relay of a
    corpus (a colocation host named like a dynamic address, in 98% of one set's ham).
    A hop counts as the site's own only when the chain vouches for it: its HELO
    names the host that received the hop below it, in the same registered domain
    as the host that received this one. A forged HELO of the recipient's domain
    alone is not enough.
    """
    start = 0
    while start + 1 < len(chain):
        hop, below = chain[start], chain[start + 1]
        if not hop.helo or hop.helo != below.by or "." not in hop.helo or _IP_LITERAL.match(hop.helo):
            break
        if registered_domain(hop.helo) != registered_domain(hop.by):
            break
        start += 1
    return chain[start:]


def is_public(ip: str) -> bool:
    """A routable IPv4 address: not loopback, RFC 1918 private, link-local or multicast."""
    try:
        a, b = (int(part) for part in ip.split(".")[:2])
    except ValueError:
        return False
    return not (a in (0, 10, 127) or a >= 224 or (a == 172 and 16 <= b <= 31) or (a == 192 and b == 168)
                or (a == 169 and b == 254))


def looks_dynamic(rdns: str) -> bool:
    """An ISP's name for a dial-up, DSL or cable customer ("ppp12.dsl.isp.example"), domain left out."""
    return bool(_DYNAMIC_WORD.search(rdns.rsplit(".", 2)[0]))


def hop_hints(hop: Hop) -> list[str]:
    """Hint tokens of one hop, without their prefix.

    Generic reverse-DNS names made of the address ("80-93-2-13-ptr.host.example")
    and Sendmail's "(may be forged)" were measured too: both also mark hosted
    bulk mail that is ham, and they pushed a hard ham over the Spam threshold.
    A field without a reverse-DNS name gives no hint ("rdns-none" was one until
    database 2026.12.08-1): whether the name is written is the receiving
    software's format, so the token taught each corpus's collector (TREC 2007:
    in 0.0% of its ham and 24% of its spam; SpamAssassin ham 25-44%, the
    mailing list's ham 21%, the phishing set 96%). Without it, held out
    (bench/spam_accuracy.py loso, standard, ham→Probable / caught / (1-AUC)%):
    sa-2002 6.43 / 90.1 / 2.91 -> 3.92 / 89.3 / 2.47, sa-2003-05 3.56 / 91.7 /
    1.34 -> 1.15 / 89.6 / 0.94, trec-2007 5.78 / 92.5 / 1.60 -> 5.83 / 91.7 /
    1.71 (the set whose own ham never had it), modern-mixed 6.45 / 90.5 / 3.00 ->
    7.53 / 90.5 / 2.98, lists 0.85 -> 0.85, phishing caught 92.8 -> 92.6.
    "unknown" (the receiver looked the name up and found none) stays a hint.
    Still bound to eras, and kept because they are true of today's mail: the
    protocol (ESMTPS in 0.1% of 2002-07 mail, 99% of modern-mixed ham and 36% of
    its spam) and helo-same-domain, which needs a written name (TREC ham 99%,
    spam 48%; SpamAssassin 44-54% both).
    """
    out = ["proto:" + (hop.protocol if hop.protocol in _PROTOCOLS else "other" if hop.protocol else "none")]
    if hop.protocol in ("esmtpa", "esmtpsa", "asmtp"):
        out.append("authenticated")  # RFC 3848 §2: the client logged in (RFC 4954)
    helo_ip = _IP_LITERAL.match(hop.helo)
    if not hop.helo:
        out.append("helo-none")
    elif helo_ip:
        out.append("helo-ip" if helo_ip.group(1) == hop.ip or not hop.ip else "helo-ip-other")
    elif "." not in hop.helo:
        out.append("helo-no-dot")  # RFC 5321 §4.1.1.1: the EHLO argument is a fully qualified name
    # no reverse-DNS name written is no hint: the receiving software's format, nothing of the sender's
    if hop.rdns == "unknown":
        out.append("rdns-unknown")
    elif hop.rdns:
        if looks_dynamic(hop.rdns):
            out.append("rdns-dynamic")
        if hop.helo and not helo_ip and "." in hop.helo:
            same = registered_domain(hop.helo) == registered_domain(hop.rdns)
            out.append("helo-same-domain" if same else "helo-other-domain")
    return out


def hints(external: list[Hop]) -> set[str]:
    """Hint tokens of the hops whose client had a routable address (newest first).

    The entry hop (newest: where the message reached the receiving site) and the
    origin hop (oldest: where it entered the Internet) each give their single
    hints, every pair of them and the whole set: one hint alone is weak (an
    IP-literal HELO is three times commoner in spam, not ten), together they
    describe the sending software and its connection. The origin hop is left out
    when it is the entry hop, so one connection is not counted twice.
    """
    out = {"rcvd:any:proto:" + hop.protocol for hop in external if hop.protocol in _PROTOCOLS}
    chosen = [("entry", external[0]), ("origin", external[-1])] if external else []
    for name, hop in chosen[: 1 if len(external) == 1 else 2]:
        found = hop_hints(hop)
        out.update(f"rcvd:{name}:{hint}" for hint in found)
        out.update(f"rcvd:{name}:{a}+{b}" for i, a in enumerate(found) for b in found[i + 1 :])
        out.add(f"rcvd:{name}:" + "+".join(found))
    return out
