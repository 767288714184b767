"""Reading the members of zip, tar and gzip archives inside a message, within bounds.

Owns: recognising an archive by its magic bytes; the ``[smtpgw.ave]`` archive
bounds (``Limits``) and the per-message budgets they set; bounded
decompression of each member (zip, tar, gzip with every gzip member of the
stream, RFC 1952 §2.2), stopping as soon as ``MaximalArchiveMembers``,
``MaximalExpandedSize`` or ``MaximalCompressionRatio`` is crossed; refusing an
oversized zip central directory before it is read; reading tar headers itself
(ustar, pax ``x``/``g`` and GNU ``L``/``K`` extended headers, old GNU sparse),
each in one pass, extended headers bounded by ``MAX_TAR_HEADER``; and marking
encrypted zip members ``protected`` and unreadable ones ``error``.

Must never: read more output than the budgets allow (decompression goes in
``CHUNK`` steps), let a bound be crossed silently, write anything to disk,
run a subprocess, or build the object tree (``smtpgw.mime`` turns members
into tree nodes and opens nested archives through ``Budget.members`` again).

Decisions (documented behaviour):
* Archives are recognised by their magic bytes, not by their names.
  ``MaximalArchiveMembers`` and ``MaximalExpandedSize`` are budgets for the
  whole message (they bound the work one message can cause);
  ``MaximalArchiveDepth`` bounds archive nesting; ``MaximalCompressionRatio``
  applies per member once its output passes ``RATIO_FLOOR`` (small members
  cannot be bombs).
* Tar is not read with the standard library's ``tarfile``: its pax parsing
  takes time quadratic in a header's size (CVE-2024-6232, unfixed in Python
  3.11), and it stops silently at a bad header. Here an extended header over
  ``MAX_TAR_HEADER`` (64 KiB: ample for names, links and attributes) exceeds
  a limit, and a header with a bad checksum or cut short makes the archive an
  error, so that it goes whole to the scanner too. The members are the regular
  files; sparse files are read as stored.
* A member that cannot be read keeps what could be read of it (still
  scanned) and makes its archive an error too, so that the archive as a whole
  still goes to the scanner (which may read more of it than we did).
"""

from __future__ import annotations

import bz2
import io
import lzma
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import IO, Any

from smtpgw.rules.policy import ERROR, PROTECTED

__all__ = [
    "ARCHIVE_ERRORS",
    "Budget",
    "LimitExceeded",
    "Limits",
    "Member",
    "archive_format",
]

CHUNK = 64 * 1024  # decompression step: bounded memory per read
MAX_TAR_HEADER = 64 * 1024  # bytes of one pax or GNU extended header (names, links, attributes)
MAX_PAX_DIGITS = 20  # digits of a pax record's length
RATIO_FLOOR = 1 << 20  # a member must expand past 1 MiB before its ratio counts
# tar typeflags (POSIX.1-2017 pax, ustar Interchange Format; GNU tar's extensions)
_TAR_FILES = {b"0", b"\0", b"7", b"S"}  # regular, old regular, contiguous, GNU sparse
_TAR_EXTENDED = {b"x", b"g", b"L", b"K"}  # headers describing the next entry (or all of them)
_TAR_NO_DATA = {b"1", b"2", b"3", b"4", b"5", b"6"}  # links, devices, directories, FIFOs

# The stdlib archive readers report malformed input through this family.
ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    lzma.LZMAError,  # zipfile: a corrupt LZMA member (bzip2 reports OSError)
    struct.error,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,  # zipfile: a compression method it does not support
    RuntimeError,
    KeyError,
    IndexError,
    OverflowError,
    UnicodeError,
)


@dataclass(frozen=True)
class Limits:
    """Per-message bounds, from ``[smtpgw.ave]`` (KB values converted to bytes).

    The archive bounds, and the message's scan budget: objects made
    (MIME entities, uuencoded blocks, archive members), bytes of content they
    hold (decoded bodies, uudecoded blocks, archive members) and clamd scans.
    """

    max_depth: int = 8
    max_members: int = 1000
    max_expanded: int = 102400 * 1024
    max_ratio: int = 100
    scan_archives: bool = True
    max_objects: int = 5000
    max_decoded: int = 204800 * 1024
    max_clamd_scans: int = 1000

    @classmethod
    def from_ave(cls, ave: Any) -> Limits:
        return cls(
            max_depth=int(getattr(ave, "MaximalArchiveDepth", cls.max_depth)),
            max_members=int(getattr(ave, "MaximalArchiveMembers", cls.max_members)),
            max_expanded=int(getattr(ave, "MaximalExpandedSize", 102400)) * 1024,
            max_ratio=int(getattr(ave, "MaximalCompressionRatio", cls.max_ratio)),
            scan_archives=bool(getattr(ave, "ScanArchives", True)),
            max_objects=int(getattr(ave, "MaximalMessageObjects", cls.max_objects)),
            max_decoded=int(getattr(ave, "MaximalDecodedSize", 204800)) * 1024,
            max_clamd_scans=int(getattr(ave, "MaximalClamdScans", cls.max_clamd_scans)),
        )


@dataclass(frozen=True)
class Member:
    """One file of an archive: its name as stored, and what could be read of it.

    ``status`` is ERROR or PROTECTED when the member could not be read whole;
    ``corrupt`` names the read failure that makes the archive itself an error.
    """

    name: str
    data: bytes | None
    status: str | None = None
    reason: str = ""
    corrupt: str = ""


class LimitExceeded(Exception):
    """A decomposition bound was crossed; the message says which."""


def archive_format(data: bytes) -> str:
    """``zip``, ``gzip`` or ``tar`` from the magic bytes; empty when none."""
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if len(data) >= 512 and data[257:262] == b"ustar":  # POSIX.1-1988 ustar magic
        return "tar"
    return ""


class Budget:
    """One message's archive budgets: members opened and bytes expanded so far."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.members = 0
        self.expanded = 0

    def members_of(self, fmt: str, data: bytes, outer_name: str, depth: int) -> Iterator[Member]:
        """The members of an archive at nesting ``depth``, one at a time.

        Raises ``LimitExceeded`` when a bound for the whole archive is crossed
        and one of ``ARCHIVE_ERRORS`` when the archive is corrupt. The caller
        may open a member (a nested archive) before taking the next one: the
        budgets are shared.
        """
        if depth > self.limits.max_depth:
            raise LimitExceeded(
                f"archives nested deeper than MaximalArchiveDepth ({self.limits.max_depth})"
            )
        if fmt == "zip":
            yield from self._zip(data)
        elif fmt == "tar":
            yield from self._tar(data)
        else:
            yield from self._gzip(data, outer_name)

    def _count(self) -> None:
        if self.members >= self.limits.max_members:
            raise LimitExceeded(
                f"more than MaximalArchiveMembers ({self.limits.max_members}) archive members"
            )
        self.members += 1

    def _read(self, chunks: Iterable[bytes], packed_size: int, out: bytearray) -> None:
        """Collect decompressed output into ``out``, stopping as soon as a bound is crossed."""
        limit = self.limits.max_ratio * max(packed_size, 1)
        for chunk in chunks:
            out += chunk
            self.expanded += len(chunk)
            if self.expanded > self.limits.max_expanded:
                raise LimitExceeded(
                    f"expanded size above MaximalExpandedSize ({self.limits.max_expanded // 1024} KB)"
                )
            if len(out) > RATIO_FLOOR and len(out) > limit:
                raise LimitExceeded(
                    f"compression ratio above MaximalCompressionRatio ({self.limits.max_ratio})"
                )

    def _fill(self, name: str, chunks: Iterable[bytes], packed_size: int) -> Iterator[Member]:
        """Read one member; a ratio breach marks the member, a budget breach the archive.

        A corrupt member keeps what could be read of it, which is still scanned.
        """
        out = bytearray()
        try:
            self._read(chunks, packed_size, out)
        except LimitExceeded as exc:
            yield Member(name, b"", ERROR, str(exc))
            if self.expanded > self.limits.max_expanded:
                raise
            return
        except ARCHIVE_ERRORS as exc:
            yield _unreadable(name, exc, bytes(out))
            return
        yield Member(name, bytes(out))

    def _zip(self, data: bytes) -> Iterator[Member]:
        refused = _zip_directory_too_big(data, self.limits)
        if refused:
            raise LimitExceeded(refused)
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                self._count()
                # APPNOTE 4.4.4: bit 0 encrypted, bit 6 strong encryption
                if info.flag_bits & 0x41:
                    yield Member(info.filename, b"", PROTECTED, "encrypted zip member")
                    continue
                if info.compress_type in (zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
                    # zipfile inflates these without an output bound per read
                    unpacked = _zip_unpacked(data, info, min(info.file_size, self.limits.max_expanded))
                    yield from self._fill(info.filename, unpacked, info.compress_size)
                    continue
                try:
                    stream = archive.open(info)
                except ARCHIVE_ERRORS as exc:
                    yield _unreadable(info.filename, exc, b"")
                    continue
                with stream:
                    yield from self._fill(info.filename, _chunks(stream), info.compress_size)

    def _tar(self, data: bytes) -> Iterator[Member]:
        entries = 0
        for entry in _tar_entries(data):
            entries += 1  # directories and links count too
            if entries > self.limits.max_members:
                raise LimitExceeded(
                    f"more than MaximalArchiveMembers ({self.limits.max_members}) archive entries"
                )
            if entry.kind not in _TAR_FILES:
                continue
            self._count()
            stop = entry.offset + entry.size
            view = memoryview(data)[entry.offset : min(stop, len(data))]
            yield from self._fill(entry.name, _tar_chunks(view, entry.size), entry.size)

    def _gzip(self, data: bytes, outer_name: str) -> Iterator[Member]:
        name = _gzip_name(data)
        if not name:
            outer = outer_name or "unnamed"
            lowered = outer.lower()
            if lowered.endswith(".tgz"):
                name = outer[:-4] + ".tar"
            elif lowered.endswith(".gz"):
                name = outer[:-3]
            else:
                name = outer + ".ungzipped"
        self._count()
        yield from self._fill(name, _gunzip_chunks(data), len(data))


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    """A member's stream read in ``CHUNK`` steps, so no read is unbounded."""
    return iter(partial(stream.read, CHUNK), b"")


class CorruptTar(ValueError):
    """A tar header that cannot be read, or data cut short."""


@dataclass(frozen=True)
class _TarEntry:
    name: str
    kind: bytes  # the typeflag (POSIX.1-2017 pax, ustar Interchange Format)
    offset: int  # where its data starts in the archive
    size: int


def _tar_number(field: bytes) -> int:
    """A ustar numeric field: octal digits ended by NUL or space, or GNU base-256 (first byte 0x80)."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if len(text) > 22 or text.strip(b"01234567"):
        raise CorruptTar(f"bad number {bytes(field)!r} in tar header")
    return int(text, 8)


def _tar_checksum_ok(block: bytes) -> bool:
    """POSIX ustar chksum: the byte sum of the header with the chksum field as spaces
    (a sum of signed bytes accepted too, as old tar programs wrote it)."""
    rest = block[:148] + block[156:]
    unsigned = sum(rest) + 8 * 0x20
    high = len(rest.translate(None, bytes(range(128))))  # bytes that count negative when signed
    return _tar_number(block[148:156]) in (unsigned, unsigned - 256 * high)


def _pax_records(data: bytes) -> dict[str, str]:
    """pax extended header records ``"%d %s=%s\\n"`` (POSIX.1-2017 pax, Extended Header),
    read in one linear pass: each length is at most ``MAX_PAX_DIGITS`` digits."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + MAX_PAX_DIGITS + 1)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise CorruptTar("bad pax record length")
        end = pos + int(digits)
        if end > len(data) or end <= space + 1 or data[end - 1] != 0x0A:
            raise CorruptTar("bad pax record")
        key, sep, value = data[space + 1 : end - 1].partition(b"=")
        if not sep:
            raise CorruptTar("pax record without '='")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos = end
    return records


def _tar_entries(data: bytes) -> Iterator[_TarEntry]:
    """The entries of a tar archive, their extended headers (pax ``x``/``g``, GNU ``L``/``K``)
    applied; ends at the end-of-archive zero block or the end of the data.

    The standard library's reader is not used: its pax parsing takes time quadratic in the
    header's size (CVE-2024-6232), and headers of any size are taken. Here an extended
    header larger than ``MAX_TAR_HEADER`` bytes is refused (``LimitExceeded``), and each
    header is read once.
    """
    pos = 0
    pending: dict[str, str] = {}  # what extended headers say about the next entry
    while pos + 512 <= len(data):
        block = data[pos : pos + 512]
        if not block.strip(b"\0"):
            return  # end of archive
        if not _tar_checksum_ok(block):
            raise CorruptTar(f"bad tar header checksum at offset {pos}")
        kind = block[156:157]
        size = _tar_number(block[124:136])
        if size < 0:
            raise CorruptTar(f"negative size in tar header at offset {pos}")
        start = pos + 512
        if kind in _TAR_EXTENDED:
            if size > MAX_TAR_HEADER:
                raise LimitExceeded(f"tar extended header of {size} bytes (more than {MAX_TAR_HEADER})")
            content = data[start : start + size]
            if len(content) < size:
                raise CorruptTar("tar extended header cut short")
            if kind == b"x":
                pending.update(_pax_records(content))
            elif kind == b"g":
                _pax_records(content)  # checked, not needed: global values name nothing we read
            elif kind == b"L":
                pending["path"] = content.split(b"\0", 1)[0].decode("utf-8", "replace")
            pos = start + _tar_blocks(size)
            continue
        name = pending.get("path") or _tar_name(block)
        if "size" in pending:
            if not re.fullmatch(r"[0-9]{1,20}", pending["size"]):
                raise CorruptTar("bad pax size")
            size = int(pending["size"])
        pending = {}
        extended = kind == b"S" and block[482]  # old GNU sparse: extension blocks follow the header
        while extended:
            if start + 512 > len(data):
                raise CorruptTar("tar sparse header cut short")
            extended, start = data[start + 504], start + 512
        if kind in _TAR_NO_DATA:
            size = 0  # these types store no data, whatever their size field says
        if kind in (b"0", b"\0") and name.endswith("/"):
            kind = b"5"  # an old-style directory entry
        yield _TarEntry(name, kind, start, size)
        pos = start + _tar_blocks(size)
    if pos < len(data) and data[pos:].strip(b"\0"):
        raise CorruptTar("tar header cut short")


def _tar_blocks(size: int) -> int:
    return (size + 511) // 512 * 512


def _tar_name(block: bytes) -> str:
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0":  # POSIX ustar: prefix/name (GNU tar uses the field otherwise)
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


def _tar_chunks(view: memoryview, size: int) -> Iterator[bytes]:
    """A member's data in ``CHUNK`` steps; raises CorruptTar when the archive ends before it does."""
    for offset in range(0, len(view), CHUNK):
        yield bytes(view[offset : offset + CHUNK])
    if len(view) < size:
        raise CorruptTar("unexpected end of data in tar member")


def _zip_unpacked(data: bytes, info: zipfile.ZipInfo, max_size: int) -> Iterator[bytes]:
    """A bzip2 or LZMA zip member decompressed in ``CHUNK`` steps of output.

    ``ZipExtFile`` hands these decompressors whole input reads without a
    ``max_length``: a few hundred bytes of bzip2 became a gigabyte in one call,
    before any budget could be checked. Read here from the local header on
    (APPNOTE 4.3.7), with the sizes and CRC of the central directory checked.
    No more than ``max_size`` bytes of output (the member's size, within the
    budget) are ever needed, which bounds the LZMA dictionary the member's
    properties may ask for (up to 4 GiB).
    """
    header = data[info.header_offset : info.header_offset + 30]
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename!r}")
    name_size, extra_size = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_size + extra_size
    packed = data[start : start + info.compress_size]
    decompressor: bz2.BZ2Decompressor | lzma.LZMADecompressor
    if info.compress_type == zipfile.ZIP_BZIP2:
        decompressor = bz2.BZ2Decompressor()
    else:  # APPNOTE 5.8.8: LZMA version (2 bytes), properties size (2), properties, raw LZMA1 data
        props_size = int.from_bytes(packed[2:4], "little")
        decompressor = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[_lzma1_filter(packed[4 : 4 + props_size], max_size)])
        packed = packed[4 + props_size :]
    crc, size = 0, 0
    chunk = decompressor.decompress(packed, CHUNK)
    while chunk:
        crc, size = zlib.crc32(chunk, crc), size + len(chunk)
        yield chunk
        if decompressor.eof or decompressor.needs_input:
            break
        chunk = decompressor.decompress(b"", CHUNK)
    if size != info.file_size or crc != info.CRC:
        raise zipfile.BadZipFile(f"bad size or CRC-32 for {info.filename!r}")


def _lzma1_filter(props: bytes, max_size: int) -> dict[str, int]:
    """The LZMA1 filter of 5 properties bytes: lc/lp/pb packed in one byte, dictionary size.

    The dictionary is allocated whole when decoding starts; it never needs to be
    larger than the output (``max_size``), nor smaller than LZMA's 4 KiB minimum.
    """
    if len(props) != 5 or props[0] >= 9 * 5 * 5:
        raise lzma.LZMAError("bad LZMA properties")
    pb, rest = divmod(props[0], 9 * 5)
    lp, lc = divmod(rest, 9)
    dict_size = max(min(int.from_bytes(props[1:5], "little"), max_size), 4096)
    return {"id": lzma.FILTER_LZMA1, "lc": lc, "lp": lp, "pb": pb, "dict_size": dict_size}


def _unreadable(name: str, problem: Exception, data: bytes) -> Member:
    """A member whose read failed: it and (through ``corrupt``) its archive are errors."""
    return Member(name, data, ERROR, f"unreadable archive member: {problem}", corrupt=str(problem))


def _zip_directory_too_big(data: bytes, limits: Limits) -> str:
    """Refuse, before zipfile reads it, a central directory that exceeds the member
    bound (zipfile would build one ZipInfo per entry, APPNOTE 4.3.16)."""
    eocd = data.rfind(b"PK\x05\x06", max(0, len(data) - 65557))
    if eocd < 0 or eocd + 22 > len(data):
        return ""
    entries, cd_size = struct.unpack("<HI", data[eocd + 10 : eocd + 16])
    if entries != 0xFFFF and entries > limits.max_members:
        return f"{entries} members exceed MaximalArchiveMembers ({limits.max_members})"
    if cd_size != 0xFFFFFFFF and cd_size > limits.max_members * 512:
        return f"central directory of {cd_size} bytes exceeds MaximalArchiveMembers"
    return ""


def _gzip_name(data: bytes) -> str:
    """The original file name stored in a gzip header (RFC 1952 §2.3.1 FNAME)."""
    if len(data) < 10:
        return ""
    flags, pos = data[3], 10
    if flags & 0x04 and len(data) >= 12:  # FEXTRA
        pos += 2 + int.from_bytes(data[10:12], "little")
    if not flags & 0x08:
        return ""
    stop = data.find(b"\0", pos, pos + 1024)
    return data[pos:stop].decode("latin-1") if stop > 0 else ""


def _gunzip_chunks(data: bytes) -> Iterator[bytes]:
    """Decompress every gzip member (RFC 1952 §2.2) in bounded output chunks.

    Input is fed ``CHUNK`` bytes at a time: zlib copies what it has not used
    (``unconsumed_tail``, ``unused_data``) on every call, so feeding the whole
    rest of the stream made many small members (or a bomb followed by a long
    tail) cost time quadratic in the stream's size.
    """
    view = memoryview(data)
    pos = 0
    while pos < len(data):
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        while not inflater.eof:
            pending: bytes | memoryview = view[pos : pos + CHUNK]
            if not pending:
                raise EOFError("truncated gzip stream")
            pos += len(pending)
            while pending and not inflater.eof:
                chunk = inflater.decompress(pending, CHUNK)
                progress = bool(chunk) or len(inflater.unconsumed_tail) < len(pending)
                pending = inflater.unconsumed_tail
                if chunk:
                    yield chunk
                if not progress:
                    raise EOFError("gzip stream makes no progress")
        pos -= len(inflater.unused_data)  # the next member starts inside the last piece fed
        if view[pos : pos + 2] != b"\x1f\x8b":
            return
