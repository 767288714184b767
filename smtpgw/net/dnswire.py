"""The DNS wire format (RFC 1035 §4) for the record types the gateway needs.

Owns: domain names (checking, IDNA normalisation, encoding, decoding compressed names with
protection against pointer loops, reverse-lookup names), record type codes and RCODE values,
building a recursive query (with an EDNS0 OPT record, RFC 6891) and parsing a reply's header,
question, answer and authority sections, and decoding the record data of A, AAAA, MX, TXT, PTR,
CNAME and SOA records.

Must never: touch a socket, a clock or a cache (that is ``smtpgw.dns``, the resolver), let a
malformed message raise anything but ``DNSFormatError`` out of the parser, or do work out of
proportion to the message's length (every name, pointer chain and record count is bounded).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "A", "AAAA", "CNAME", "MX", "NS", "OPT", "PTR", "SOA", "TXT", "CLASS_IN", "TYPE_CODES", "TYPE_NAMES",
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "FLAG_QR", "FLAG_TC", "FLAG_RD",
    "EDNS_PAYLOAD", "MAX_LABEL", "MAX_NAME_WIRE", "MAX_POINTERS",
    "DNSFormatError", "Message", "Record",
    "build_query", "encode_name", "normalise_name", "parse_header", "parse_message", "rdtype_code",
    "read_name", "reverse_labels", "reverse_name",
]

# region Protocol constants (RFC 1035 §3.2.2, RFC 3596 §2.1, RFC 6891 §6.1.1)
A, NS, CNAME, SOA, PTR, MX, TXT, AAAA, OPT = 1, 2, 5, 6, 12, 15, 16, 28, 41
CLASS_IN = 1
TYPE_CODES = {"A": A, "NS": NS, "CNAME": CNAME, "SOA": SOA, "PTR": PTR, "MX": MX, "TXT": TXT, "AAAA": AAAA}
TYPE_NAMES = {code: name for name, code in TYPE_CODES.items()}

# RFC 1035 §4.1.1 RCODE values.
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5

# RFC 1035 §4.1.1 header flags: QR (a response), TC (truncated), RD (recursion desired).
FLAG_QR = 0x8000
FLAG_TC = 0x0200
FLAG_RD = 0x0100
_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")

MAX_NAME_WIRE = 255  # RFC 1035 §2.3.4: a name is at most 255 octets on the wire
MAX_LABEL = 63  # RFC 1035 §2.3.4
# Printable ASCII but "." and "\\": what a label may hold in our query names and in plain output.
_LABEL_CHARS = r"[!-\-/-\[\]-~]"
_NAME = re.compile(rf"(?:{_LABEL_CHARS}{{1,{MAX_LABEL}}}\.)*{_LABEL_CHARS}{{1,{MAX_LABEL}}}")
_PLAIN_LABEL = re.compile(_LABEL_CHARS.encode("ascii") + b"*")
# A name has at most 127 labels, so a well-formed name never needs more pointers than that.
MAX_POINTERS = 127
EDNS_PAYLOAD = 1232  # RFC 6891 §6.2.5 UDP size; 1232 avoids IP fragmentation (DNS flag day 2020)
# endregion


class DNSFormatError(ValueError):
    """A DNS message that does not parse; never escapes the resolver."""


# region Names
def normalise_name(name: str) -> str:
    """A query name in the form the cache keys on: ASCII (IDNA), lower case, no trailing dot.

    Raises ValueError for a name that cannot be put on the wire. The root is "".
    """
    text = name.strip()
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")  # RFC 3490 ToASCII
        except UnicodeError as exc:
            raise ValueError(f"not a valid internationalised name: {name!r}") from exc
    return _checked(text).lower()


def _checked(name: str) -> str:
    """``name`` without its trailing dot, or ValueError when it cannot be put on the wire."""
    text = name[:-1] if name.endswith(".") else name
    # RFC 1035 §2.3.4: labels of 1-63 octets, 255 octets in all (two more than the dotted text).
    if text and (not text.isascii() or len(text) > MAX_NAME_WIRE - 2 or _NAME.fullmatch(text) is None):
        raise ValueError(f"not a valid domain name: {name!r}")
    return text


def encode_name(name: str) -> bytes:
    """Uncompressed wire form of a dotted ASCII name (RFC 1035 §3.1)."""
    text = _checked(name)
    if not text:
        return b"\0"
    return b"".join(bytes((len(label),)) + label.encode("ascii") for label in text.split(".")) + b"\0"


def _label_text(raw: bytes) -> str:
    """Presentation form of one label; dots, backslashes and unprintables as \\DDD (RFC 1035 §5.1)."""
    if _PLAIN_LABEL.fullmatch(raw):
        return raw.decode("ascii")
    return "".join(chr(b) if _PLAIN_LABEL.fullmatch(bytes((b,))) else f"\\{b:03d}" for b in raw)


def read_name(msg: bytes, offset: int) -> tuple[str, int]:
    """Decode the possibly compressed name at ``offset``; return (name, offset after it).

    The root is returned as ".", other names without the trailing dot.
    """
    labels: list[str] = []
    wire_length = 1
    pos = offset
    after: int | None = None
    floor = offset  # every pointer must go strictly below the last place jumped to
    pointers = 0
    while True:  # bounded: labels by the 255-octet limit, jumps by ``pointers``
        if pos >= len(msg):
            raise DNSFormatError("name runs past the end of the message")
        length = msg[pos]
        kind = length & 0xC0
        if kind == 0xC0:
            # RFC 1035 §4.1.4: a pointer names a prior occurrence. Requiring each jump to land
            # strictly before the previous one makes every pointer chain finite (no loops).
            if pos + 1 >= len(msg):
                raise DNSFormatError("truncated compression pointer")
            target = ((length & 0x3F) << 8) | msg[pos + 1]
            pointers += 1
            if target >= floor or pointers > MAX_POINTERS:
                raise DNSFormatError("compression pointer loops or does not point backwards")
            if after is None:
                after = pos + 2
            floor = pos = target
            continue
        if kind:
            raise DNSFormatError("unsupported label type")  # RFC 6891 §5: extended labels are gone
        if length == 0:
            return (".".join(labels) or "."), (after if after is not None else pos + 1)
        raw = msg[pos + 1 : pos + 1 + length]
        if len(raw) != length:
            raise DNSFormatError("label runs past the end of the message")
        wire_length += length + 1
        if wire_length > MAX_NAME_WIRE:
            raise DNSFormatError("name longer than 255 octets")
        labels.append(_label_text(raw))
        pos += 1 + length


def reverse_labels(ip: str) -> str:
    """The address as reversed labels without a suffix: ``d.c.b.a`` or 32 nibbles (RFC 5782 §2.4).

    An IPv4-mapped IPv6 address is treated as the IPv4 address it carries. Raises ValueError.
    """
    address = ipaddress.ip_address(ip.strip().split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.reverse_pointer.rsplit(".", 2)[0]


def reverse_name(ip: str) -> str:
    """The PTR name of an address: ``d.c.b.a.in-addr.arpa`` (RFC 1035 §3.5) or ``...ip6.arpa`` (RFC 3596 §2.5)."""
    labels = reverse_labels(ip)
    return labels + (".in-addr.arpa" if labels.count(".") == 3 else ".ip6.arpa")


def rdtype_code(rdtype: int | str) -> int:
    """A record type given as a code or a mnemonic ("MX")."""
    if isinstance(rdtype, str):
        try:
            return TYPE_CODES[rdtype.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown record type {rdtype!r}") from None
    if not 0 < rdtype < 65536:
        raise ValueError(f"record type out of range: {rdtype}")
    return rdtype
# endregion


# region Messages
@dataclass(frozen=True)
class Record:
    """One resource record; ``data`` is decoded for the types the resolver understands.

    A/AAAA: address str; MX: (preference, host); TXT: the joined strings; PTR/CNAME: host;
    SOA: the negative-caching TTL min(MINIMUM, ttl) (RFC 2308 §5); other types: None.
    """

    name: str
    rdtype: int
    rdclass: int
    ttl: int
    data: Any


@dataclass
class Message:
    id: int
    flags: int
    rcode: int
    question: tuple[str, int, int] | None
    answers: list[Record] = field(default_factory=list)
    authority: list[Record] = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        return bool(self.flags & FLAG_TC)


def build_query(qid: int, name: str, rdtype: int, edns: bool = True) -> bytes:
    """A recursive query (RD set, RFC 1035 §4.1.1), with an EDNS0 OPT record when ``edns``."""
    header = _HEADER.pack(qid, FLAG_RD, 1, 0, 0, 1 if edns else 0)
    body = encode_name(name) + struct.pack("!HH", rdtype, CLASS_IN)
    if edns:
        # RFC 6891 §6.1.2: root owner, TYPE OPT, CLASS = UDP payload size, TTL = ext-rcode/version/flags.
        body += b"\0" + struct.pack("!HHIH", OPT, EDNS_PAYLOAD, 0, 0)
    return header + body


def _read_question(msg: bytes, pos: int) -> tuple[tuple[str, int, int], int]:
    name, pos = read_name(msg, pos)
    if pos + 4 > len(msg):
        raise DNSFormatError("truncated question")
    qtype, qclass = struct.unpack_from("!HH", msg, pos)
    return (name, qtype, qclass), pos + 4


def _character_strings(rdata: bytes) -> list[bytes]:
    """RFC 1035 §3.3: <character-string> is a length octet followed by that many octets."""
    parts: list[bytes] = []
    pos = 0
    while pos < len(rdata):
        end = pos + 1 + rdata[pos]
        if end > len(rdata):
            raise DNSFormatError("TXT string runs past its record")
        parts.append(rdata[pos + 1 : end])
        pos = end
    return parts


def _rdata_name(msg: bytes, pos: int, end: int) -> str:
    name, after = read_name(msg, pos)
    if after > end:
        raise DNSFormatError("name runs past its record")
    return name


def _decode_rdata(msg: bytes, rdtype: int, pos: int, end: int) -> Any:
    rdata = msg[pos:end]
    if rdtype == A:
        if len(rdata) != 4:
            raise DNSFormatError("A record is not 4 octets")
        return socket.inet_ntop(socket.AF_INET, rdata)
    if rdtype == AAAA:
        if len(rdata) != 16:
            raise DNSFormatError("AAAA record is not 16 octets")
        return socket.inet_ntop(socket.AF_INET6, rdata)
    if rdtype == MX:
        if len(rdata) < 3:
            raise DNSFormatError("MX record too short")
        return struct.unpack_from("!H", msg, pos)[0], _rdata_name(msg, pos + 2, end)
    if rdtype in (PTR, CNAME):
        return _rdata_name(msg, pos, end)
    if rdtype == TXT:
        # RFC 7208 §3.3: the strings of one TXT record are joined without separator.
        return b"".join(_character_strings(rdata)).decode("utf-8", "replace")
    if rdtype == SOA:
        _, after = read_name(msg, pos)
        _, after = read_name(msg, after)
        if after + 20 > end:
            raise DNSFormatError("SOA record too short")
        return struct.unpack_from("!5I", msg, after)[4]
    return None


def _read_record(msg: bytes, pos: int) -> tuple[Record, int]:
    name, pos = read_name(msg, pos)
    if pos + _RR_FIXED.size > len(msg):
        raise DNSFormatError("truncated resource record")
    rdtype, rdclass, ttl, rdlength = _RR_FIXED.unpack_from(msg, pos)
    start = pos + _RR_FIXED.size
    end = start + rdlength
    if end > len(msg):
        raise DNSFormatError("record data runs past the end of the message")
    if ttl & 0x80000000:
        ttl = 0  # RFC 2181 §8: a TTL with the top bit set is treated as zero
    data = _decode_rdata(msg, rdtype, start, end)
    if rdtype == SOA:
        data = min(data, ttl)
    return Record(name, rdtype, rdclass, ttl, data), end


def parse_header(msg: bytes) -> tuple[int, int, int]:
    """(id, flags, qdcount) of a message, or DNSFormatError when shorter than a header."""
    if len(msg) < _HEADER.size:
        raise DNSFormatError("shorter than a DNS header")
    qid, flags, qdcount, _, _, _ = _HEADER.unpack_from(msg, 0)
    return qid, flags, qdcount


def parse_message(msg: bytes, sections: bool = True) -> Message:
    """Parse header, question and (when ``sections``) the answer and authority sections.

    The additional section is not needed by a stub resolver and is not read. Every record
    consumes at least 11 octets and every name at most 255 plus 127 jumps, so a hostile
    message costs work in proportion to its length.
    """
    qid, flags, qdcount = parse_header(msg)
    _, _, _, ancount, nscount, _ = _HEADER.unpack_from(msg, 0)
    if qdcount > 1:
        raise DNSFormatError("more than one question")
    question, pos = (None, _HEADER.size)
    if qdcount:
        question, pos = _read_question(msg, pos)
    message = Message(qid, flags, flags & 0x000F, question)
    if sections:
        for count, target in ((ancount, message.answers), (nscount, message.authority)):
            for _ in range(count):
                record, pos = _read_record(msg, pos)
                target.append(record)
    return message
# endregion
