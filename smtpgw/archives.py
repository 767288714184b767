"""Reading the members of zip, tar and gzip archives inside a message, within bounds.

Owns: recognising an archive by its magic bytes; the ``[smtpgw.ave]`` archive
bounds (``Limits``) and the per-message budgets they set; bounded
decompression of each member (zip, tar, gzip with every gzip member of the
stream, RFC 1952 §2.2), stopping as soon as ``MaximalArchiveMembers``,
``MaximalExpandedSize`` or ``MaximalCompressionRatio`` is crossed; refusing an
oversized zip central directory before it is read; and marking encrypted zip
members ``protected`` and unreadable ones ``error``.

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
* A member that cannot be read keeps what could be read of it (still
  scanned) and makes its archive an error too, so that the archive as a whole
  still goes to the scanner (which may read more of it than we did).
"""

from __future__ import annotations

import bz2
import io
import lzma
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import IO, Any

from smtpgw.policy import ERROR, PROTECTED

__all__ = [
    "ARCHIVE_ERRORS",
    "Budget",
    "LimitExceeded",
    "Limits",
    "Member",
    "archive_format",
]

CHUNK = 64 * 1024  # decompression step: bounded memory per read
RATIO_FLOOR = 1 << 20  # a member must expand past 1 MiB before its ratio counts

# The stdlib archive readers report malformed input through this family.
ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
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
    """Decomposition bounds, from ``[smtpgw.ave]`` (KB values converted to bytes)."""

    max_depth: int = 8
    max_members: int = 1000
    max_expanded: int = 102400 * 1024
    max_ratio: int = 100
    scan_archives: bool = True

    @classmethod
    def from_ave(cls, ave: Any) -> Limits:
        return cls(
            max_depth=int(getattr(ave, "MaximalArchiveDepth", cls.max_depth)),
            max_members=int(getattr(ave, "MaximalArchiveMembers", cls.max_members)),
            max_expanded=int(getattr(ave, "MaximalExpandedSize", 102400)) * 1024,
            max_ratio=int(getattr(ave, "MaximalCompressionRatio", cls.max_ratio)),
            scan_archives=bool(getattr(ave, "ScanArchives", True)),
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
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            for _ in range(self.limits.max_members + 1):  # directories and links count too
                info = archive.next()
                if info is None:
                    return
                if not info.isfile():
                    continue
                self._count()
                stream = archive.extractfile(info)
                if stream is None:
                    yield Member(info.name, None)  # nothing to read: not a regular file
                    continue
                yield from self._fill(info.name, _chunks(stream), info.size)
            raise LimitExceeded(
                f"more than MaximalArchiveMembers ({self.limits.max_members}) archive entries"
            )

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
