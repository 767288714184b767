"""DKIM signature verification (RFC 6376), with the algorithm rules of RFC 8301 and RFC 8463.

Owns: reading DKIM-Signature fields (the tag lists of §3.2 and the tags of §3.5), the names of
the keys they need (``key_names``, ``s._domainkey.d``, §3.6.2.1) for the gateway's resolver to
look up, the key records (§3.6.1) and the RSA public key in them (a bounded DER reader of a
SubjectPublicKeyInfo, RFC 5280 §4.1, or of a bare RSAPublicKey, RFC 8017 §A.1.1), the header and
body canonicalisations (§3.4), the body hash (bh=, §3.7) with the body length limit (l=), the
signature check (RSASSA-PKCS1-v1_5 with SHA-256, RFC 8017 §8.2.2; Ed25519 over SHA-256,
RFC 8463 §3), and the results named as Authentication-Results names them (RFC 8601 §2.7.1:
pass, fail, neutral, temperror, permerror, none), each with a short reason, and the
Authentication-Results field that states them (RFC 8601 §2.2, §5: ``stamp``).

A verification runs in a scanner worker (the RSA exponentiation is CPU work) on the keys the
main process looked up beforehand (``KeyAnswers``: per key name, the TXT strings or why there
are none). With no keys at all (``keys=None``: the offline tools, ``DKIMVerify=no``) every
well-formed signature is a temperror "key not looked up".

Must never: raise on any input (a malformed field, key or signature is a permerror with its
reason), look anything up itself, read more than ``MAX_SIGNATURES`` signatures or a field
longer than ``MAX_FIELD`` bytes, accept rsa-sha1 (RFC 8301 §3.1) or an RSA key shorter than
1024 bits (RFC 8301 §3.2), or compare a padded digest other than in constant time.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import contextvars
import hashlib
import hmac
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from smtpgw.mail import fields, headers
from smtpgw.update import ed25519

__all__ = [
    "PASS", "FAIL", "NEUTRAL", "TEMPERROR", "PERMERROR", "NONE", "MAX_SIGNATURES", "DKIMError", "KeyAnswers",
    "Key", "Result", "Signature", "authentication_results", "canonical_body", "canonical_header", "key_names",
    "parse_key", "parse_signature", "parse_tags", "rsa_public_key", "stamp", "unverified", "verified", "current",
    "verify",
]

# RFC 8601 §2.7.1 result names
PASS, FAIL, NEUTRAL, TEMPERROR, PERMERROR, NONE = "pass", "fail", "neutral", "temperror", "permerror", "none"

MAX_SIGNATURES = 4  # DKIM-Signature fields read per message, from the top (the newest signatures)
MAX_FIELD = 8192  # bytes of one DKIM-Signature field or key record read; a longer one is a permerror
MAX_SIGNED_HEADERS = 64  # names in h=
MAX_HEADER_FIELDS = 1000  # header fields of the message read for the signed ones
MIN_RSA_BITS = 1024  # RFC 8301 §3.2: smaller keys MUST NOT be considered valid
MAX_RSA_BITS = 8192  # a larger modulus costs more than any signer uses
MAX_RSA_EXPONENT_BITS = 64
KEY_HEAD = 64 * 1024  # bytes of the header a key-name reader looks at

# Per key name, what the lookup gave: {"txt": [strings]}, {"error": "nxdomain" | "nodata"} (no key:
# permerror), {"error": "temp: why"} (the DNS failed to answer: temperror), or {"error": "local: why"}
# (the gateway's own resolver made no query — overloaded or closing: neutral, RFC 8601 §2.7.1).
KeyAnswers = Mapping[str, Mapping[str, object]]

_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_FWS = re.compile(r"[ \t\r\n]+")
_TAG_VALUE = re.compile(r"[\x21-\x3a\x3c-\x7e]*(?:[ \t\r\n]+[\x21-\x3a\x3c-\x7e]+)*\Z")  # §3.2 tval *(FWS tval)
_DOMAIN = re.compile(r"(?=.{1,253}\Z)(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                     r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_DIGITS = re.compile(r"[0-9]{1,12}\Z")  # l=, t=, x= (§3.5: at most 76 digits; beyond 12 is no real time or length)
_D_TAG = re.compile(r"(?:^|;)\s*d\s*=\s*([A-Za-z0-9.-]{1,253})")  # d= as ``unverified`` reads it
_B_TAG = re.compile(rb"((?:^|;)[ \t\r\n]*b[ \t\r\n]*=)[^;]*")  # §3.7: the b= value emptied, not bh=
_WSP_RUN = re.compile(rb"[ \t]+")
_WSP_TO_FOLD = re.compile(rb"\t[ \t]*| [ \t]+")  # the runs other than one space: the same result, fewer edits
_EOL = re.compile(rb"\r?\n")
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")  # RFC 8017 §9.2 note 1
_RSA_OID = bytes.fromhex("2a864886f70d010101")  # 1.2.840.113549.1.1.1 rsaEncryption (RFC 8017 §A.1)


class DKIMError(ValueError):
    """A signature, key record or key that cannot be used; the message is the reason."""


@dataclass(frozen=True)
class Signature:
    """The tags of one DKIM-Signature field (§3.5) that a verification reads."""

    algorithm: str  # a=
    signature: bytes  # b=, decoded
    body_hash: bytes  # bh=, decoded
    header_canon: str  # c= header part: simple or relaxed
    body_canon: str  # c= body part
    domain: str  # d=, lower case
    selector: str  # s=
    headers: tuple[str, ...]  # h=, lower case, in order
    identity: str  # i= (default "@d")
    length: int | None  # l=
    timestamp: int | None  # t=
    expires: int | None  # x=

    @property
    def key_name(self) -> str:
        """§3.6.2.1: where the public key is published."""
        return f"{self.selector}._domainkey.{self.domain}"


@dataclass(frozen=True)
class Result:
    """The outcome of one signature (or ``none`` for a message without any)."""

    result: str
    reason: str
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    whole_body: bool = True  # False: l= left part of the body unsigned

    def describe(self) -> str:
        """``dkim=pass d=example.com``, as a sign's reason quotes it."""
        return f"dkim={self.result} d={self.domain}" if self.domain else f"dkim={self.result}"


@dataclass
class _Message:
    """A message as canonicalisation reads it: its header fields (lower name, bytes with CRLF line
    endings, without the last one) top to bottom, and its body with CRLF line endings."""

    fields: list[tuple[str, bytes]] = field(default_factory=list)
    body: bytes = b""


# region tag lists, signatures, keys


def parse_tags(text: str) -> dict[str, str]:
    """§3.2: ``tag=value; ...`` → {tag: value} with the surrounding white space removed. A tag seen
    twice, a bad tag name or a value with characters outside §3.2's tval is a DKIMError."""
    if len(text) > MAX_FIELD:
        raise DKIMError("tag list too long")
    tags: dict[str, str] = {}
    specs = text.split(";")
    if specs and not specs[-1].strip(" \t\r\n"):
        specs.pop()  # a trailing ";" is allowed
    for spec in specs:
        name, equals, value = spec.partition("=")
        name, value = name.strip(" \t\r\n"), value.strip(" \t\r\n")
        if not equals or not _TAG_NAME.match(name):
            raise DKIMError(f"malformed tag {spec.strip()[:20]!r}")
        if name in tags:
            raise DKIMError(f"tag {name}= given twice")
        if not _TAG_VALUE.match(value):
            raise DKIMError(f"bad characters in {name}=")
        tags[name] = value
    return tags


def _base64(value: str, tag: str) -> bytes:
    try:
        return base64.b64decode(_FWS.sub("", value), validate=True)
    except (binascii.Error, ValueError):
        raise DKIMError(f"{tag}= is not base64") from None


def _number(tags: dict[str, str], tag: str) -> int | None:
    if tag not in tags:
        return None
    if not _DIGITS.match(tags[tag]):
        raise DKIMError(f"{tag}= is not a number")
    return int(tags[tag])


def _canonicalisations(value: str) -> tuple[str, str]:
    """§3.5 c=: ``header/body``, the body part defaulting to simple."""
    header, _, body = value.lower().partition("/")
    body = body or "simple"
    if header not in ("simple", "relaxed") or body not in ("simple", "relaxed"):
        raise DKIMError(f"unknown canonicalization c={value[:30]}")
    return header, body


def parse_signature(value: str) -> Signature:
    """One DKIM-Signature field value → its Signature; DKIMError (a permerror) when it is not one."""
    tags = parse_tags(value)
    missing = [tag for tag in ("v", "a", "b", "bh", "d", "h", "s") if tag not in tags]
    if missing:
        raise DKIMError(f"missing tag {missing[0]}=")  # §6.1.1
    if tags["v"] != "1":
        raise DKIMError(f"unknown version v={tags['v'][:10]}")
    domain, selector = tags["d"].lower().rstrip("."), tags["s"]
    if not _DOMAIN.match(domain) or not _DOMAIN.match(selector) or len(selector) + len(domain) > 241:
        raise DKIMError("d= or s= is not a domain name")  # s._domainkey.d must be one too (253 octets)
    headers = tuple(name.strip(" \t\r\n").lower() for name in tags["h"].split(":"))
    if len(headers) > MAX_SIGNED_HEADERS or not all(headers):
        raise DKIMError("malformed h=")
    if "from" not in headers:
        raise DKIMError("From is not signed")  # §5.4: the From field MUST be signed
    identity = tags.get("i", f"@{domain}")
    i_domain = identity.rpartition("@")[2].lower().rstrip(".")
    if "@" not in identity or not (i_domain == domain or i_domain.endswith("." + domain)):
        raise DKIMError("i= is not in d= or a subdomain of it")  # §3.5 i=, §6.1.1
    if "dns/txt" not in [q.strip(" \t\r\n").lower() for q in tags.get("q", "dns/txt").split(":")]:
        raise DKIMError("no supported query method in q=")
    header_canon, body_canon = _canonicalisations(tags.get("c", "simple/simple"))
    timestamp, expires = _number(tags, "t"), _number(tags, "x")
    if timestamp is not None and expires is not None and expires < timestamp:
        raise DKIMError("x= before t=")  # §3.5 x=
    return Signature(
        algorithm=tags["a"].lower(), signature=_base64(tags["b"], "b"), body_hash=_base64(tags["bh"], "bh"),
        header_canon=header_canon, body_canon=body_canon, domain=domain, selector=selector, headers=headers,
        identity=identity, length=_number(tags, "l"), timestamp=timestamp, expires=expires,
    )


@dataclass(frozen=True)
class Key:
    """A key record (§3.6.1) as a verification uses it."""

    kind: str  # k=: rsa or ed25519
    data: bytes  # p=, decoded
    hashes: tuple[str, ...]  # h=, empty: any
    strict: bool  # t=s: i= must be in d= itself, not a subdomain


def parse_key(record: str) -> Key:
    """§3.6.1 key record → Key; DKIMError (a permerror) when it is unusable, revoked (empty p=)
    included."""
    tags = parse_tags(record)
    if tags.get("v", "DKIM1") != "DKIM1" or ("v" in tags and not record.lstrip().startswith("v")):
        raise DKIMError("not a DKIM1 key record")  # §3.6.1 v=: if present, the first tag
    if "p" not in tags:
        raise DKIMError("key record without p=")
    data = _base64(tags["p"], "p")
    if not data:
        raise DKIMError("key revoked (empty p=)")  # §3.6.1 p=
    services = [s.strip(" \t\r\n").lower() for s in tags.get("s", "*").split(":")]
    if "*" not in services and "email" not in services:
        raise DKIMError("key not for email (s=)")
    flags = [f.strip(" \t\r\n").lower() for f in tags.get("t", "").split(":")]
    hashes = tuple(h.strip(" \t\r\n").lower() for h in tags["h"].split(":")) if "h" in tags else ()
    return Key(kind=tags.get("k", "rsa").lower(), data=data, hashes=hashes, strict="s" in flags)


def _der(data: bytes, pos: int, expected: int) -> tuple[bytes, int]:
    """One DER element of tag ``expected`` at ``pos`` (X.690 §8.1): (its content, the offset after it)."""
    if pos + 2 > len(data) or data[pos] != expected:
        raise DKIMError("malformed public key")
    length, pos = data[pos + 1], pos + 2
    if length & 0x80:  # long form: the next (length & 0x7f) bytes, at most 4
        count = length & 0x7F
        if not 1 <= count <= 4 or pos + count > len(data):
            raise DKIMError("malformed public key")
        length, pos = int.from_bytes(data[pos:pos + count], "big"), pos + count
    if pos + length > len(data):
        raise DKIMError("malformed public key")
    return data[pos:pos + length], pos + length


def _rsa_numbers(sequence: bytes) -> tuple[int, int]:
    """RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER } (RFC 8017 §A.1.1), its content."""
    modulus, pos = _der(sequence, 0, 0x02)
    exponent, _ = _der(sequence, pos, 0x02)
    return int.from_bytes(modulus, "big"), int.from_bytes(exponent, "big")


def rsa_public_key(der: bytes) -> tuple[int, int]:
    """(n, e) from a SubjectPublicKeyInfo (RFC 5280 §4.1.2.7, what §3.6.1 p= holds) or a bare
    RSAPublicKey, which some signers publish; DKIMError for anything else or a key out of bounds."""
    outer, end = _der(der, 0, 0x30)
    if end != len(der):
        raise DKIMError("malformed public key")
    if outer[:1] == b"\x02":
        n, e = _rsa_numbers(outer)
    else:
        algorithm, pos = _der(outer, 0, 0x30)
        oid, _ = _der(algorithm, 0, 0x06)
        if oid != _RSA_OID:
            raise DKIMError("not an RSA public key")
        bits, _ = _der(outer, pos, 0x03)
        if bits[:1] != b"\x00":
            raise DKIMError("malformed public key")
        inner, _ = _der(bits[1:], 0, 0x30)
        n, e = _rsa_numbers(inner)
    if n.bit_length() < MIN_RSA_BITS:
        raise DKIMError(f"RSA key of {n.bit_length()} bits, under {MIN_RSA_BITS}")  # RFC 8301 §3.2
    if n.bit_length() > MAX_RSA_BITS or not 3 <= e < n or e.bit_length() > MAX_RSA_EXPONENT_BITS or not e & 1:
        raise DKIMError("RSA key out of bounds")
    return n, e


def rsa_sha256_valid(n: int, e: int, signature: bytes, digest: bytes) -> bool:
    """RSASSA-PKCS1-v1_5 verification with SHA-256 (RFC 8017 §8.2.2): the signature's length, s < n,
    then EMSA-PKCS1-v1_5 of ``digest`` compared with s^e mod n in constant time."""
    size = (n.bit_length() + 7) // 8
    s = int.from_bytes(signature, "big")
    if len(signature) != size or s >= n:
        return False
    padded = pow(s, e, n).to_bytes(size, "big")
    info = _SHA256_DIGEST_INFO + digest
    expected = b"\x00\x01" + b"\xff" * (size - len(info) - 3) + b"\x00" + info
    return hmac.compare_digest(padded, expected)
# endregion


# region canonicalisation (§3.4)


def canonical_header(name: str, raw_field: bytes, method: str) -> bytes:
    """One header field (bytes as in the message, CRLF line endings, no last CRLF) in the ``method``
    canonicalisation, ending with CRLF. relaxed (§3.4.2): name in lower case, unfolded, white space
    runs made one space, none at the end of the value or around the colon."""
    if method == "simple":  # §3.4.1: unchanged
        return raw_field + b"\r\n"
    value = raw_field.split(b":", 1)[1] if b":" in raw_field else b""
    value = _WSP_RUN.sub(b" ", value.replace(b"\r\n", b"")).strip(b" ")
    return name.encode("ascii", "replace") + b":" + value + b"\r\n"


def canonical_body(body: bytes, method: str) -> bytes:
    """The body (CRLF line endings) in the ``method`` canonicalisation. simple (§3.4.3): empty lines
    at the end removed, an empty body is one CRLF. relaxed (§3.4.4): white space at line ends
    removed and runs of it made one space, empty lines at the end removed (an empty body stays
    empty)."""
    if method == "relaxed":  # runs made one space first: then a line ends in at most one
        body = _WSP_TO_FOLD.sub(b" ", body).replace(b" \r\n", b"\r\n")
        body = body[:-1] if body.endswith(b" ") else body
    body = body.rstrip(b"\r\n")
    if body:
        return body + b"\r\n"
    return b"" if method == "relaxed" else b"\r\n"


def _crlf(data: bytes) -> bytes:
    """Line endings as CRLF (§5.3: a verifier sees the message in its network form)."""
    return data if data.count(b"\n") == data.count(b"\r\n") else _EOL.sub(b"\r\n", data)


def _read_message(raw: bytes, max_fields: int = MAX_HEADER_FIELDS) -> _Message:
    header = fields.split(raw, fields.message_start(raw), max_fields=max_fields)
    message = _Message(body=_crlf(raw[header.body:]))
    for found in header.fields:
        text = _crlf(raw[found.start:found.end])
        message.fields.append((found.name, text[:-2] if text.endswith(b"\r\n") else text))
    return message


def _may_be_signed(raw: bytes) -> bool:
    """False when the header block holds no DKIM-Signature field: a field name is one run of
    bytes there, so a message without that run needs no header split (nor body copy)."""
    return b"dkim-signature" in raw[: headers.header_end(raw)].lower()


def _signature_fields(message: _Message) -> list[bytes]:
    return [text for name, text in message.fields if name == "dkim-signature"][:MAX_SIGNATURES]


def _value_of(text: bytes) -> str:
    return text.split(b":", 1)[1].decode("latin-1") if b":" in text else ""
# endregion


# region verification


def key_names(raw: bytes) -> list[str]:
    """The key names (``s._domainkey.d``) of the well-formed signatures among the first
    ``MAX_SIGNATURES`` of the message, for the lookup before a verification; reads only the
    first ``KEY_HEAD`` bytes."""
    head = raw[:KEY_HEAD]
    names: list[str] = []
    if not _may_be_signed(head):
        return names
    for text in _signature_fields(_read_message(head)):
        with contextlib.suppress(DKIMError):
            if len(text) <= MAX_FIELD:
                name = parse_signature(_value_of(text)).key_name
                if name not in names:
                    names.append(name)
    return names


def _selected_headers(message: _Message, signature: Signature, own: bytes) -> bytes:
    """§5.4.2: for each name in h=, the last instance not yet used, from the bottom up (a name with
    none left adds nothing); then the signature field itself with b= emptied and no last CRLF (§3.7)."""
    used: set[int] = set()
    out: list[bytes] = []
    for name in signature.headers:
        for index in range(len(message.fields) - 1, -1, -1):
            if index not in used and message.fields[index][0] == name:
                used.add(index)
                out.append(canonical_header(name, message.fields[index][1], signature.header_canon))
                break
    name, _, value = own.partition(b":")
    emptied = name + b":" + _B_TAG.sub(lambda m: m.group(1), value)
    out.append(canonical_header("dkim-signature", emptied, signature.header_canon)[:-2])
    return b"".join(out)


def _check_key(signature: Signature, answer: Mapping[str, object] | None) -> Key | Result:
    """§6.1.2: the key for ``signature`` from its lookup (None: none was made for it), or the Result
    that ends the verification."""
    def ends(result: str, reason: str) -> Result:
        return Result(result, reason, signature.domain, signature.selector, signature.algorithm)

    if answer is None:  # a lookup was made for every signature it could have been made for
        return ends(PERMERROR, "key not looked up (signature beyond the first 64 KB)")
    error = str(answer.get("error", ""))
    if error in ("nxdomain", "nodata"):
        return ends(PERMERROR, f"no key for selector {signature.selector} ({error})")
    if error == "bad-name":  # a name no DNS can hold is the signer's error, not the DNS's
        return ends(PERMERROR, "key name is not a domain name")
    if error.startswith("local:"):  # not the signer's DNS: what a flood of our own resolver gives
        return ends(NEUTRAL, f"key not looked up ({error[6:60].strip()})")
    if error:
        return ends(TEMPERROR, f"key lookup failed ({error[:60]})")
    records = [str(r) for r in answer.get("txt", []) or []][:4]  # type: ignore[union-attr]
    reasons = []
    for record in records:
        try:
            return parse_key(record[:MAX_FIELD + 1])
        except DKIMError as exc:
            reasons.append(str(exc))
    return ends(PERMERROR, reasons[0] if reasons else "no key record")


def _verify_one(message: _Message, own: bytes, keys: KeyAnswers | None, now: float) -> Result:
    if len(own) > MAX_FIELD:
        return Result(PERMERROR, "DKIM-Signature field too long")
    try:
        signature = parse_signature(_value_of(own))
    except DKIMError as exc:
        return Result(PERMERROR, str(exc))

    def ends(result: str, reason: str, whole: bool = True) -> Result:
        return Result(result, reason, signature.domain, signature.selector, signature.algorithm, whole)

    if signature.algorithm == "rsa-sha1":
        return ends(PERMERROR, "rsa-sha1 is not accepted (RFC 8301 §3.1)")
    if signature.algorithm not in ("rsa-sha256", "ed25519-sha256"):
        return ends(NEUTRAL, f"unsupported algorithm {signature.algorithm[:30]}")
    if signature.expires is not None and signature.expires < now:
        return ends(PERMERROR, "signature expired (x=)")  # §3.5 x=, §6.1.1
    if keys is None:
        return ends(TEMPERROR, "key not looked up")
    key = _check_key(signature, keys.get(signature.key_name))
    if isinstance(key, Result):
        return key
    if key.kind != signature.algorithm.split("-")[0]:
        return ends(PERMERROR, f"key type k={key.kind[:10]} does not match a={signature.algorithm}")
    if key.hashes and "sha256" not in key.hashes:
        return ends(PERMERROR, "key does not allow sha256 (h=)")
    if key.strict and signature.identity.rpartition("@")[2].lower().rstrip(".") != signature.domain:
        return ends(PERMERROR, "key has t=s and i= is a subdomain of d=")  # §3.6.1 t=s
    body = canonical_body(message.body, signature.body_canon)
    size = len(body)
    if signature.length is not None:
        if signature.length > size:
            return ends(FAIL, "l= longer than the body")
        body = body[:signature.length]
    if not hmac.compare_digest(hashlib.sha256(body).digest(), signature.body_hash):
        return ends(FAIL, "body hash mismatch (bh=)")  # §6.1.3 step 3
    digest = hashlib.sha256(_selected_headers(message, signature, own)).digest()
    try:
        if key.kind == "rsa":
            n, e = rsa_public_key(key.data)
            valid = rsa_sha256_valid(n, e, signature.signature, digest)
        else:  # RFC 8463 §3: Ed25519 signs the SHA-256 of the data; §4: p= is the raw 32-byte key
            valid = ed25519.verify(key.data, digest, signature.signature)
    except DKIMError as exc:
        return ends(PERMERROR, str(exc))
    if not valid:
        return ends(FAIL, "signature does not verify")
    if len(body) < size:  # l=: what follows the signed part could be anything (§8.2)
        return ends(PASS, f"body signed only in part (l={len(body)} of {size} octets)", False)
    return ends(PASS, "good signature")


def verify(raw: bytes, keys: KeyAnswers | None, now: float | None = None) -> list[Result]:
    """The results of the first ``MAX_SIGNATURES`` DKIM-Signature fields of ``raw`` (top to bottom);
    ``[Result(none)]`` when it has none. ``keys`` as looked up for ``key_names(raw)``; None: no key
    was looked up (each well-formed signature is a temperror)."""
    try:
        message = _read_message(raw) if _may_be_signed(raw) else _Message(body=b"")
        owns = _signature_fields(message)
        if not owns:
            return [Result(NONE, "no signature")]
        when = time.time() if now is None else now
        return [_verify_one(message, own, keys, when) for own in owns]
    except Exception as exc:  # never raise on any input: say what broke
        return [Result(PERMERROR, f"unreadable message ({type(exc).__name__})")]


def unverified(values: list[str]) -> list[Result]:
    """Results for signature values read but not verified (no key lookups, no message bytes: the
    offline tools, ``DKIMVerify=no``): each of the first ``MAX_SIGNATURES`` with a d= is a
    temperror of that domain, whatever its other tags say (a copy of a message, such as a corpus
    with its tags blanked out, keeps its d=); one without d= is a permerror."""
    results = []
    for value in values[:MAX_SIGNATURES]:
        match = _D_TAG.search(value[:MAX_FIELD])
        if match is None:
            results.append(Result(PERMERROR, "missing tag d="))
        else:
            results.append(Result(TEMPERROR, "not verified", match.group(1).lower().strip(".")))
    return results or [Result(NONE, "no signature")]


def authentication_results(authserv_id: str, results: list[Result]) -> str:
    """The value of an Authentication-Results field (RFC 8601 §2.2) for ``results``: one
    ``dkim=`` result per signature, with its reason and the d= and s= it names."""
    parts = [authserv_id]
    for r in results:
        reason = "".join(c for c in r.reason if " " <= c <= "~" and c not in '"\\')[:80]
        entry = f'dkim={r.result} reason="{reason}"'
        if r.domain:
            entry += f" header.d={r.domain} header.s={r.selector}"
        parts.append(entry)
    return "; ".join(parts)


def _authserv_id(value: bytes) -> str:
    return value.split(b";", 1)[0].strip().lower().decode("latin-1")


def stamp(raw: bytes, authserv_id: str, results: list[Result]) -> bytes:
    """``raw`` with our Authentication-Results field on top, and any field claiming our
    ``authserv_id`` that came with the message removed: a forgery (RFC 8601 §5)."""
    ours = authserv_id.lower()
    out = headers.remove(raw, "Authentication-Results", lambda value: _authserv_id(value) == ours)
    return headers.prepend(out, [("Authentication-Results", authentication_results(authserv_id, results))])
# endregion


# region the results of the message being classified
_CURRENT: contextvars.ContextVar[list[Result] | None] = contextvars.ContextVar("dkim_results", default=None)


@contextlib.contextmanager
def verified(results: list[Result] | None) -> Iterator[None]:
    """Within the block, ``current()`` is ``results``: the verification a scanner worker made for the
    message it classifies, read by the anti-spam signs."""
    token = _CURRENT.set(results)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> list[Result] | None:
    """The results set by ``verified``, or None when no verification ran for this message."""
    return _CURRENT.get()
# endregion
