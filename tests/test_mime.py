"""MIME decomposition and byte-exact rebuilding (smtpgw.mime); no clamd needed."""

from __future__ import annotations

import base64
import io
import os
import random
import struct
import tarfile
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import pytest

from smtpgw.mail.mime import (
    MAX_HEADER_FIELDS,
    MAX_MIME_DEPTH,
    MAX_MIME_PARTS,
    Edit,
    Limits,
    MimeObject,
    MimeTree,
    decompose,
    rebuild,
)
from smtpgw.mail import archives as archives_module
from smtpgw.mail import mime as mime_module
from tests.support.clamd import encrypted_zip, mime_message, tar_bytes, tar_gz, zip_bytes
from tests.support.components import missing
from tests.support.net import CORPUS

B64 = "Content-Transfer-Encoding: base64"


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).rstrip(b"\n").replace(b"\n", b"\r\n")


def by_path(tree: MimeTree) -> dict[str, MimeObject]:
    """Nodes by path; an encapsulated multipart shares its message part's number, which wins."""
    nodes: dict[str, MimeObject] = {}
    for node in tree.walk():
        nodes.setdefault(node.path, node)
    return nodes


def leaves(tree: MimeTree) -> list[MimeObject]:
    return [node for node in tree.walk() if not node.children and node.kind != "multipart"]


def zeros_zip(name: str, size: int) -> bytes:
    """A zip whose one member inflates to ``size`` zero bytes, built without inflating it
    here: a fully flushed deflate segment of zeros repeats byte for byte (RFC 1951 §3.2.3)."""
    chunk = 1 << 20
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = deflater.compress(bytes(chunk)) + deflater.flush(zlib.Z_FULL_FLUSH)
    packed = segment * (size // chunk) + b"\x03\x00"  # then an empty final block
    crc = 0
    for _ in range(size // chunk):
        crc = zlib.crc32(bytes(chunk), crc)
    encoded = name.encode()
    common = struct.pack("<HHHHHIIIHH", 20, 0, 8, 0, 0x21, crc, len(packed), size, len(encoded), 0)
    local = b"PK\x03\x04" + common + encoded + packed
    central = b"PK\x01\x02" + struct.pack("<H", 20) + common + struct.pack("<HHHII", 0, 0, 0, 0, 0) + encoded
    return local + central + b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 1, 1, len(central), len(local), 0)


def attachment(name: str, data: bytes, ctype: str = "application/octet-stream") -> tuple[str, bytes]:
    return (f'Content-Type: {ctype}; name="{name}"\n{B64}', b64(data))


# region structure, names, encodings


def test_parts_names_and_decoded_content() -> None:
    raw = mime_message(
        [
            ("Content-Type: text/plain; charset=us-ascii", b"hello"),
            (
                "Content-Type: application/octet-stream\n"
                "Content-Disposition: attachment; filename*0*=utf-8''r%C3%A9;\n"
                " filename*1=sum%C3%A9.pdf\n" + B64,
                b64(b"%PDF"),
            ),
            ("Content-Type: application/octet-stream; name=\"=?utf-8?q?na=C3=AFve.bin?=\"", b"x"),
            ("Content-Type: text/plain\nContent-Transfer-Encoding: quoted-printable", b"caf=C3=A9 =\r\nok"),
        ]
    )
    tree = decompose(raw)
    nodes = by_path(tree)
    assert nodes["1"].data == b"hello" and nodes["1"].content_type == "text/plain"
    # RFC 2231 continuation: the charset of the first section, the second not encoded
    assert "2:résum%C3%A9.pdf" in nodes and nodes["2:résum%C3%A9.pdf"].data == b"%PDF"
    assert nodes["3:naïve.bin"].name == "naïve.bin"
    assert nodes["4"].data == "café ok".encode()
    assert tree.defects == []


def test_bogus_charsets_in_names_fall_back_to_latin1() -> None:
    raw = mime_message(
        [
            ("Content-Type: application/octet-stream; name*=ut\x00f8''%E9t%E9.bin", b"a"),
            ("Content-Type: application/octet-stream; name*=zlib''%E9.bin", b"b"),
            ('Content-Type: application/octet-stream; name="=?x-unknown?q?=E9t=E9.bin?="', b"c"),
        ]
    )
    assert [n.name for n in decompose(raw).walk() if n.name] == ["été.bin", "é.bin", "été.bin"]


def test_name_of_countless_encoded_words_is_decoded_within_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    # decode_header joins adjacent words quadratically (50,000 words took seconds): it only ever
    # sees the first MAX_ENCODED_NAME characters of a name
    seen: list[int] = []
    real = mime_module.decode_header
    monkeypatch.setattr(mime_module, "decode_header", lambda value: seen.append(len(value)) or real(value))
    raw = mime_message([(f'Content-Type: application/octet-stream; name="{"=?utf-8?q?x?= " * 50_000}"', b"a")])
    tree = decompose(raw)
    assert seen and max(seen) <= mime_module.MAX_ENCODED_NAME
    assert [n.name for n in tree.walk() if n.name] == ["x" * 255]


def test_nested_message_zip_uu_and_tar_paths() -> None:
    inner = mime_message(
        [
            ("Content-Type: text/plain", b"inner text"),
            attachment("invoice.zip", zip_bytes({"readme.exe": b"MZ1"})),
        ],
        boundary="inner",
    )
    uu = b"see attached\r\nbegin 644 tool.com\r\n" + _uu(b"MZ payload") + b"end\r\nbye"
    raw = mime_message(
        [
            ("Content-Type: text/plain", uu),
            ('Content-Type: message/rfc822; name="fwd.eml"', inner),
            attachment("logs.tar.gz", tar_gz({"dir/a.txt": b"A", "b.bin": b"B"}), "application/gzip"),
            attachment("one.gz", _gzip(b"plain gz", fname=b"one.txt"), "application/gzip"),
        ]
    )
    nodes = by_path(decompose(raw))
    assert nodes["1:tool.com"].data == b"MZ payload" and nodes["1:tool.com"].kind == "uuencoded"
    assert nodes["2:fwd.eml"].kind == "message"
    assert nodes["2/1"].data == b"inner text"
    assert nodes["2/2:invoice.zip/readme.exe"].data == b"MZ1"
    assert nodes["2/2:invoice.zip"].archive == "zip"
    assert nodes["3:logs.tar.gz/logs.tar/dir/a.txt"].data == b"A"
    assert nodes["3:logs.tar.gz/logs.tar/b.bin"].data == b"B"
    assert nodes["4:one.gz/one.txt"].data == b"plain gz"


def _uu(data: bytes) -> bytes:
    import binascii

    lines = (binascii.b2a_uu(data[i : i + 45]) for i in range(0, len(data), 45))
    return b"".join(line.replace(b"\n", b"\r\n") for line in lines) + b"`\r\n"


def _gzip(data: bytes, fname: bytes) -> bytes:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = deflater.compress(data) + deflater.flush()
    header = b"\x1f\x8b\x08\x08" + b"\0" * 4 + b"\x00\x03" + fname + b"\0"
    return header + body + struct.pack("<II", zlib.crc32(data), len(data))


def test_single_part_message_and_encapsulated_single_part() -> None:
    raw = b"Subject: x\nContent-Type: application/octet-stream; name=a.bin\n\nDATA"
    assert [(n.path, n.data) for n in decompose(raw).walk()] == [("1:a.bin", b"DATA")]
    inner = b"Subject: inner\r\n\r\nbody"
    raw = mime_message([("Content-Type: message/rfc822", inner)])
    assert by_path(decompose(raw))["1/1"].data == b"body"


def test_encrypted_zip_member_is_protected() -> None:
    raw = mime_message([attachment("s.zip", encrypted_zip("secret.doc", b"data", b"pw"))])
    member = by_path(decompose(raw))["1:s.zip/secret.doc"]
    assert member.status == "protected" and member.reason == "encrypted zip member"


@pytest.mark.parametrize(
    "data, reason",
    [
        (zip_bytes({"a.txt": b"x" * 1000})[:-30], "corrupt zip"),  # central directory cut
        (tar_gz({"a": b"y" * 5000})[:-40], "truncated gzip"),
    ],
)
def test_truncated_archives_are_errors(data: bytes, reason: str) -> None:
    tree = decompose(mime_message([attachment("t.bin", data)]))
    bad = [n for n in tree.walk() if n.status == "error"]
    assert bad and reason in bad[0].reason


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_corrupt_compressed_zip_member_is_an_error(method: int) -> None:
    packed = bytearray(zip_bytes({"a.txt": random.Random(7).randbytes(3000)}, method))
    start = 30 + len("a.txt") + 40  # inside the compressed data, past any method header
    packed[start : start + 100] = bytes(b ^ 0x55 for b in packed[start : start + 100])
    tree = decompose(mime_message([attachment("c.zip", bytes(packed))]))
    member = by_path(tree)["1:c.zip/a.txt"]
    assert member.status == "error" and "unreadable archive member" in member.reason
    assert by_path(tree)["1:c.zip"].status == "error"


def test_broken_base64_is_an_error_and_footers_are_defects() -> None:
    good = base64.b64encode(b"abcdefgh").decode()  # 12 characters
    raw = mime_message(
        [
            ("Content-Type: application/octet-stream\n" + B64, good[:-3].encode()),  # one stray char
            ("Content-Type: text/plain\n" + B64, good.encode() + b"\r\n-- \r\nlist footer"),
            ("Content-Type: text/plain\nContent-Transfer-Encoding: quoted-printable", b"a=ZZb=4"),
        ]
    )
    tree = decompose(raw)
    nodes = by_path(tree)
    assert nodes["1"].status == "error" and "truncated base64" in nodes["1"].reason
    assert nodes["2"].status is None and nodes["2"].data.startswith(b"abcdefgh")
    assert nodes["3"].status is None and nodes["3"].data == b"a=ZZb=4"  # lenient
    assert any("outside the base64 alphabet" in d for d in tree.defects)
    assert any("quoted-printable" in d for d in tree.defects)


# endregion
# region tar


def tar_of_every_kind(fmt: int) -> bytes:
    """Regular files (empty, spanning many blocks, long and non-ASCII names), a directory,
    links and a FIFO, written by the standard library in ``fmt``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        files = {"a.txt": b"alpha", "empty": b"", "d/" + "long" * 40 + ".bin": random.Random(5).randbytes(70_000),
                 "caf\u00e9.txt": b"unicode"}
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, kind in (("d", tarfile.DIRTYPE), ("sym", tarfile.SYMTYPE), ("hard", tarfile.LNKTYPE),
                           ("fifo", tarfile.FIFOTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "a.txt" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            archive.addfile(info)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_members_are_those_the_standard_library_reads(fmt: int) -> None:
    data = tar_of_every_kind(fmt) if fmt != tarfile.USTAR_FORMAT else tar_bytes({"a.txt": b"alpha", "b/c": b"c"})
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        expected = {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}
    tree = decompose(mime_message([attachment("t.tar", data)]))
    got = {node.path.split(":t.tar/", 1)[1]: node.data for node in tree.walk() if node.kind == "member"}
    assert {name[:255]: content for name, content in expected.items()} == got
    assert all(node.status is None for node in tree.walk())


def test_a_pax_header_of_digits_is_refused_before_any_quadratic_parse() -> None:
    """CVE-2024-6232: the standard library's pax parsing took time quadratic in a header of
    digits (600,000 of them kept a worker busy past the job timeout). The archive is an error."""
    data = tar_bytes({"x.txt": b"x"}, b"1" * 600_000)
    node = by_path(decompose(mime_message([attachment("p.tar", data)])))["1:p.tar"]
    assert node.status == "error" and "tar extended header of 600000 bytes" in node.reason, node.reason
    assert not node.children
    assert "tarfile" not in vars(archives_module)  # the standard library's reader is not reachable


class CountingBytes(bytes):
    """Bytes whose ``find`` reports the span of every search, to bound a parser's work."""

    scanned = 0

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:  # type: ignore[override]
        stop = len(self) if end is None else min(end, len(self))
        CountingBytes.scanned += max(0, stop - start)
        return super().find(sub, start, end)


@pytest.mark.parametrize("content", [b"1" * 60_000, b"9 a=b\n" * 10_000, b"99999 " + b"x" * 60_000])
def test_pax_records_are_read_in_one_pass(content: bytes) -> None:
    CountingBytes.scanned = 0
    try:
        records = archives_module._pax_records(CountingBytes(content))
    except archives_module.CorruptTar:
        records = {}
    assert CountingBytes.scanned <= len(content) + 64, CountingBytes.scanned
    assert records in ({}, {"a": "b"})


def test_pax_and_gnu_long_names_and_pax_size_are_applied() -> None:
    long_name = "dir/" + "n" * 300 + ".exe"
    record = f" path={long_name}\n"
    length = len(record) + len(str(len(record) + 3))
    data = tar_bytes({"short": b"MZ payload"}, f"{length}{record}".encode())
    nodes = by_path(decompose(mime_message([attachment("l.tar", data)])))
    [member] = [n for n in nodes.values() if n.kind == "member"]
    assert member.data == b"MZ payload" and member.name == long_name[:255]


def test_cut_and_corrupt_tars_are_errors_that_keep_what_was_read() -> None:
    data = tar_bytes({"a.txt": b"A" * 2000, "b.txt": b"B" * 2000})
    cut = data[: 512 + 1000]
    nodes = by_path(decompose(mime_message([attachment("cut.tar", cut)])))
    assert nodes["1:cut.tar"].status == "error" and "unexpected end of data" in nodes["1:cut.tar"].reason
    assert nodes["1:cut.tar/a.txt"].status == "error" and nodes["1:cut.tar/a.txt"].data == b"A" * 1000
    bad = bytearray(data)
    bad[2560 + 10] ^= 0xFF  # the second header's name: its checksum no longer matches
    nodes = by_path(decompose(mime_message([attachment("bad.tar", bytes(bad))])))
    assert nodes["1:bad.tar"].status == "error" and "checksum" in nodes["1:bad.tar"].reason
    assert nodes["1:bad.tar/a.txt"].data == b"A" * 2000


def test_tar_entries_count_toward_the_member_limit() -> None:
    data = tar_bytes({f"m{i}": b"" for i in range(6)})
    node = by_path(decompose(mime_message([attachment("many.tar", data)]), Limits(max_members=5)))["1:many.tar"]
    assert node.status == "error" and "MaximalArchiveMembers" in node.reason


# endregion
# region limits


def bomb_member_and_peak(packed: bytes) -> tuple[MimeObject, int]:
    """The member zeros.bin of the zip ``packed`` sent as bomb.zip, and decomposition's peak memory."""
    raw = mime_message([attachment("bomb.zip", packed, "application/zip")])
    tracemalloc.start()
    try:
        tree = decompose(raw, Limits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return by_path(tree)["1:bomb.zip/zeros.bin"], peak


def test_zip_bomb_stops_early_with_bounded_memory() -> None:
    declared = 256 << 20
    packed = zeros_zip("zeros.bin", declared)
    member, peak = bomb_member_and_peak(packed)
    assert member.status == "error" and "MaximalCompressionRatio" in member.reason
    # stopped once past ratio * packed size (~26 MiB here), far below the declared 256 MiB
    assert peak < 1.5 * Limits().max_ratio * len(packed) + (4 << 20), peak


def test_gzip_stream_of_countless_members_is_fed_to_zlib_in_bounded_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    # each gzip member used to be fed the whole rest of the stream, which zlib copies (quadratic
    # in the number of members): zlib is now handed at most CHUNK bytes at a time
    fed: list[int] = []
    real = archives_module.zlib.decompressobj

    class Counting:
        def __init__(self, *args: object) -> None:
            self.inner = real(*args)

        def decompress(self, data: bytes, max_length: int = 0) -> bytes:
            fed.append(len(data))
            return self.inner.decompress(data, max_length)

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

    monkeypatch.setattr(archives_module.zlib, "decompressobj", Counting)
    empty = _gzip(b"", fname=b"m")
    stream = _gzip(b"first", fname=b"m") + empty * 20_000 + _gzip(b"last", fname=b"m")
    raw = mime_message([attachment("m.gz", stream, "application/gzip")])
    tree = decompose(raw)
    assert by_path(tree)["1:m.gz/m"].data == b"firstlast"
    assert len(stream) > 4 * archives_module.CHUNK and max(fed) <= archives_module.CHUNK


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_bzip2_and_lzma_zip_bombs_stop_with_bounded_memory(method: int) -> None:
    packed = zip_bytes({"zeros.bin": bytes(64 << 20)}, method)  # 179 bytes with bzip2
    member, peak = bomb_member_and_peak(packed)
    assert member.status == "error" and "MaximalCompressionRatio" in member.reason
    assert peak < 16 << 20, peak  # zipfile inflated all 64 MiB in one read; LZMA keeps an 8 MiB dictionary


def test_bzip2_and_lzma_zip_members_are_read_whole() -> None:
    for method in (zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        content = {"a.txt": b"alpha " * 50_000, "empty": b"", "b.bin": random.Random(3).randbytes(70_000)}
        tree = decompose(mime_message([attachment("m.zip", zip_bytes(content, method))]))
        nodes = by_path(tree)
        assert {name: nodes[f"1:m.zip/{name}"].data for name in content} == content
        assert all(node.status is None for node in tree.walk())


def test_expanded_size_member_count_and_depth_limits() -> None:
    limits = Limits(max_depth=2, max_members=3, max_expanded=4096, max_ratio=100)
    big = mime_message([attachment("big.zip", zip_bytes({"a": os.urandom(3000), "b": os.urandom(3000)}))])
    node = by_path(decompose(big, limits))["1:big.zip"]
    assert node.status == "error" and "MaximalExpandedSize" in node.reason
    many = mime_message([attachment("many.zip", zip_bytes({f"m{i}": b"x" for i in range(5)}))])
    node = by_path(decompose(many, limits))["1:many.zip"]
    assert node.status == "error" and "MaximalArchiveMembers" in node.reason
    nested = zip_bytes({"l2.zip": zip_bytes({"l3.zip": zip_bytes({"deep.txt": b"d"})})})
    tree = decompose(mime_message([attachment("l1.zip", nested)]), limits)
    deepest = by_path(tree)["1:l1.zip/l2.zip/l3.zip"]
    assert deepest.status == "error" and "MaximalArchiveDepth" in deepest.reason
    assert "1:l1.zip/l2.zip/l3.zip/deep.txt" not in by_path(tree)


def test_scan_archives_off_leaves_archives_whole() -> None:
    raw = mime_message([attachment("a.zip", zip_bytes({"x": b"1"}))])
    node = by_path(decompose(raw, Limits(scan_archives=False)))["1:a.zip"]
    assert node.children == [] and node.data.startswith(b"PK")


def test_mime_nesting_and_part_count_bounds() -> None:
    raw = b"Content-Type: text/plain\n\nbottom"
    for level in range(MAX_MIME_DEPTH + 5):
        head = b'Content-Type: multipart/mixed; boundary="b%d"\n\n' % level
        raw = head + b"--b%d\n%s\n--b%d--\n" % (level, raw, level)
    tree = decompose(raw)
    assert any(n.status == "error" and "nesting" in n.reason for n in tree.walk())
    parts = b"--b\n\nx\n" * (MAX_MIME_PARTS + 10)
    many = b'Content-Type: multipart/mixed; boundary="b"\n\n' + parts + b"--b--\n"
    tree = decompose(many)
    assert tree.root.status == "error" and len(tree.root.children) <= MAX_MIME_PARTS


def test_mime_fields_past_the_header_field_bound_still_count() -> None:
    # found by bench/fuzz.py: a Content-Type after 500 other fields was ignored, so the parts it
    # declared (an .exe here) were one text body to the attachment filter, not to mail readers
    padding = b"".join(b"X-Pad-%d: v\r\n" % i for i in range(MAX_HEADER_FIELDS))
    raw = (b"Subject: invoice\r\n" + padding + b"X-Folded: a\r\n b\r\n"
           b'Content-Type: multipart/mixed; boundary="b"\r\nContent-Type: text/plain\r\n\r\n'
           b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
           b'--b\r\nContent-Type: application/octet-stream; name="run.exe"\r\nContent-Transfer-Encoding: base64\r\n'
           b"\r\nTVo=\r\n--b--\r\n")
    tree = decompose(raw)
    assert [(n.path, n.data) for n in tree.walk()] == [("", None), ("1", b"see attached"), ("2:run.exe", b"MZ")]
    assert tree.defects == ["message: more than 500 header fields"]


# endregion
# region malformed input


def test_missing_close_delimiter_preamble_nul_and_8bit_headers() -> None:
    raw = (
        b"From sender@x Mon Jan  1 00:00:00 2024\n"
        b"Subject: caf\xe9 \xff\x00\n"
        b'Content-Type: multipart/mixed; boundary="zz"\n\n'
        b"preamble --zz not a delimiter\n"
        b"--zzz not a delimiter either\n"
        b"--zz\nContent-Type: text/plain\n\nfirst\x00part\n"
        b"--zz  \t\nContent-Type: application/octet-stream; name=\"\xe9t\xe9.bin\"\n\nsecond"
    )
    tree = decompose(raw)
    nodes = by_path(tree)
    assert nodes["1"].data == b"first\x00part"
    assert nodes["2:été.bin"].data == b"second"  # 8-bit name read as Latin-1
    assert any("missing close-delimiter" in d for d in tree.defects)


def test_boundary_never_found_and_header_only_entities() -> None:
    tree = decompose(b'Content-Type: multipart/mixed; boundary="q"\n\nno delimiters here\n')
    assert [n.data for n in tree.walk()] == [b"no delimiters here\n"]
    assert any("not found" in d for d in tree.defects)
    tree = decompose(b"Subject: only headers")
    assert tree.root.data == b"" and tree.root.path == "1"


def test_mutated_messages_never_raise() -> None:
    nested = mime_message([attachment("n.zip", zip_bytes({"n": b"n"}))], b"\n", "inner")
    seed = mime_message(
        [
            ("Content-Type: text/plain", b"begin 644 a.com\r\n" + _uu(b"payload") + b"end\r\n"),
            attachment("a.zip", zip_bytes({"x.txt": b"hello" * 50, "y.bin": b"\0" * 300})),
            attachment("t.tgz", tar_gz({"f": b"data" * 40})),
            attachment("e.zip", encrypted_zip("e.txt", b"secret" * 20, b"pw")),
            ("Content-Type: message/rfc822", nested),
        ]
    )
    rng = random.Random(2024)
    for _ in range(400):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(data))
            choice = rng.random()
            if choice < 0.4:
                data[pos] = rng.randrange(256)
            elif choice < 0.7:
                del data[pos : pos + rng.randint(1, 200)]
            else:
                data[pos:pos] = data[rng.randrange(len(data)) :][: rng.randint(1, 200)]
        raw = bytes(data)
        tree = decompose(raw)
        assert rebuild(raw, []) == raw
        for node in tree.walk():
            if node.cut:
                rebuild(raw, [Edit(node)])


# endregion
# region rebuilding


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_remove_keeps_every_other_byte(eol: bytes) -> None:
    raw = mime_message(
        [
            ("Content-Type: text/plain", b"first"),
            attachment("bad.exe", b"MZ" * 40),
            ("Content-Type: text/plain\nX-Folded: a\n  b", b"last"),
        ],
        eol=eol,
    )
    tree = decompose(raw)
    for node in leaves(tree):
        assert node.cut is not None
        out = rebuild(raw, [Edit(node)])
        start, end = node.cut
        assert out == raw[:start] + raw[end:]
        remaining = [n.path.split(":")[0] for n in leaves(decompose(out))]
        assert len(remaining) == 2
        assert not decompose(out).defects


def test_removing_all_parts_and_nested_parts() -> None:
    inner = mime_message([("Content-Type: text/plain", b"keep"), attachment("v.bin", b"virus")], boundary="in")
    raw = mime_message([("Content-Type: text/plain", b"outer"), ("Content-Type: message/rfc822", inner)])
    nodes = by_path(decompose(raw))
    out = rebuild(raw, [Edit(nodes["2/2:v.bin"])])
    assert b"virus" not in out and b"keep" in out and b"outer" in out
    # removing an object and the message holding it: the outer removal wins
    out = rebuild(raw, [Edit(nodes["2/2:v.bin"]), Edit(nodes["2"])])
    assert out == raw[: nodes["2"].cut[0]] + raw[nodes["2"].cut[1] :]
    out = rebuild(raw, [Edit(nodes["1"]), Edit(nodes["2"])])
    assert b"outer" not in out and b"keep" not in out and out.startswith(raw[: nodes["1"].cut[0]])


def test_placeholder_replaces_only_the_object_span() -> None:
    raw = mime_message(
        [
            ("Content-Type: text/plain", b"first"),
            attachment("a.zip", zip_bytes({"evil.exe": b"MZ"})),
            ("Content-Type: text/plain", b"z"),
        ],
        eol=b"\n",
    )
    tree = decompose(raw)
    member = by_path(tree)["2:a.zip/evil.exe"]
    target = member.edit_target()
    assert target.path == "2:a.zip"
    out = rebuild(raw, [Edit(member, "removed: evil.exe\nsecond line")])
    assert out.startswith(raw[: target.start]) and out.endswith(raw[target.end :])
    middle = out[target.start : len(out) - (len(raw) - target.end)]
    assert b"\r" not in middle  # the message's own line ending
    assert b'Content-Type: text/plain; charset="us-ascii"' in middle
    assert middle.endswith(b"\n\nremoved: evil.exe\nsecond line")
    again = by_path(decompose(out))
    assert again["2"].data == b"removed: evil.exe\nsecond line"


def test_single_part_body_removed_becomes_empty_text() -> None:
    raw = b"From: a@b\r\nSubject: s\r\nContent-Type: application/x-msdownload; name=x.exe\r\n\r\nMZ...."
    tree = decompose(raw)
    out = rebuild(raw, [Edit(tree.root)])
    assert out.startswith(b"From: a@b\r\nSubject: s\r\n")
    assert b"MZ" not in out and b"Content-Type: text/plain" in out
    assert decompose(out).root.data == b""


def test_uuencoded_block_is_edited_in_place() -> None:
    text = b"before\r\nbegin 644 x.com\r\n" + _uu(b"MZ bad") + b"end\r\nafter\r\n"
    raw = mime_message([("Content-Type: text/plain", text), ("Content-Type: text/plain", b"two")])
    block = by_path(decompose(raw))["1:x.com"]
    out = rebuild(raw, [Edit(block)])
    assert out == raw[: block.start] + raw[block.end :]
    assert b"before\r\nafter\r\n" in out
    out = rebuild(raw, [Edit(block, "x.com was removed")])
    assert b"before\r\nx.com was removed\r\nafter" in out


# endregion
# region corpus


def corpus_files() -> list[Path]:
    if not CORPUS or not os.path.isdir(CORPUS):
        missing(f"corpus not found at {CORPUS}")
    files = sorted(
        p
        for folder in ("mime-torture", "spamassassin")
        for p in Path(CORPUS, folder).rglob("*.eml")
    )
    if not files:
        missing(f"no .eml files under {CORPUS}")
    return files


def test_corpus_decomposes_and_rebuilds_byte_exact() -> None:
    files = corpus_files()
    for path in files:
        raw = path.read_bytes()
        tree = decompose(raw)
        assert rebuild(raw, []) == raw
        for node in tree.walk():
            if node.cut is not None:
                start, end = node.cut
                out = rebuild(raw, [Edit(node)])
                if node.parent is not None and len(node.parent.children) > 1:
                    assert out == raw[:start] + raw[end:], (path, node.path)
                else:  # a multipart's only part stays, as an empty text part (RFC 2046 §5.1.1)
                    assert node.start is not None and node.end is not None
                    assert out.startswith(raw[: node.start]) and out.endswith(raw[node.end :]), (path, node.path)
                    assert b"text/plain" in out[node.start : len(out) - (len(raw) - node.end)], (path, node.path)
            elif node.start is not None and node.kind == "part":
                out = rebuild(raw, [Edit(node, "x")])
                assert out.startswith(raw[: node.start]) and out.endswith(raw[node.end :]), (path, node.path)
    assert len(files) > 4000


# endregion
