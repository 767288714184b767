"""The compact, shared form of the shipped spam database: a read-only hash table mapped from disk.

Owns: the index file (``.spam.db.index`` beside ``spam.db``): its binary format, building
it from ``spam.db`` line by line with every check ``SpamDatabase.load`` makes, writing it
atomically, opening it with ``mmap`` read-only (so the main process and every scanner
worker share the same page-cache pages instead of each holding the database as Python
dicts, about 130 MiB apiece), and the lookups of the Bayes classifier and the term weights
in the mapped bytes (``MappedBayes``, ``MappedTerms``), which give exactly the scores of
the loaded database.

The index is a cache: it is trusted only when its header and SHA-256 check and it names
the ``spam.db`` in place (size, modification time and the checksum on the database's
``end`` line), so a database keepup2date installs, or any change to the file, makes the
next opening build it again. A damaged, foreign or stale index is rebuilt; a folder that
cannot be written leaves the built image in this process's memory (still compact, not
shared). A ``spam.db`` that fails its checks fails as ``SpamDatabase.load`` does.

Format (little-endian)::

    header   HEADER (below): magic, format, the source's size, mtime and checksum, counts,
             bias, and where the parts lie
    head     the database's lines before the tokens, as read (UTF-8), for info and rules
    buckets  BUCKETS + 1 × uint32 (BUCKETS a power of two, about half the tokens): where the
             entries of each bucket begin in the entries part, then where the last one ends;
             a token's bucket is crc32(UTF-8 token) & (BUCKETS - 1)
    entries  per token, bucket after bucket (``Layout``): a tag byte (bit 7: it has a term
             weight; bit 6: its counts are wide; bits 0-5: the key's length, or 63 when a
             uint16 length follows), the key, the ham and spam counts (uint8 each, uint32 when
             wide), the term weight only when it has one (int32 of 1/10,000, or float64 when
             the file has weights of more decimals): 17.6 bytes an entry in the shipped one
    trailer  SHA-256 of every byte before it

Must never: use an index whose checksum or source does not match, raise on a lookup for
any token string, map pages it does not read (checksums are read with read(), not through
the mapping), or leave a half-written index under its name.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import mmap
import os
import struct
import zlib
from abc import abstractmethod
from array import array
from collections.abc import Iterable, Iterator, Mapping
from typing import TypeVar, Union

from smtpgw.spam.bayes import Bayes, clue_probability
from smtpgw.spam.database import (
    DatabaseError,
    Head,
    SpamDatabase,
    parse_head,
    streamed,
    write_atomic,
    write_lock,
)
from smtpgw.spam.terms import Terms

log = logging.getLogger("smtpgw.spam.dbindex")

MAGIC = b"smtpgwIX"
FORMAT = 2  # 1: every entry had both counts, a weight and its key length at fixed widths (21.5 bytes)
SUFFIX = ".index"  # the index of DIR/spam.db is DIR/.spam.db.index
# magic, format, source size, source mtime_ns, source checksum, nham, nspam, tokens, weighted tokens,
# bias, entry layout (the weight's struct format), weight scale, buckets, head offset, head length,
# buckets offset, entries offset, entries length
HEADER = struct.Struct("<8sIQq32sIIIId8sIIQQQQQ")
WEIGHT_SCALE = 10_000  # weights are written with four decimals (database._weight_text)
# the weights an index may have (struct format, scale)
LAYOUTS = {(b"<i".ljust(8, b"\0"), WEIGHT_SCALE), (b"<d".ljust(8, b"\0"), 0)}
# an entry's tag byte
WEIGHTED = 0x80  # a term weight follows the counts
WIDE = 0x40  # the counts are two uint32 (else two uint8)
LONG = 0x3F  # the key's length is a uint16 after the tag (else it is the tag's low six bits)
KEY_LENGTH = struct.Struct("<H")
TRAILER = 32
READ_CHUNK = 1 << 20
STALE = "is of another spam.db"
OLDER = "is of an older format"  # after an upgrade of the gateway
MAX_KNOWN_COUNTS = 1 << 16  # (ham, spam) pairs whose clue probability a MappedBayes keeps

Entry = tuple[int, int, float]  # ham, spam, term weight
Found = dict[str, Entry]
Image = Union[mmap.mmap, bytes]
V = TypeVar("V")


def index_file(database_path: str) -> str:
    """Where the index of ``database_path`` lives: a hidden file beside it, which keepup2date's
    update sets (hidden files left out) neither ship, back up nor remove."""
    folder, name = os.path.split(os.path.abspath(database_path))
    return os.path.join(folder, f".{name}{SUFFIX}")


def open_database(path: str) -> SpamDatabase:
    """The database at ``path`` backed by its index, built first when missing, stale or damaged."""
    source = _source_of(path)
    where = index_file(path)
    image = _try_map(where, source)
    if image is None:
        image = _build_locked(path, where, source)
    return _database(image, where)


# region source identity


def _source_of(path: str) -> tuple[int, int, bytes]:
    """(size, mtime_ns, checksum of the ``end`` line) of the database file: what its index names."""
    try:
        with open(path, "rb") as src:
            st = os.fstat(src.fileno())
            src.seek(max(0, st.st_size - 80))
            tail = src.read(80)
    except OSError as exc:
        raise DatabaseError(f"{path}: {exc.strerror or exc}") from None
    line = tail[tail.rfind(b"\n", 0, len(tail) - 1) + 1:]
    try:
        checksum = bytes.fromhex(line[4:-1].decode("ascii")) if line.startswith(b"end\t") else b""
    except (UnicodeDecodeError, ValueError):
        checksum = b""
    if len(checksum) != 32 or not line.endswith(b"\n"):
        raise DatabaseError(f"{path}: truncated (no end line)")
    return st.st_size, st.st_mtime_ns, checksum


# endregion
# region building


def build(path: str) -> tuple[tuple[int, int, bytes], list[bytes]]:
    """The index image of the database at ``path`` in parts (header first, trailer last) and the
    source identity it was built from; DatabaseError when the database fails its checks.

    Its values live in arrays, not in Python objects per token, so that building it (in the
    main process, at start) leaves no heap behind."""
    with streamed(path) as (head, rows, st):
        keys = bytearray()
        ends = array("Q")
        counts = array("Q")
        weights = array("d")
        for token, ham, spam, weight in rows:
            keys += token.encode("utf-8")
            ends.append(len(keys))
            counts.extend((ham, spam))
            weights.append(weight)
        source = _source_of(path)
    if source[:2] != (st.st_size, st.st_mtime_ns):
        raise DatabaseError(f"{path}: replaced while its index was built")
    layout = _layout(ends, counts, weights, path)
    buckets, entries = _entries(layout, keys, ends, counts, weights, path)
    head_bytes = head.text.encode("utf-8")
    head_offset = HEADER.size
    buckets_offset = _aligned(head_offset + len(head_bytes))
    entries_offset = buckets_offset + 4 * len(buckets)
    header = HEADER.pack(MAGIC, FORMAT, source[0], source[1], source[2], head.nham, head.nspam, len(ends),
                         sum(1 for w in weights if w), head.bias, layout.format.encode("ascii"), layout.scale,
                         len(buckets) - 1, head_offset, len(head_bytes), buckets_offset, entries_offset, len(entries))
    parts = [header, head_bytes, bytes(buckets_offset - head_offset - len(head_bytes)), buckets.tobytes(), bytes(entries)]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return source, parts + [digest.digest()]


class Layout:
    """An entry: its tag, the key, its counts, and its term weight when it has one (a float64, or
    an integer of 1/``scale`` when every weight of the file is exactly one): about 5 bytes + key
    in the shipped database (counts under 256, half of the tokens weighted, keys under 63 bytes).
    ``steps[tag]`` is the whole size of an entry with that tag when the tag holds its key length
    (0 for a LONG one), so that an entry whose key does not match is skipped with one lookup."""

    def __init__(self, fmt: str, scale: int) -> None:
        self.format = fmt
        self.scale = scale
        self.divisor = scale or 1  # a stored weight / divisor: the weight (exact for a float64)
        # per tag: the struct of its counts and weight, their size, the entry's whole size
        self.formats = tuple("<" + ("II" if tag & WIDE else "BB") + (fmt[1:] if tag & WEIGHTED else "")
                             for tag in range(256))
        values = [struct.Struct(f) for f in self.formats]
        self.unpack = tuple(v.unpack_from for v in values)
        self.values = tuple(v.size for v in values)
        self.steps = tuple(0 if tag & LONG == LONG else 1 + (tag & LONG) + self.values[tag] for tag in range(256))

    @staticmethod
    def tag(ham: int, spam: int, stored: float, length: int) -> int:
        """The tag of an entry with those counts, stored weight (0: none) and key length."""
        return (WEIGHTED if stored else 0) | (WIDE if ham > 0xFF or spam > 0xFF else 0) | min(length, LONG)

    def packed_size(self, tag: int, length: int) -> int:
        """The whole size of an entry with ``tag`` and a key of ``length`` bytes."""
        return self.steps[tag] or 1 + KEY_LENGTH.size + length + self.values[tag]

    def pack(self, ham: int, spam: int, stored: float, key: bytes) -> bytes:
        """The entry of ``key``; ``stored`` is its weight as the layout stores it (0: none)."""
        tag = self.tag(ham, spam, stored, len(key))
        values = (ham, spam, stored) if stored else (ham, spam)
        long_length = KEY_LENGTH.pack(len(key)) if len(key) >= LONG else b""
        return b"".join((bytes((tag,)), long_length, key, struct.pack(self.formats[tag], *values)))

    def key_at(self, image: Image | bytearray, offset: int) -> tuple[int, int, int]:
        """(where the key of the entry at ``offset`` begins, its length, where the next entry begins)."""
        tag = image[offset]
        length = tag & LONG
        start = offset + 1
        if length == LONG:
            length = KEY_LENGTH.unpack_from(image, start)[0]
            start += KEY_LENGTH.size
        return start, length, start + length + self.values[tag]

    def size_at(self, image: Image | bytearray, offset: int) -> int:
        """The whole size of the entry at ``offset`` (``steps`` says it for all but LONG ones)."""
        return self.key_at(image, offset)[2] - offset

    def entry(self, image: Image | bytearray, tag: int, at: int) -> Entry:
        """The counts and weight of an entry with ``tag`` whose values begin at ``at``."""
        values = self.unpack[tag](image, at)
        return (values[0], values[1], values[2] / self.divisor) if tag & WEIGHTED else (values[0], values[1], 0.0)


def _layout(ends: array, counts: array, weights: array, where: str) -> Layout:
    longest = max((b - a for a, b in zip(itertools.chain((0,), ends), ends)), default=0)
    if longest > 0xFFFF:
        raise DatabaseError(f"{where}: token longer than 65535 bytes")
    fixed = all(round(w * WEIGHT_SCALE) / WEIGHT_SCALE == w for w in weights)
    return Layout("<i", WEIGHT_SCALE) if fixed else Layout("<d", 0)


def bucket_count(tokens: int) -> int:
    """Buckets for ``tokens`` entries: a power of two, about two entries a bucket."""
    count = 8
    while 2 * count < tokens:
        count *= 2
    return count


def _entries(layout: Layout, keys: bytearray, ends: array, counts: array, weights: array,
             where: str) -> tuple[array, bytearray]:
    """The bucket offsets (one more than buckets: where each bucket's entries begin, then the end)
    and the entries, placed bucket by bucket (a counting sort, in the file's order within one)."""
    mask = bucket_count(len(ends)) - 1
    starts = array("Q", [0]) + ends[:-1]
    bucket = array("I", (zlib.crc32(keys[a:b]) & mask for a, b in zip(starts, ends)))
    scale = layout.scale
    stored = [round(w * scale) if scale else w for w in weights]
    sizes = array("Q", bytes(8 * (mask + 2)))
    for i, b in enumerate(bucket):
        length = ends[i] - starts[i]
        sizes[b + 1] += layout.packed_size(layout.tag(counts[2 * i], counts[2 * i + 1], stored[i], length), length)
    for b in range(1, mask + 2):
        sizes[b] += sizes[b - 1]
    if sizes[-1] > 0xFFFFFFFF:
        raise DatabaseError(f"{where}: too large for its index")
    buckets = array("I", sizes)
    entries = bytearray(sizes[-1])
    for i, b in enumerate(bucket):
        entry = layout.pack(counts[2 * i], counts[2 * i + 1], stored[i], keys[starts[i]:ends[i]])
        entries[sizes[b]:sizes[b] + len(entry)] = entry
        sizes[b] += len(entry)
    _no_duplicates(layout, buckets, entries, where)
    return buckets, entries


def _no_duplicates(layout: Layout, buckets: array, entries: bytearray, where: str) -> None:
    """A token twice is an error, as for ``SpamDatabase.load``; equal tokens share a bucket."""
    for b in range(len(buckets) - 1):
        at, end = buckets[b], buckets[b + 1]
        keys = set()
        while at < end:
            start, length, at = layout.key_at(entries, at)
            key = bytes(entries[start:start + length])
            if key in keys:
                raise DatabaseError(f"{where}: duplicate, empty or spaced token")
            keys.add(key)


def _aligned(offset: int) -> int:
    return (offset + 7) & ~7


def _build_locked(path: str, where: str, source: tuple[int, int, bytes]) -> Image:
    """Build the index under the database's writer lock (another process may have just built it);
    when it cannot be written or read back, the image stays in this process's memory alone."""
    parts: list[bytes] | None = None
    try:
        with write_lock(path):
            image = _try_map(where, source, quiet=True)
            if image is not None:
                return image
            built, parts = build(path)
            write_atomic(where, parts)
            image = _try_map(where, built)
            if image is not None:
                log.info("spam database index %s built", where)
                return image
    except OSError as exc:
        log.warning("spam database index %s not written (%s): this process keeps its own copy",
                    where, exc.strerror or exc)
    return b"".join(parts if parts is not None else build(path)[1])


# endregion
# region opening


def _try_map(where: str, source: tuple[int, int, bytes], quiet: bool = False) -> mmap.mmap | None:
    """The index at ``where`` mapped read-only when it checks and names ``source``, else None
    (and a warning unless ``quiet``: a missing index is no news)."""
    try:
        fd = os.open(where, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if not quiet:
            log.warning("spam database index %s unreadable (%s): built again", where, exc.strerror or exc)
        return None
    try:
        problem = _check(fd, source)
        if problem is None:
            return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except OSError as exc:  # not a regular file, an I/O error, mmap refused
        problem = f"unusable ({exc.strerror or exc})"
    finally:
        os.close(fd)
    if not quiet:  # an index of the previous spam.db is expected after an update
        log.log(logging.INFO if problem in (STALE, OLDER) else logging.WARNING, "spam database index %s %s: built again",
                where, problem)
    return None


def _check(fd: int, source: tuple[int, int, bytes]) -> str | None:
    """Why the open index ``fd`` cannot be used for ``source``, or None."""
    size = os.fstat(fd).st_size
    if size < HEADER.size + TRAILER:
        return "is truncated"
    fields = HEADER.unpack(os.pread(fd, HEADER.size, 0))
    if fields[0] != MAGIC or fields[1] > FORMAT:
        return "is not an index of this format"
    if fields[1] != FORMAT:
        return OLDER
    if fields[2:5] != source:
        return STALE
    if not _bounds_ok(fields, size):
        return "is damaged (bad offsets)"
    digest = hashlib.sha256()
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    offset = 0
    while offset < size - TRAILER:
        got = os.preadv(fd, [view[:min(READ_CHUNK, size - TRAILER - offset)]], offset)
        if got <= 0:
            return "is truncated"
        digest.update(view[:got])
        offset += got
    if os.pread(fd, TRAILER, size - TRAILER) != digest.digest():
        return "is damaged (checksum mismatch)"
    return None


def _bounds_ok(fields: tuple, size: int) -> bool:
    if (fields[10], fields[11]) not in LAYOUTS:
        return False
    buckets, head_offset, head_length, buckets_offset, entries_offset, entries_length = fields[12:18]
    return (buckets >= 8 and buckets & (buckets - 1) == 0 and head_offset + head_length <= buckets_offset
            and buckets_offset % 8 == 0 and entries_offset == buckets_offset + 4 * (buckets + 1)
            and entries_offset + entries_length == size - TRAILER)


def _database(image: Image, where: str) -> SpamDatabase:
    index = MappedIndex(image, where)
    head = index.head
    return SpamDatabase(head.info, MappedBayes(index, head.nham, head.nspam), head.rules, MappedTerms(index, head.bias))


# endregion
# region lookups


class MappedIndex:
    """Lookups in an index image (mapped or in memory): token -> (ham, spam, weight)."""

    def __init__(self, image: Image, where: str) -> None:
        fields = HEADER.unpack_from(image, 0)
        self.image = image
        self.tokens, self.weighted = fields[7], fields[8]
        self.layout = Layout(fields[10].rstrip(b"\0").decode("ascii"), fields[11])
        self.mask = fields[12] - 1
        head_offset, head_length, buckets_offset, self.entries, _ = fields[13:18]
        self.head: Head = parse_head(bytes(image[head_offset:head_offset + head_length]).decode("utf-8"), where)
        if self.head.tokens != self.tokens:
            raise DatabaseError(f"{where}: token count differs from the database's")
        self.buckets = memoryview(image)[buckets_offset:self.entries].cast("I")
        self._last: tuple[frozenset[str], Found] = (frozenset(), {})

    def get(self, token: str) -> Entry | None:
        return self._find((token,)).get(token)

    def found(self, unique: set[str] | frozenset[str]) -> Found:
        """The entries of a message's tokens; the last message's are kept, so that the Bayes
        classifier and the term weights of one message look each token up once."""
        last, entries = self._last
        if len(unique) == len(last) and unique == last:
            return entries
        entries = self._find(unique)
        self._last = (frozenset(unique), entries)  # one assignment: a concurrent reader sees a pair
        return entries

    def _find(self, tokens: Iterable[str]) -> Found:
        """The entries of those ``tokens`` the database has (the hot path: one loop, no calls per
        entry passed over: its tag gives its key length and its size)."""
        image, buckets, base, mask, layout = self.image, self.buckets, self.entries, self.mask, self.layout
        steps, unpack, divisor = layout.steps, layout.unpack, layout.divisor
        crc32 = zlib.crc32
        found: Found = {}
        for token in tokens:
            key = token.encode("utf-8", "surrogatepass")
            length = len(key)
            b = crc32(key) & mask
            offset, end = base + buckets[b], base + buckets[b + 1]
            if length >= LONG:  # a key of 63 bytes or more: its length is not in the tag
                self._find_long(token, key, offset, end, found)
                continue
            while offset < end:  # about two entries; only the one whose key matches is read
                tag = image[offset]
                if (tag & LONG) == length and image[offset + 1:offset + 1 + length] == key:
                    values = unpack[tag](image, offset + 1 + length)  # (layout.entry, inline)
                    found[token] = (values[0], values[1], values[2] / divisor if tag & WEIGHTED else 0.0)
                    break
                offset += steps[tag] or layout.size_at(image, offset)
        return found

    def _find_long(self, token: str, key: bytes, offset: int, end: int, found: Found) -> None:
        """``_find`` for a key of LONG bytes or more, entry by entry."""
        image, layout = self.image, self.layout
        while offset < end:
            start, length, following = layout.key_at(image, offset)
            if length == len(key) and image[start:start + length] == key:
                found[token] = layout.entry(image, image[offset], start + length)
                return
            offset = following

    def items(self) -> Iterator[tuple[str, Entry]]:
        """Every entry, in the file's order."""
        image, offset, end, layout = self.image, self.entries, len(self.image) - TRAILER, self.layout
        while offset < end:
            start, length, following = layout.key_at(image, offset)
            yield bytes(image[start:start + length]).decode("utf-8"), layout.entry(image, image[offset], start + length)
            offset = following


class _MappedView(Mapping[str, V]):
    """A read-only mapping over the index; ``get`` says what a token maps to (None: not in it)."""

    def __init__(self, index: MappedIndex) -> None:
        self.index = index

    @abstractmethod
    def get(self, token: str, default: V | None = None) -> V | None:  # type: ignore[override]
        """What ``token`` maps to, else ``default``."""

    def __getitem__(self, token: str) -> V:
        value = self.get(token)
        if value is None:
            raise KeyError(token)
        return value


class MappedCounts(_MappedView[tuple[int, int]]):
    """``Bayes.counts`` of a mapped database."""

    def get(self, token: str, default: tuple[int, int] | None = None) -> tuple[int, int] | None:  # type: ignore[override]
        entry = self.index.get(token)
        return default if entry is None else (entry[0], entry[1])

    def __len__(self) -> int:
        return self.index.tokens

    def __iter__(self) -> Iterator[str]:
        return (token for token, _ in self.index.items())


class MappedWeights(_MappedView[float]):
    """``Terms.weights`` of a mapped database (a token weighing 0 is not in it)."""

    def get(self, token: str, default: float | None = None) -> float | None:  # type: ignore[override]
        entry = self.index.get(token)
        return entry[2] if entry is not None and entry[2] != 0.0 else default

    def __len__(self) -> int:
        return self.index.weighted

    def __iter__(self) -> Iterator[str]:
        return (token for token, entry in self.index.items() if entry[2] != 0.0)


class MappedBayes(Bayes):
    """The Bayes classifier over a mapped database: a clue's probability is computed from its
    counts at lookup time, by the function ``clue_table`` uses."""

    def __init__(self, index: MappedIndex, nham: int, nspam: int) -> None:
        super().__init__(MappedCounts(index), nham, nspam)  # type: ignore[arg-type]
        self.index = index
        # clue_probability of each (ham, spam) pair met: the counts never change (the database is
        # read-only), and the shipped one has a few thousand distinct pairs for 445,000 tokens
        self._known: dict[tuple[int, int], float] = {}

    def clues_of(self, unique: set[str] | frozenset[str]) -> dict[str, float]:
        nham, nspam, known = self.nham, self.nspam, self._known
        clues = {}
        for token, (ham, spam, _) in self.index.found(unique).items():
            p = known.get((ham, spam))
            if p is None:
                p = clue_probability(ham, spam, nham, nspam)
                if len(known) < MAX_KNOWN_COUNTS:
                    known[(ham, spam)] = p
            if p:
                clues[token] = p
        return clues

    def learn(self, tokens: object, is_spam: bool, count: int = 1) -> None:
        raise TypeError("a mapped spam database is read-only; learn into the site layer")


class MappedTerms(Terms):
    """The term weights of a mapped database."""

    def __init__(self, index: MappedIndex, bias: float) -> None:
        super().__init__(MappedWeights(index), bias)  # type: ignore[arg-type]
        self.index = index

    def weight_sum(self, unique: set[str] | frozenset[str]) -> float:
        return math.fsum(entry[2] for entry in self.index.found(unique).values() if entry[2])

    def learn(self, tokens: object, is_spam: bool, offset: float = 0.0, learn_bias: bool = True) -> int:
        raise TypeError("a mapped spam database is read-only; learn into the site layer")


# endregion
