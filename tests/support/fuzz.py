"""Mutation fuzzing of the message paths: mail-shaped mutators, the targets, a bounded runner.

Owns: seeds (the corpus, the torture set and built messages carrying archives, uuencode and
nesting), mutators suited to mail (header, boundary, transfer-encoding, line-ending, nesting,
size, splicing, archive), the targets that feed one input through a module of the gateway and
check what it promises (``mime``, ``spam``, ``notify``, ``dsn``, ``downgrade``), and a runner that executes
each input in a child process under a time and a memory bound, counts outcomes and covered
line pairs of the smtpgw package, and keeps every crash or bound exceeded as a finding.

Must never: depend on anything outside the standard library, use unseeded randomness (a seed
and an input number give the same input on every run), or let one input stop the run: a hang,
a blow-up or a dead child becomes a finding and the child is replaced.

``bench/fuzz.py`` drives it for minutes or hours; ``tests/test_fuzz.py`` runs a short, fixed
slice of it; ``tests/e2e/test_fuzz_sessions.py`` uses the SMTP session generator.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import io
import os
import pickle
import random
import re
import resource
import select
import socket
import struct
import subprocess
import sys
import tarfile
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(REPO, "smtpgw") + os.sep
CORPUS = "/work/shared/corpus"
TARGETS = ("mime", "spam", "notify", "dsn", "downgrade")

# region seeds


def _crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name, (2026, 12, 7, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
    return out.getvalue()


def _tar(members: list[tuple[str, bytes]], compressed: bool = False) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1700000000
            tf.addfile(info, io.BytesIO(data))
    return gzip.compress(out.getvalue(), mtime=0) if compressed else out.getvalue()


def _attachment(name: str, ctype: str, data: bytes) -> str:
    b64 = base64.encodebytes(data).decode()
    return (f"Content-Type: {ctype}; name=\"{name}\"\nContent-Transfer-Encoding: base64\n"
            f"Content-Disposition: attachment; filename=\"{name}\"\n\n{b64}")


def _multipart(parts: list[str], subtype: str = "mixed", boundary: str = "b1") -> str:
    body = "".join(f"--{boundary}\n{p}\n" for p in parts)
    return (f"From: Alice <alice@example.org>\nTo: bob@example.test\nSubject: seed {subtype}\n"
            f"Date: Mon, 7 Dec 2026 07:00:00 +0000\nMessage-ID: <seed.{subtype}.{boundary}@example.org>\n"
            f"MIME-Version: 1.0\nContent-Type: multipart/{subtype}; boundary=\"{boundary}\"\n\n"
            f"preamble\n{body}--{boundary}--\nepilogue\n")


def built_seeds() -> list[bytes]:
    """Messages the corpus has few of: archives, uuencode, nesting, RFC 2231 names, HTML."""
    text = b"hello world, this is a plain attachment\n" * 8
    inner_zip = _zip([("readme.txt", text), ("run.exe", b"MZ" + bytes(200))])
    plain = "Content-Type: text/plain; charset=us-ascii\n\nhello\n"
    uu = "Content-Type: text/plain\n\nsee below\nbegin 644 file.bin\n" + binascii.b2a_uu(text[:45]).decode() + "`\nend\n"
    html = ("Content-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n"
            "<html><body><p style=3D\"color:#fff\">Buy <b>now</b></p><a href=3D\"http://198.51.100.7/x\">"
            "http://bank.example</a><!-- c --></body></html>\n")
    inner_msg = _multipart([plain, _attachment("a.zip", "application/zip", inner_zip)], boundary="in1")
    seeds = [
        _multipart([plain, _attachment("a.zip", "application/zip", _zip([("x.txt", text), ("in.zip", inner_zip)]))]),
        _multipart([plain, _attachment("a.tar", "application/x-tar", _tar([("x.txt", text), ("y.exe", b"MZ")]))]),
        _multipart([plain, _attachment("a.tgz", "application/gzip", _tar([("x.txt", text)], compressed=True))]),
        _multipart([plain, _attachment("a.txt.gz", "application/gzip", gzip.compress(text, mtime=0))]),
        _multipart([uu, html], boundary="b2"),
        _multipart([plain, html], subtype="alternative", boundary="alt"),
        _multipart([plain, "Content-Type: message/rfc822\n\n" + inner_msg], boundary="b3"),
        _multipart([plain, "Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n"
                    + base64.encodebytes(inner_msg.encode()).decode()], boundary="b4"),
        _multipart([plain, "Content-Type: application/octet-stream;\n name*0*=utf-8''%E2%82%AC;\n name*1=\"x.exe\"\n"
                    "Content-Disposition: attachment; filename=\"=?utf-8?B?0L/RgNC40LzQtdGALmV4ZQ==?=\"\n\nMZ\n"],
                   boundary="b5"),
    ]
    return [s.encode() for s in seeds]


def _without_mbox_line(message: bytes) -> bytes:
    """The message as SMTP carries it: without the mbox ``From `` line (RFC 4155) the corpus files start with."""
    if message.startswith(b"From "):
        return message.split(b"\n", 1)[1] if b"\n" in message else b""
    return message


def load_seeds(corpus: str = CORPUS, every: int = 1, limit: int | None = None) -> list[bytes]:
    """The torture set whole, every ``every``-th file of the other corpus folders, then the built seeds."""
    found: list[bytes] = []
    if os.path.isdir(corpus):
        for folder in sorted(os.listdir(corpus)):
            path = os.path.join(corpus, folder)
            if not os.path.isdir(path):
                continue
            names = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
            step = 1 if folder == "mime-torture" else every
            for name in names[::step]:
                with open(os.path.join(path, name), "rb") as f:
                    found.append(_without_mbox_line(f.read()))
    found = found[:limit] if limit is not None else found
    return found + built_seeds()


# endregion
# region mutators

Mutator = Callable[[random.Random, bytes, list[bytes]], bytes]

INTERESTING_VALUES = [
    b"multipart/mixed; boundary=\"\"", b"multipart/mixed; boundary=", b"multipart/mixed",
    b"multipart/alternative; boundary=\"" + b"x" * 200 + b"\"", b"message/rfc822", b"message/partial; id=1",
    b"text/plain; charset=\"x-unknown-charset\"", b"text/plain; charset=utf-7", b"text/html; charset=iso-2022-jp",
    b"application/zip; name*0*=utf-8''%FF%FE; name*1*=%00.zip", b"text/plain; name==?utf-8?Q?=00=0D=0A?=",
    b"=?utf-8?B?" + base64.b64encode(b"\x00\r\n" * 10) + b"?=", b"=?x-bogus?Q?abc?=", b"=?utf-8?B?####?=",
    b"=?utf-8?Q?" + b"=E2=82" * 500 + b"?=", b" ".join([b"=?utf-8?B?YQ==?="] * 300), b"\"unterminated",
    b"(comment (nested (deeply" + b"(" * 200, b"a" * 5000, b"\xff\xfe\x00\x1b[2J", b"<" * 100 + b">" * 100,
    b"attachment; filename*=''", b"attachment; filename=\"" + b"../" * 50 + b"etc/passwd\"",
    b"base64", b"quoted-printable", b"x-uuencode", b"uue", b"8bit", b"binary", b"7bit", b"bogus-encoding",
]
HEADER_NAMES = [b"Content-Type", b"Content-Transfer-Encoding", b"Content-Disposition", b"Subject", b"From", b"To",
                b"Cc", b"Message-ID", b"Date", b"Received", b"MIME-Version", b"X-Mailer", b"Reply-To", b"Sender"]


def _lines(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True) or [data]


def _header_end(data: bytes) -> int:
    m = re.search(rb"\r?\n\r?\n", data)
    return m.end() if m else len(data)


def m_bytes(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    """Flip, insert or delete a few bytes anywhere."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        pos = rng.randrange(len(buf) + 1)
        op = rng.random()
        if op < 0.4 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op < 0.7:
            buf[pos:pos] = rng.choice([b"\x00", b"\r", b"\n", b"\r\n", b"=", b"--", b"\"", b";", b":", b"\xff",
                                       bytes([rng.randrange(256)])])
        else:
            del buf[pos:pos + rng.randint(1, 64)]
    return bytes(buf)


def m_line_endings(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    """All LF, all CRLF, bare CR, or a mix line by line."""
    choice = rng.randrange(4)
    if choice == 0:
        return data.replace(b"\r\n", b"\n")
    if choice == 1:
        return re.sub(rb"\r?\n", b"\r\n", data)
    if choice == 2:
        return data.replace(b"\n", b"\r", rng.randint(1, 50))
    return b"".join(line.rstrip(b"\r\n") + rng.choice([b"\n", b"\r\n", b"\r", b"\n\r"]) for line in _lines(data))


def m_header(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    """Set, duplicate, fold, lengthen or break one header field (of the message or of a part)."""
    lines = _lines(data)
    heads = [i for i, line in enumerate(lines) if re.match(rb"[!-9;-~]+:", line)]
    name = rng.choice(HEADER_NAMES)
    value = rng.choice(INTERESTING_VALUES)
    eol = b"\r\n" if data.count(b"\r\n") * 2 > data.count(b"\n") else b"\n"
    op = rng.randrange(6)
    if not heads or op == 0:  # a new field at a random field position
        at = rng.choice(heads) if heads else 0
        lines.insert(at, name + b": " + value + eol)
    elif op == 1:  # replace a field's value
        i = rng.choice(heads)
        lines[i] = lines[i].split(b":", 1)[0] + b": " + value + eol
    elif op == 2:  # duplicate a field many times
        i = rng.choice(heads)
        lines[i:i] = [lines[i]] * rng.choice([2, 10, 600])
    elif op == 3:  # fold a field over many continuation lines
        i = rng.choice(heads)
        lines[i] = lines[i].rstrip(b"\r\n") + (eol + rng.choice([b" ", b"\t", b""]) + value) * rng.randint(1, 300) + eol
    elif op == 4:  # a field without a colon, or a name with spaces
        i = rng.choice(heads)
        lines[i] = rng.choice([lines[i].replace(b":", b"", 1), b" " + lines[i], lines[i].replace(b":", b" :", 1)])
    else:  # delete a field
        del lines[rng.choice(heads)]
    return b"".join(lines)


def m_boundary(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    """Drop, duplicate, rename or truncate multipart delimiters."""
    found = re.findall(rb"boundary=\"?([^\";\r\n]+)", data, re.I)
    if not found:
        return m_header(rng, data, others)
    b = rng.choice(found)
    delim = b"--" + b
    op = rng.randrange(6)
    if op == 0:
        return data.replace(delim + b"--", b"", 1)  # no close-delimiter
    if op == 1:
        return data.replace(delim, b"", 1)  # no first delimiter
    if op == 2:
        return data.replace(b"boundary=\"" + b, b"boundary=\"" + b[: max(1, len(b) // 2)], 1)
    if op == 3:
        return data.replace(delim + b"\n", (delim + b"\n") * rng.randint(2, 2000), 1)
    if op == 4:
        return data.replace(delim, delim + rng.choice([b" \t", b"-", b"--x", b"\x00"]))
    return data.replace(b, rng.choice(found + [b"", b"-", b"--"]), rng.randint(1, 3))


def m_encoding(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    """Change a Content-Transfer-Encoding, or damage an encoded body."""
    op = rng.randrange(3)
    if op == 0:
        cte = rng.choice([b"base64", b"quoted-printable", b"x-uuencode", b"8bit", b"binary", b"x-gzip64", b"Base64 "])
        new, n = re.subn(rb"(?i)(Content-Transfer-Encoding:)[^\r\n]*", rb"\1 " + cte, data, count=1)
        return new if n else m_header(rng, data, others)
    if op == 1:  # garbage inside base64 runs
        runs = [m.span() for m in re.finditer(rb"(?m)^(?:[A-Za-z0-9+/=]{40,100}\r?\n){2,}", data)]
        if not runs:
            return m_bytes(rng, data, others)
        a, z = rng.choice(runs)
        noise = bytes(rng.choice(b"!*#%=\x00\xff-_.~ ") for _ in range(rng.randint(1, 40)))
        cut = rng.randint(a, z)
        return data[:cut] + noise + data[cut:]
    # quoted-printable soft breaks and bad escapes
    return data.replace(b"=", rng.choice([b"=\n", b"==", b"=Z", b"=\r\n=", b"=0"]), rng.randint(1, 100))


def m_nesting(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    """Wrap the message in multiparts or message/rfc822 parts, possibly deeper than any bound."""
    depth = rng.choice([1, 2, 5, 40, 300])
    out = data
    for level in range(depth):
        kind = rng.randrange(3)
        if kind == 0:
            out = b"Content-Type: message/rfc822\n\n" + out
        elif kind == 1:
            b = b"n%d" % level
            out = (b"Content-Type: multipart/mixed; boundary=\"" + b + b"\"\n\n--" + b + b"\n" + out + b"\n--" + b
                   + b"--\n")
        else:
            out = (b"Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n"
                   + base64.encodebytes(out))
        if len(out) > 1 << 20:  # the size mutator makes big inputs; this one makes deep ones
            break
    return b"From: x@example.org\nSubject: nested\nMIME-Version: 1.0\n" + out


def m_size(rng: random.Random, data: bytes, others: list[bytes], cap: int = 4 << 20) -> bytes:
    """Repeat a slice, make one very long line, or many tiny parts, many fields."""
    op = rng.randrange(4)
    if op == 0 and data:
        a = rng.randrange(len(data))
        piece = data[a:a + rng.randint(1, 4096)]
        times = max(1, min(rng.choice([10, 1000, 100000]), cap // max(1, len(piece))))
        return data[:a] + piece * times + data[a:]
    if op == 1:
        at = rng.randrange(len(data) + 1)
        return data[:at] + rng.choice([b"A", b"=", b"a ", b"<", b"&#"]) * rng.choice([2000, 100000, cap // 2]) + data[at:]
    if op == 2:
        n = rng.choice([100, 1500, 6000])
        parts = b"".join(b"--m\nContent-Type: text/plain\n\n%d\n" % i for i in range(n))
        return b"Subject: parts\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=m\n\n" + parts + b"--m--\n"
    n = rng.choice([100, 800, 20000])
    return b"".join(b"X-F%d: v\n" % i for i in range(n)) + data


def m_splice(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    """The head of one message on the body of another, or a part of another message inserted."""
    other = rng.choice(others)
    if rng.random() < 0.5:
        return data[:_header_end(data)] + other[_header_end(other):]
    a = rng.randrange(len(other) + 1)
    piece = other[a:a + rng.randint(1, 20000)]
    at = rng.randrange(len(data) + 1)
    return data[:at] + piece + data[at:]


def m_archive(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    """Attach ``data`` (or another seed) inside a zip, tar or gzip, nested or damaged."""
    payload = rng.choice([data, rng.choice(others)])
    fmt = rng.randrange(4)
    levels = rng.choice([1, 1, 2, 12])
    for _ in range(levels):
        if fmt == 0:
            payload = _zip([("m.eml", payload), ("n.txt", b"x" * rng.choice([10, 100000]))])
        elif fmt == 1:
            empty = rng.choice([0, 5, 1200]) if levels == 1 else 2
            payload = _tar([("m.eml", payload)] + [(f"f{i}", b"") for i in range(empty)])
        elif fmt == 2:
            payload = gzip.compress(payload, mtime=0)
        else:
            payload = _tar([("m.eml", payload)], compressed=True)
    if rng.random() < 0.5:  # damage the container
        payload = m_bytes(rng, payload, others)
    name = rng.choice(["a.zip", "a.tar", "a.gz", "a.tgz", "noext", "a.txt"])
    part = _attachment(name, "application/octet-stream", payload).encode()
    return _multipart(["Content-Type: text/plain\n\nsee attached\n", "@@PART@@"], boundary="arch").encode().replace(
        b"@@PART@@", part)


def m_uuencode(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    """uuencoded blocks in a text body: valid, unterminated, bad lines, many of them."""
    block = b"begin 644 f.bin\n" + binascii.b2a_uu(data[:45]) + rng.choice([b"`\nend\n", b"", b"M\xff\xff\nend\n",
                                                                            b"end\n", b"\x00\n"])
    n = rng.choice([1, 3, 150])
    return data[:_header_end(data)] + block * n + data[_header_end(data):]


MUTATORS: dict[str, Mutator] = {
    "bytes": m_bytes, "line-endings": m_line_endings, "header": m_header, "boundary": m_boundary,
    "encoding": m_encoding, "nesting": m_nesting, "size": m_size, "splice": m_splice, "archive": m_archive,
    "uuencode": m_uuencode,
}


def mutate(rng: random.Random, seed: bytes, others: list[bytes], cap: int) -> tuple[bytes, list[str]]:
    """One to four mutations of ``seed``; the result is cut to ``cap`` bytes."""
    names = []
    data = seed
    for _ in range(rng.choice([1, 1, 2, 3, 4])):
        name = rng.choice(list(MUTATORS))
        data = MUTATORS[name](rng, data, others)[:cap]
        names.append(name)
    return data, names


# endregion
# region targets (run in the child process)


class Invariant(AssertionError):
    """A target's promise broken by an input (not an exception from the code under test)."""


def _tree_outcome(tree: Any) -> str:
    kinds = sorted({f"{o.kind}:{o.status or ''}" for o in tree.root.walk()})
    return "mime " + ",".join(kinds)[:200] + " | " + ",".join(sorted({d.split(":")[0] for d in tree.defects}))[:200]


def target_mime(raw: bytes) -> str:
    """decompose never raises; rebuild with removals and placeholders never raises and keeps a parseable tree."""
    from smtpgw.mail import mime

    tree = mime.decompose(raw, mime.Limits(max_expanded=32 << 20))
    nodes = list(tree.root.walk())
    if len(nodes) > mime.MAX_MIME_PARTS * 3 + mime.Limits().max_members:
        raise Invariant(f"{len(nodes)} objects: past MAX_MIME_PARTS and the member bound")
    edits = [mime.Edit(node, None if i % 3 else "removed: %s" % node.name) for i, node in enumerate(nodes[1:]) if i % 2]
    rebuilt = mime.rebuild(raw, edits)
    if not edits and rebuilt != raw:
        raise Invariant("rebuild without edits changed the message")
    mime.decompose(rebuilt)
    _check_removals(raw, tree)
    return _tree_outcome(tree)


def _leaf_contents(tree: Any) -> dict[bytes, int]:
    counts: dict[bytes, int] = {}
    for node in tree.root.walk():
        if not node.children and node.data is not None and len(node.data) >= 64:
            digest = hashlib.sha1(node.data).digest()
            counts[digest] = counts.get(digest, 0) + 1
    return counts


def _check_removals(raw: bytes, tree: Any) -> None:
    """What the anti-virus step removes is gone: read again, the message holds fewer copies of each removed
    leaf's content (the removal may take a larger entity with it, never less)."""
    from smtpgw.mail import mime

    leaves = [n for n in tree.root.walk() if not n.children and n.data is not None and len(n.data) >= 64]
    removed = leaves[::2]
    if not removed or _cut_by_a_bound(tree):
        # a decomposition stopped by MaximalMessageObjects or the nesting bound sees only a prefix:
        # after a removal, parts past the bound move into view (the message is `error` either way)
        return
    before = _leaf_contents(tree)
    after = _leaf_contents(mime.decompose(mime.rebuild(raw, [mime.Edit(n) for n in removed]),
                                          mime.Limits(max_expanded=32 << 20)))
    for node in removed:
        digest = hashlib.sha1(node.data).digest()
        if after.get(digest, 0) >= before[digest]:
            raise Invariant(f"removed object {node.path} ({node.kind}) still in the rebuilt message")


_SPAM: Any = None


def target_spam(raw: bytes) -> str:
    """classify never raises; tokens carry no whitespace or control characters and stay under MAX_TOKENS."""
    from types import SimpleNamespace

    from smtpgw.spam import SpamFilter, mailview, mark, tokenizer

    global _SPAM
    section = SimpleNamespace(Check=True, SpamDetection="standard", SpamSubjectPrefix="[SPAM] ",
                              ProbableSpamSubjectPrefix="[Probable Spam] ")
    if _SPAM is None:
        _SPAM = SpamFilter(section, None)
    tokens = tokenizer.tokens(mailview.build(raw))
    if len(tokens) > tokenizer.MAX_TOKENS:
        raise Invariant(f"{len(tokens)} tokens")
    bad = [t for t in tokens if re.search(r"[\s\x00-\x1f\x7f]", t)]
    if bad:
        raise Invariant(f"token with whitespace or control character: {bad[0]!r}")
    verdict = _SPAM.classify(raw, "192.0.2.1", "a@example.org", ["b@example.test"], [])
    marked = mark(raw, verdict, section, "tag")
    if not marked.endswith(raw[_header_end(raw):]) and raw[_header_end(raw):]:
        raise Invariant("mark changed the body")
    return f"spam {verdict.status} {verdict.method}"


def _header(raw: bytes, name: bytes) -> bytes:
    from smtpgw.mail import headers

    return headers.get_raw(raw, name.decode()) or b""


def _check_generated(out: bytes, what: str) -> None:
    """A message we generate: CRLF only, header lines within 998 octets (RFC 5322 §2.1.1), a header block."""
    head = out[:_header_end(out)]
    if re.search(rb"(?<!\r)\n|\r(?!\n)", head):
        raise Invariant(f"{what}: bare CR or LF in the header")
    long = [line for line in head.split(b"\r\n") if len(line) > 998]
    if long:
        raise Invariant(f"{what}: header line of {len(long[0])} octets")
    if not head.endswith(b"\r\n\r\n"):
        raise Invariant(f"{what}: no blank line after the header")


def _path(keyword: str, address: str) -> str:
    """``address`` if the receiver would take it in MAIL FROM or RCPT TO, else empty."""
    from smtpgw.net import smtp

    try:
        return smtp.parse_path(f"{keyword}:<{address}>", keyword, False)[0]
    except ValueError:
        return ""


def _envelope(raw: bytes) -> dict[str, Any]:
    """An envelope whose every text comes from the hostile message, decoded as the receiver decodes SMTP."""
    head = raw[:64 << 10]  # the receiver reads a message's identity from its head
    text = lambda name: _header(head, name).decode("latin-1").strip()  # noqa: E731 - as the receiver decodes
    bracketed = re.search(r"<([^<>]*)>", text(b"From"))
    sender = _path("FROM", bracketed.group(1) if bracketed else text(b"From")) or "a@example.org"
    rcpts = [a for a in (_path("TO", a.strip(" <>")) for a in text(b"To").split(",")) if a] or ["b@example.test"]
    return {
        "id": "Q1fuzz", "sender": sender, "envid": text(b"X-Envid"), "ret": "FULL", "client_ip": "192.0.2.1",
        "client_name": text(b"Received")[:100], "helo": text(b"X-Mailer")[:100], "received_at": 1765000000.0,
        "size": len(raw), "body": "8BITMIME", "esmtp": True, "message_id": text(b"Message-ID"),
        "recipients": [{"addr": r, "orcpt": f"rfc822;{r}", "notify": ["FAILURE", "DELAY", "SUCCESS"],
                        "status": "5.1.1", "diag": "smtp; 550 " + text(b"Subject")[:300],
                        "remote_mta": text(b"X-Remote"), "last_attempt": 1765000100.0} for r in rcpts[:50]],
    }


def _template(kind: str) -> str:
    return os.path.join(REPO, "smtpgw", "templates", f"{kind}.tmpl")


def target_notify(raw: bytes) -> str:
    """notifications and the disclaimer from hostile values: ValueError at most; CRLF, 7-bit, short header lines."""
    from smtpgw.mail.disclaimer import add_disclaimer
    from smtpgw.reports import notify

    env = _envelope(raw)
    event = {"status": "infected", "group": "g", "queue_id": "Q1fuzz", "blocked": True,
             "subject": _header(raw, b"Subject"),
             "objects": [{"name": _header(raw, b"Content-Type").decode("latin-1"), "status": "infected",
                          "viruses": ["Eicar-Test-Signature"], "action": "remove"}]}
    outcomes = []
    for kind, to in (("admin", ["admin@example.test"]), ("sender", [env["sender"]]),
                     ("recipient", [r["addr"] for r in env["recipients"][:1]])):
        try:
            out = notify.build_notification(kind, env, event, "gateway@example.test", to, _template("notify"),
                                            "%d.%m.%Y", "%H:%M:%S", 1765000200.0)
        except ValueError as exc:
            outcomes.append(f"{kind}:refused:{str(exc).split(':')[0][:40]}")
            continue
        if not out.isascii():
            raise Invariant(f"{kind} notification is not 7-bit")
        _check_generated(out, f"{kind} notification")
        outcomes.append(f"{kind}:ok")
    text = notify.render_disclaimer(_template("disclaimer"), env, event, "%d.%m.%Y", "%H:%M:%S", 1765000200.0)
    add_disclaimer(raw, text)
    outcomes.append(_check_disclaimer(raw))
    return "notify " + " ".join(outcomes)


def _check_disclaimer(raw: bytes) -> str:
    """The disclaimer is a part a reader sees, and every part of the message is still there."""
    from smtpgw.mail import mime
    from smtpgw.mail.disclaimer import add_disclaimer

    if re.search(rb"\r(?!\n)", raw):
        return "disclaimer:bare-cr"  # the receiver refuses bare CR: such a message never gets a disclaimer
    marker = "Disclaimer 7f3a9c: this text was added by the gateway."
    before = mime.decompose(raw)
    after = mime.decompose(add_disclaimer(raw, marker))
    if not any(n.data is not None and marker.encode() in n.data for n in after.root.walk() if not n.children):
        return "disclaimer:not-seen"
    old, new = _leaf_contents(before), _leaf_contents(after)
    lost = [digest for digest, count in old.items() if new.get(digest, 0) < count]
    if lost and _too_deep(after) > _too_deep(before):
        # the disclaimer's multipart/mixed wraps the message one level deeper: a part that sat at
        # MAX_MIME_DEPTH is now past it, kept byte for byte but read as an error, never as clean
        return "disclaimer:nesting-bound"
    if lost:
        raise Invariant(f"add_disclaimer lost {len(lost)} of {len(old)} parts")
    return "disclaimer:ok"


def _cut_by_a_bound(tree: Any) -> bool:
    """Whether a decomposition stopped early at one of the message's bounds (objects, nesting)."""
    return any((node.reason or "").startswith(("more than", "MIME nesting deeper")) for node in tree.root.walk())


def _too_deep(tree: Any) -> int:
    """How many nodes of a decomposition stopped at the MIME nesting bound."""
    return sum(1 for node in tree.root.walk() if (node.reason or "").startswith("MIME nesting deeper"))


def target_dsn(raw: bytes) -> str:
    """DSNs about a hostile message and envelope: None or a multipart/report with a sound header."""
    from smtpgw.reports import dsn

    env = _envelope(raw)
    original = raw[: dsn.DEFAULT_FULL_LIMIT + 1]  # what the gateway reads of the message for a DSN
    outcomes = []
    for kind in dsn.KINDS:
        for ret in ("FULL", "HDRS"):
            env["ret"] = ret
            out = dsn.build_dsn(env, env["recipients"], kind, original, "gw.example.test", "postmaster",
                                _template("dsn"), 1765000200.0, retry_until=1765400000.0)
            if out is None:
                outcomes.append(f"{kind}:none")
                continue
            _check_generated(out, f"{kind} DSN")
            if b"report-type=delivery-status" not in out[:_header_end(out)]:
                raise Invariant(f"{kind} DSN without its report type")
            outcomes.append(f"{kind}:{dsn.dsn_body_type(out)}")
    return "dsn " + " ".join(sorted(set(outcomes)))


def target_downgrade(raw: bytes) -> str:
    """to_7bit: None, or a 7-bit message no next hop needs converted, which converts to itself."""
    from smtpgw.mail import downgrade

    out = downgrade.to_7bit(raw)
    if out is None:
        return "downgrade refused"
    if not out.isascii() or downgrade.needs_downgrade(out):
        raise Invariant("to_7bit gave a message that still needs 8BITMIME")
    if downgrade.to_7bit(out) != out:
        raise Invariant("to_7bit changed its own output")
    return "downgrade " + ("unchanged" if out == re.sub(rb"\r?\n", b"\r\n", raw) else "converted")


TARGET_FUNCTIONS: dict[str, Callable[[bytes], str]] = {
    "mime": target_mime, "spam": target_spam, "notify": target_notify, "dsn": target_dsn,
    "downgrade": target_downgrade,
}


# endregion
# region child process


class _Coverage:
    """Line pairs (previous line, line) executed in smtpgw's own files: a cheap path signature."""

    def __init__(self) -> None:
        self.edges: set[tuple[str, int, int]] = set()
        self.new: list[tuple[str, int, int]] = []

    def _call(self, frame: Any, event: str, arg: Any) -> Any:
        code = frame.f_code
        if not code.co_filename.startswith(PACKAGE):
            return None
        name = code.co_filename[len(PACKAGE):]
        prev = code.co_firstlineno
        edges, new = self.edges, self.new

        def local(frame: Any, event: str, arg: Any) -> Any:
            nonlocal prev
            if event == "line":
                key = (name, prev, frame.f_lineno)
                if key not in edges:
                    edges.add(key)
                    new.append(key)
                prev = frame.f_lineno
            return local

        return local

    def start(self) -> None:
        self.new = []
        sys.settrace(self._call)

    def stop(self) -> list[tuple[str, int, int]]:
        sys.settrace(None)
        return self.new


def _send(out: Any, obj: Any) -> None:
    data = pickle.dumps(obj)
    out.write(struct.pack(">I", len(data)) + data)
    out.flush()


def _recv(stream: Any) -> Any:
    head = stream.read(4)
    if len(head) < 4:
        return None
    return pickle.loads(stream.read(struct.unpack(">I", head)[0]))


def _innermost(tb: Any) -> str:
    """The deepest frame of smtpgw in a traceback: where a crash is attributed."""
    where = "?"
    for frame in traceback.extract_tb(tb):
        if frame.filename.startswith(PACKAGE):
            where = f"{frame.filename[len(PACKAGE):]}:{frame.lineno}"
    return where


def _peak_kb() -> int:
    """The process's peak RSS in KB: VmHWM, which _reset_peak can lower, else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> int:
    """Lower the peak to the current RSS (Linux: clear_refs 5), so the next reading is this input's own
    peak and not one left by receiving it or by an earlier input; returns the peak now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _peak_kb()


def run_one(target: str, raw: bytes, coverage: _Coverage | None = None) -> dict[str, Any]:
    """Feed one input to one target in this process: status ok, crash or invariant, and the figures."""
    import logging

    logging.disable(logging.CRITICAL)
    before = _reset_peak()
    started = time.perf_counter()
    if coverage:
        coverage.start()
    try:
        outcome, status, detail, where = TARGET_FUNCTIONS[target](raw), "ok", "", ""
    except Invariant as exc:
        outcome, status, detail, where = f"invariant {exc}", "invariant", str(exc), _innermost(exc.__traceback__)
    except BaseException as exc:  # noqa: BLE001 - every escape from a target is a finding
        where = _innermost(exc.__traceback__)
        outcome, status = f"crash {type(exc).__name__} {where}", "crash"
        detail = "".join(traceback.format_exception(exc))[-4000:]
    finally:
        new = coverage.stop() if coverage else []
    elapsed = time.perf_counter() - started
    after = _peak_kb()
    return {"status": status, "outcome": outcome, "detail": detail, "where": where, "seconds": elapsed,
            "rss_kb": after, "rss_rose": after > before, "edges": new}


def child_main() -> int:
    """Serve inputs from stdin until it closes (``python3 -m tests.support.fuzz --child LIMIT_MB``)."""
    limit = int(sys.argv[2]) << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # the machine's guard; the RSS bound is the parent's
    coverage = _Coverage() if sys.argv[3] == "1" else None
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    for name in TARGETS:  # imports and the spam database load before the first input is timed
        run_one(name, b"Subject: warm up\n\nhello\n", None)
    _send(stdout, {"ready": True, "rss_kb": _reset_peak()})
    while True:
        request = _recv(stdin)
        if request is None:
            return 0
        _send(stdout, run_one(request["target"], request["data"], coverage))


# endregion
# region runner (parent)


@dataclass
class Finding:
    target: str
    kind: str  # crash, invariant, timeout, memory, died
    signature: str
    mutators: list[str]
    seconds: float
    rss_mb: float
    detail: str
    path: str = ""


@dataclass
class Figures:
    """Per target: inputs executed, distinct outcomes, worst time and RSS."""

    inputs: int = 0
    outcomes: set[str] = field(default_factory=set)
    worst_seconds: float = 0.0
    worst_input: str = ""
    worst_rss_mb: float = 0.0
    corpus_added: int = 0
    unconfirmed: int = 0  # bounds exceeded under tracing or after other inputs, not when run alone


class Child:
    """One child process serving inputs, replaced after a timeout, a death or a memory finding."""

    def __init__(self, memory_guard_mb: int, coverage: bool) -> None:
        self.memory_guard_mb = memory_guard_mb
        self.coverage = coverage
        self.proc: subprocess.Popen[bytes] | None = None
        self.baseline_kb = 0
        self.served = 0

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.fuzz", "--child", str(self.memory_guard_mb),
                                      "1" if self.coverage else "0"], cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        ready = self._answer(120.0)
        if not ready or not ready.get("ready"):
            raise RuntimeError("fuzz child did not start")
        self.baseline_kb = ready["rss_kb"]
        self.served = 0

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def _answer(self, timeout: float) -> dict[str, Any] | None:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        return _recv(self.proc.stdout)  # type: ignore[no-any-return]

    def run(self, target: str, data: bytes, timeout: float) -> dict[str, Any]:
        """The child's answer, or a status ``timeout`` / ``died`` after which the child is replaced."""
        if self.proc is None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        started = time.perf_counter()
        try:
            _send(self.proc.stdin, {"target": target, "data": data})
            answer = self._answer(timeout)
        except (BrokenPipeError, EOFError, pickle.UnpicklingError, struct.error):
            answer = None
        if answer is None:
            alive = self.proc.poll() is None
            self.stop()
            return {"status": "timeout" if alive else "died", "outcome": "timeout" if alive else "died",
                    "detail": "", "where": "", "seconds": time.perf_counter() - started, "rss_kb": 0,
                    "rss_rose": False, "edges": []}
        self.served += 1
        return answer


class Fuzzer:
    """Seeded mutation of seeds through the targets, with per-input bounds and saved findings."""

    def __init__(self, seeds: list[bytes], seed: int, findings_dir: str | None, time_limit: float = 5.0,
                 rss_limit_mb: int = 256, cap: int = 1 << 20, coverage: bool = False, memory_guard_mb: int = 3072,
                 recycle: int = 2000) -> None:
        self.seeds = seeds
        self.queue: list[bytes] = list(seeds)  # grows with inputs that reached new line pairs
        self.rng = random.Random(seed)
        self.findings_dir = findings_dir
        self.time_limit = time_limit
        self.rss_limit_kb = rss_limit_mb << 10
        self.cap = cap
        self.recycle = recycle
        self.child = Child(memory_guard_mb, coverage)
        self._confirmer = self.child
        self.figures = {t: Figures() for t in TARGETS}
        self.edges: set[tuple[str, int, int]] = set()
        self.findings: list[Finding] = []
        self._signatures: set[str] = set()

    def inputs(self) -> Iterator[tuple[bytes, list[str]]]:
        """Every seed once as it is, then mutations of seeds and of inputs that found new paths."""
        for seed in self.seeds:
            yield seed, ["seed"]
        while True:
            yield mutate(self.rng, self.rng.choice(self.queue), self.seeds, self.cap)

    def run(self, deadline: float | None = None, count: int | None = None,
            progress: Callable[[Fuzzer], None] | None = None, targets: tuple[str, ...] = TARGETS) -> None:
        done = 0
        try:
            for data, mutators in self.inputs():
                if (deadline is not None and time.monotonic() >= deadline) or (count is not None and done >= count):
                    break
                for target in targets:
                    self._one(target, data, mutators)
                done += 1
                if progress and done % 200 == 0:
                    progress(self)
        finally:
            self.child.stop()

    def _one(self, target: str, data: bytes, mutators: list[str]) -> None:
        if self.child.served >= self.recycle:
            self.child.stop()  # now and then a fresh process: growth of caches is not charged to later inputs
        answer = self.child.run(target, data, self.time_limit)
        figures = self.figures[target]
        figures.inputs += 1
        figures.outcomes.add(answer["outcome"])
        if answer["seconds"] > figures.worst_seconds:
            figures.worst_seconds = answer["seconds"]
            figures.worst_input = f"{len(data)} bytes, {'+'.join(mutators)}"
        rss_mb = answer["rss_kb"] / 1024
        figures.worst_rss_mb = max(figures.worst_rss_mb, rss_mb)
        new_edges = [e for e in answer["edges"] if e not in self.edges]
        if new_edges:
            self.edges.update(new_edges)
            if mutators != ["seed"]:
                self.queue.append(data)
                figures.corpus_added += 1
        status = self._bound(answer, self.child)
        if status in ("timeout", "memory", "died"):
            self.child.stop()
            answer = self._confirm(target, data)  # alone, in a fresh child without tracing
            status = self._bound(answer, None)
            if status == "ok":
                figures.unconfirmed += 1
        if status != "ok":
            self._finding(target, status, data, mutators, answer)

    def _bound(self, answer: dict[str, Any], child: Child | None) -> str:
        """The answer's status, ``memory`` when the input raised RSS past the bound over the child's baseline."""
        grown = answer["rss_kb"] - (child or self._confirmer).baseline_kb
        if answer["status"] == "ok" and answer["rss_rose"] and grown > self.rss_limit_kb:
            answer["detail"] = f"peak RSS {answer['rss_kb'] >> 10} MB, {grown >> 10} MB over the child's baseline"
            return "memory"
        return str(answer["status"])

    def _confirm(self, target: str, data: bytes) -> dict[str, Any]:
        self._confirmer = Child(self.child.memory_guard_mb, False)
        try:
            return self._confirmer.run(target, data, self.time_limit)
        finally:
            self._confirmer.stop()

    def _finding(self, target: str, kind: str, data: bytes, mutators: list[str], answer: dict[str, Any]) -> None:
        where = answer["where"] or "+".join(sorted(set(mutators)))
        signature = f"{target} {kind} {answer['outcome'] if kind in ('crash', 'invariant') else where}"
        finding = Finding(target, kind, signature, mutators, answer["seconds"], answer["rss_kb"] / 1024,
                          answer["detail"])
        digest = hashlib.sha1(data).hexdigest()[:12]
        if self.findings_dir and (signature not in self._signatures or kind in ("timeout", "memory")):
            os.makedirs(self.findings_dir, exist_ok=True)
            finding.path = os.path.join(self.findings_dir, f"{target}-{kind}-{digest}.eml")
            with open(finding.path, "wb") as f:
                f.write(data)
            with open(finding.path[:-4] + ".txt", "w") as f:
                f.write(f"{signature}\nmutators: {' '.join(mutators)}\nseconds: {answer['seconds']:.2f}\n"
                        f"rss_mb: {finding.rss_mb:.0f}\nsize: {len(data)}\n\n{answer['detail']}\n")
        self._signatures.add(signature)
        self.findings.append(finding)

    def report(self) -> str:
        lines = [f"{'target':8} {'inputs':>8} {'outcomes':>9} {'worst s':>8} {'worst RSS MB':>13}  worst input"]
        for name, f in self.figures.items():
            if f.inputs:
                lines.append(f"{name:8} {f.inputs:8} {len(f.outcomes):9} {f.worst_seconds:8.3f} {f.worst_rss_mb:13.0f}"
                             f"  {f.worst_input}")
        lines.append(f"line pairs covered in smtpgw: {len(self.edges)}; inputs kept for new pairs: "
                     f"{sum(f.corpus_added for f in self.figures.values())}; bounds exceeded only under tracing or "
                     f"after other inputs: {sum(f.unconfirmed for f in self.figures.values())}")
        by_signature: dict[str, list[Finding]] = {}
        for finding in self.findings:
            by_signature.setdefault(finding.signature, []).append(finding)
        lines.append(f"findings: {len(self.findings)} ({len(by_signature)} distinct)")
        for signature, found in sorted(by_signature.items()):
            first = found[0]
            lines.append(f"  {len(found):4} x {signature}  (worst {max(f.seconds for f in found):.1f} s, "
                         f"{max(f.rss_mb for f in found):.0f} MB) e.g. {first.path or '+'.join(first.mutators)}")
        return "\n".join(lines)


# endregion
# region SMTP sessions

VERBS = [b"HELO", b"EHLO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP", b"QUIT", b"VRFY", b"HELP",
         b"STARTTLS", b"BDAT", b"AUTH", b"\x00", b"\xff\xfe", b"."]
PARAMS = [b"SIZE=1000", b"SIZE=99999999999999999999", b"BODY=8BITMIME", b"BODY=BINARYMIME", b"BODY=7BIT",
          b"SMTPUTF8", b"RET=FULL", b"RET=HDRS", b"ENVID=a+2Bb", b"NOTIFY=SUCCESS,FAILURE,DELAY", b"NOTIFY=NEVER",
          b"ORCPT=rfc822;x@example.test", b"ORCPT=rfc822;+ZZ", b"AUTH=<>", b"X=" + b"y" * 600, b"=", b"SIZE="]
ADDRESSES = [b"<x@example.test>", b"<>", b"<a@b.test>", b"x@example.test", b"<@relay.test:x@example.test>",
             b"<x%other.test@example.test>", b"<\"a b\"@example.test>", b"<" + b"a" * 300 + b"@example.test>",
             b"<x@[127.0.0.1]>", b"<x@[IPv6:::1]>", b"<postmaster>", b"<\xc3\xa9@example.test>", b"<<x@y>>",
             b"<x@example.test", b"< x@example.test >", b"<x@example.test> SIZE=1"]


def garbage(rng: random.Random) -> bytes:
    """Unstructured: verbs followed by random bytes, long angle brackets, raw noise, stray line ends."""
    pieces = []
    for _ in range(rng.randint(1, 30)):
        kind = rng.random()
        if kind < 0.4:
            pieces.append(rng.choice(VERBS) + b" " + bytes(rng.randrange(256) for _ in range(rng.randint(0, 60))))
        elif kind < 0.6:
            pieces.append(b"<" + bytes(rng.randrange(33, 127) for _ in range(rng.randint(0, 300))) + b">")
        elif kind < 0.8:
            pieces.append(bytes(rng.randrange(256) for _ in range(rng.randint(0, 3000))))
        else:
            pieces.append(rng.choice([b"\r\n", b"\n", b"\r", b"\r\n.\r\n", b".\r\n", b"\r\r\n"]))
        pieces.append(rng.choice([b"\r\n", b"\n", b""]))
    return b"".join(pieces)


def as_data(message: bytes) -> bytes:
    """A corpus message as DATA content: no mbox line, CRLF, dot-stuffed (RFC 5321 §4.5.2), terminated."""
    message = _without_mbox_line(message)
    lines = re.sub(rb"\r?\n", b"\r\n", message).split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines).rstrip(b"\r\n") + b"\r\n.\r\n"


def session_script(rng: random.Random, messages: list[bytes]) -> list[bytes]:
    """A plausible transaction, then mutated: each element is one write (a line, a pipelined group, DATA)."""
    mail = b"MAIL FROM:" + rng.choice(ADDRESSES[:4]) + b"".join(b" " + rng.choice(PARAMS) for _ in range(rng.choice([0, 0, 1, 3])))
    rcpts = [b"RCPT TO:" + rng.choice(ADDRESSES[:4]) + (b" " + rng.choice(PARAMS) if rng.random() < 0.2 else b"")
             for _ in range(rng.choice([1, 1, 2, 5]))]
    body = as_data(rng.choice(messages)[:200000]) if messages else b"Subject: x\r\n\r\nx\r\n.\r\n"
    script = [rng.choice([b"EHLO client.test", b"HELO client.test", b"EHLO [127.0.0.1]"]), mail, *rcpts, b"DATA"]
    script = [line + b"\r\n" for line in script] + [body, b"QUIT\r\n"]
    for _ in range(rng.choice([0, 1, 2, 4])):
        script = _mutate_script(rng, script)
    return script


def _mutate_script(rng: random.Random, script: list[bytes]) -> list[bytes]:
    i = rng.randrange(len(script))
    op = rng.randrange(9)
    line = script[i]
    if op == 0:  # pipelining: join this write with the next ones
        n = rng.randint(2, 6)
        return script[:i] + [b"".join(script[i:i + n])] + script[i + n:]
    if op == 1:  # a command replaced or inserted
        new = rng.choice(VERBS) + rng.choice([b"", b" ", b" " + rng.choice(ADDRESSES), b" " + rng.choice(PARAMS)])
        return script[:i] + [new + b"\r\n"] + script[i + (rng.random() < 0.5):]
    if op == 2:  # argument swapped for a hostile address
        return script[:i] + [re.sub(rb"<[^>]*>", lambda _m: rng.choice(ADDRESSES), line, count=1)] + script[i + 1:]
    if op == 3:  # line length: just under, at and over 512 / 1000 / 4096
        pad = b"x" * rng.choice([500, 506, 507, 990, 1100, 5000, 70000])
        return script[:i] + [line.rstrip(b"\r\n") + pad + b"\r\n"] + script[i + 1:]
    if op == 4:  # line endings
        return script[:i] + [line.replace(b"\r\n", rng.choice([b"\n", b"\r", b"\r\r\n", b"\n\r", b""]))] + script[i + 1:]
    if op == 5:  # bytes
        return script[:i] + [m_bytes(rng, line, [])] + script[i + 1:]
    if op == 6:  # drop a step
        return script[:i] + script[i + 1:] if len(script) > 1 else script
    if op == 7:  # repeat a step many times
        return script[:i] + [line] * rng.choice([2, 20, 200]) + script[i + 1:]
    # BDAT chunks instead of DATA, with honest or lying sizes
    chunk = b"Subject: bdat\r\n\r\nhello\r\n"
    size = len(chunk) + rng.choice([0, 0, -3, 5, 10**9])
    return script[:i] + [b"BDAT %d LAST\r\n" % size + chunk] + script[i + 1:]


def run_session(port: int, script: list[bytes], timeout: float) -> tuple[bytes, float, bool]:
    """Run one script: (everything the gateway sent, seconds, ended within the deadline)."""
    started = time.monotonic()
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.settimeout(0.05)
        try:
            for write in script:
                conn.sendall(write)
                try:  # take what has come so far, without waiting for it
                    while chunk := conn.recv(65536):
                        received += chunk
                        if len(received) > 1 << 20:
                            break
                except (TimeoutError, BlockingIOError):
                    pass
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the gateway closed first (junk budget, error limits)
        conn.settimeout(max(0.1, started + timeout - time.monotonic()))
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except TimeoutError:
            return bytes(received), time.monotonic() - started, False
        except OSError:
            pass
    return bytes(received), time.monotonic() - started, True


REPLY = re.compile(rb"[2-5][0-9][0-9](?:[ -][^\r\n]*)?\r\n")


def check_replies(stream: bytes) -> str | None:
    """None when every line the gateway sent is an SMTP reply line (RFC 5321 §4.2), else the first bad one."""
    pos = 0
    while pos < len(stream):
        m = REPLY.match(stream, pos)
        if not m:
            return repr(stream[pos:pos + 80])
        pos = m.end()
    return None


def reply_codes(stream: bytes) -> str:
    """The session's outcome: the codes of its final reply lines, in order."""
    return " ".join(m.group(0)[:3].decode() for m in re.finditer(rb"^[2-5][0-9][0-9](?= |\r)", stream, re.M))


# endregion

if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    sys.exit(child_main())
