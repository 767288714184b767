"""A DKIM signer for the tests (RFC 6376 §5), with keys made by the ``openssl`` command line.

Owns: making RSA and Ed25519 key pairs (``openssl genpkey``) and their key records (§3.6.1),
and signing a message: canonicalisation written here from §3.4 (on purpose apart from
``smtpgw.mail.dkim``, so that the tests check the verifier against the RFC, not against itself),
the body hash, and the signature by ``openssl dgst -sign`` (RSASSA-PKCS1-v1_5) or
``openssl pkeyutl -sign -rawin`` (Ed25519 over the SHA-256 of the data, RFC 8463 §3).

Must never: be used outside the tests, or hide an openssl failure (it raises).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
from dataclasses import dataclass

from tests.support.components import which

__all__ = ["DKIMKey", "make_key", "sign", "txt_record_args"]


@dataclass(frozen=True)
class DKIMKey:
    kind: str  # rsa or ed25519
    private_pem: str  # path
    public: bytes  # what p= holds: SubjectPublicKeyInfo DER (rsa) or the raw 32 bytes (ed25519)

    def record(self, extra: str = "") -> str:
        """The key record (§3.6.1) to publish at ``selector._domainkey.domain``."""
        return f"v=DKIM1; k={self.kind}; {extra}p={base64.b64encode(self.public).decode()}"


def _openssl(*args: str, data: bytes | None = None) -> bytes:
    program = which("openssl")
    if program is None:
        raise RuntimeError("openssl not installed")
    return subprocess.run([program, *args], input=data, capture_output=True, check=True, timeout=60).stdout


def make_key(folder: str, name: str, kind: str = "rsa", bits: int = 2048) -> DKIMKey:
    """A new key pair in ``folder``: RSA of ``bits`` bits, or Ed25519."""
    path = os.path.join(folder, f"{name}.pem")
    if kind == "rsa":
        _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{bits}", "-out", path)
    else:
        _openssl("genpkey", "-algorithm", "ed25519", "-out", path)
    der = _openssl("pkey", "-in", path, "-pubout", "-outform", "DER")
    return DKIMKey(kind, path, der if kind == "rsa" else der[-32:])


# -- canonicalisation, from RFC 6376 §3.4 --------------------------------------------------


def _relaxed_header(field: bytes) -> bytes:
    """§3.4.2: lower-case name, unfolded, WSP runs to one SP, no WSP at the end or around the colon."""
    name, value = field.split(b":", 1)
    value = re.sub(rb"[ \t]+", b" ", re.sub(rb"\r\n(?=[ \t])", b"", value)).strip(b" ")
    return name.strip(b" \t").lower() + b":" + value


def _body(body: bytes, canon: str) -> bytes:
    """§3.4.3 (simple) and §3.4.4 (relaxed)."""
    lines = body.split(b"\r\n")
    if canon == "relaxed":
        lines = [re.sub(rb"[ \t]+", b" ", line).rstrip(b" ") for line in lines]
    while lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        return b"" if canon == "relaxed" else b"\r\n"
    return b"\r\n".join(lines) + b"\r\n"


def _fields(head: bytes) -> list[bytes]:
    out: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += b"\r\n" + line
        elif line:
            out.append(line)
    return out


def sign(message: bytes, key: DKIMKey, domain: str, selector: str,
         headers: tuple[str, ...] = ("from", "to", "subject", "date", "message-id"),
         canon: str = "relaxed/relaxed", length: int | None = None, algorithm: str = "",
         extra_tags: str = "") -> bytes:
    """``message`` (CRLF line endings) with a DKIM-Signature field on top."""
    head, body = message.split(b"\r\n\r\n", 1)
    header_canon, body_canon = canon.split("/")
    canonical = _body(body, body_canon)
    if length is not None:
        canonical = canonical[:length]
    algorithm = algorithm or ("rsa-sha256" if key.kind == "rsa" else "ed25519-sha256")
    digest = "sha1" if algorithm == "rsa-sha1" else "sha256"
    bh = base64.b64encode(hashlib.new(digest, canonical).digest()).decode()
    tags = (f"v=1; a={algorithm}; c={canon}; d={domain}; s={selector};{extra_tags}"
            + (f" l={length};" if length is not None else "")
            + f"\r\n\th={':'.join(headers)}; bh={bh};\r\n\tb=")
    field = b"DKIM-Signature: " + tags.encode()
    available = _fields(head)
    data = b""
    for name in headers:  # §5.4.2: the last instance not used yet, bottom up
        for found in reversed(available):
            if found.split(b":", 1)[0].strip().lower() == name.encode():
                available.remove(found)
                data += (_relaxed_header(found) if header_canon == "relaxed" else found) + b"\r\n"
                break
    data += _relaxed_header(field) if header_canon == "relaxed" else field
    if key.kind == "rsa":
        signature = _openssl("dgst", f"-{digest}", "-sign", key.private_pem, data=data)
    else:
        digest_file = key.private_pem + ".data"  # pkeyutl -rawin reads a file, not a pipe (OpenSSL 3.0)
        with open(digest_file, "wb") as f:
            f.write(hashlib.sha256(data).digest())
        signature = _openssl("pkeyutl", "-sign", "-inkey", key.private_pem, "-rawin", "-in", digest_file)
    b64 = base64.b64encode(signature).decode()
    folded = "\r\n\t ".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return field + folded.encode() + b"\r\n" + message


def txt_record_args(records: dict[str, str]) -> tuple[str, ...]:
    """dnsmasq arguments publishing TXT ``records`` (name → text), each cut into strings of at
    most 255 octets (RFC 1035 §3.3.14), which a reader joins."""
    args = []
    for name, text in records.items():
        parts = ",".join(text[i:i + 250] for i in range(0, len(text), 250))  # no commas in a key record
        args.append(f"--txt-record={name},{parts}")
    return tuple(args)
