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
    slots    SLOTS × uint32, a power of two at most half full: 0 = empty, else the entry's
             offset in the entries part + 1; the slot of a token is crc32(UTF-8 token) &
             (SLOTS - 1), then the next ones (linear probing)
    entries  per token: ham and spam counts, term weight, key length, key (``Layout``: the
             narrowest integer types that hold the file's values)
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
from collections.abc import Iterator, Mapping
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
FORMAT = 1
SUFFIX = ".index"  # the index of DIR/spam.db is DIR/.spam.db.index
# magic, format, source size, source mtime_ns, source checksum, nham, nspam, tokens, weighted tokens,
# bias, entry layout (struct format), weight scale, slots, head offset, head length, slots offset,
# entries offset, entries length
HEADER = struct.Struct("<8sIQq32sIIIId8sIIQQQQQ")
WEIGHT_SCALE = 10_000  # weights are written with four decimals (database._weight_text)
# the entry layouts an index may have (struct format, weight scale)
LAYOUTS = {(f"<{c}{c}{w}{k}".encode().ljust(8, b"\0"), scale)
           for c in "HI" for w, scale in (("i", WEIGHT_SCALE), ("d", 0)) for k in "BH"}
TRAILER = 32
READ_CHUNK = 1 << 20
STALE = "is of another spam.db"

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
    source identity it was built from; DatabaseError when the database fails its checks."""
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
    entries, offsets = _entries(layout, keys, ends, counts, weights)
    weighted = sum(1 for w in weights if w)
    del keys, counts, weights
    slots = _slots(layout, entries, offsets, path)
    head_bytes = head.text.encode("utf-8")
    head_offset = HEADER.size
    slots_offset = _aligned(head_offset + len(head_bytes))
    entries_offset = slots_offset + 4 * len(slots)
    header = HEADER.pack(MAGIC, FORMAT, source[0], source[1], source[2], head.nham, head.nspam, len(offsets),
                         weighted, head.bias, layout.format.encode("ascii"), layout.scale,
                         len(slots), head_offset, len(head_bytes), slots_offset, entries_offset, len(entries))
    parts = [header, head_bytes, bytes(slots_offset - head_offset - len(head_bytes)), slots.tobytes(), bytes(entries)]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return source, parts + [digest.digest()]


class Layout:
    """An entry's fields: ham and spam counts, term weight (a float64, or an integer of 1/``scale``
    when every weight of the file is exactly one), key length; then the key. The narrowest types
    that hold the file's values are chosen when it is built (the shipped one: 9 bytes + key)."""

    def __init__(self, fmt: str, scale: int) -> None:
        self.format = fmt
        self.scale = scale
        self.struct = struct.Struct(fmt)
        self.size = self.struct.size

    def weight(self, stored: float) -> float:
        return stored / self.scale if self.scale else stored


def _layout(ends: array, counts: array, weights: array, where: str) -> Layout:
    longest = max((b - a for a, b in zip(itertools.chain((0,), ends), ends)), default=0)
    if longest > 0xFFFF:
        raise DatabaseError(f"{where}: token longer than 65535 bytes")
    count_type = "H" if max(counts, default=0) <= 0xFFFF else "I"
    fixed = all(round(w * WEIGHT_SCALE) / WEIGHT_SCALE == w for w in weights)
    weight_type, scale = ("i", WEIGHT_SCALE) if fixed else ("d", 0)
    return Layout(f"<{count_type}{count_type}{weight_type}{'B' if longest <= 0xFF else 'H'}", scale)


def _entries(layout: Layout, keys: bytearray, ends: array, counts: array, weights: array) -> tuple[bytearray, array]:
    """The packed entries and the offset of each."""
    entries = bytearray()
    offsets = array("I")
    pack, scale = layout.struct.pack, layout.scale
    start = 0
    for i, end in enumerate(ends):
        if len(entries) >= 0xFFFFFFFF:
            raise DatabaseError("spam database too large for its index")
        offsets.append(len(entries))
        weight = weights[i]
        entries += pack(counts[2 * i], counts[2 * i + 1], round(weight * scale) if scale else weight, end - start)
        entries += keys[start:end]
        start = end
    return entries, offsets


def _aligned(offset: int) -> int:
    return (offset + 7) & ~7


def _slots(layout: Layout, entries: bytearray, offsets: array, where: str) -> array:
    """The open-addressing table of the entries (at most half full); a token twice is an error."""
    size = 8
    while size < 2 * len(offsets):
        size *= 2
    mask = size - 1
    slots = array("I", bytes(4 * size))
    unpack, fixed = layout.struct.unpack_from, layout.size
    for offset in offsets:
        key = bytes(entries[offset + fixed:offset + fixed + unpack(entries, offset)[3]])
        i = zlib.crc32(key) & mask
        while slots[i]:
            other = slots[i] - 1
            if unpack(entries, other)[3] == len(key) and entries[other + fixed:other + fixed + len(key)] == key:
                raise DatabaseError(f"{where}: duplicate, empty or spaced token")
            i = (i + 1) & mask
        slots[i] = offset + 1
    return slots


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
        log.log(logging.INFO if problem == STALE else logging.WARNING, "spam database index %s %s: built again",
                where, problem)
    return None


def _check(fd: int, source: tuple[int, int, bytes]) -> str | None:
    """Why the open index ``fd`` cannot be used for ``source``, or None."""
    size = os.fstat(fd).st_size
    if size < HEADER.size + TRAILER:
        return "is truncated"
    fields = HEADER.unpack(os.pread(fd, HEADER.size, 0))
    if fields[0] != MAGIC or fields[1] != FORMAT:
        return "is not an index of this format"
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
    slots, head_offset, head_length, slots_offset, entries_offset, entries_length = fields[12:18]
    return (slots >= 8 and slots & (slots - 1) == 0 and head_offset + head_length <= slots_offset
            and slots_offset % 8 == 0 and entries_offset == slots_offset + 4 * slots
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
        head_offset, head_length, slots_offset, self.entries, _ = fields[13:18]
        self.head: Head = parse_head(bytes(image[head_offset:head_offset + head_length]).decode("utf-8"), where)
        if self.head.tokens != self.tokens:
            raise DatabaseError(f"{where}: token count differs from the database's")
        self.slots = memoryview(image)[slots_offset:self.entries].cast("I")
        self._last: tuple[frozenset[str], Found] = (frozenset(), {})

    def get(self, token: str) -> Entry | None:
        key = token.encode("utf-8", "surrogatepass")
        image, slots, mask, base = self.image, self.slots, self.mask, self.entries
        layout = self.layout
        unpack, fixed = layout.struct.unpack_from, layout.size
        i = zlib.crc32(key) & mask
        while True:
            offset = slots[i]
            if not offset:
                return None
            offset += base - 1
            ham, spam, weight, length = unpack(image, offset)
            start = offset + fixed
            if length == len(key) and image[start:start + length] == key:
                return ham, spam, layout.weight(weight)
            i = (i + 1) & mask

    def found(self, unique: set[str] | frozenset[str]) -> Found:
        """The entries of a message's tokens; the last message's are kept, so that the Bayes
        classifier and the term weights of one message look each token up once."""
        last, entries = self._last
        if len(unique) == len(last) and unique == last:
            return entries
        get = self.get
        entries = {}
        for token in unique:
            entry = get(token)
            if entry is not None:
                entries[token] = entry
        self._last = (frozenset(unique), entries)  # one assignment: a concurrent reader sees a pair
        return entries

    def items(self) -> Iterator[tuple[str, Entry]]:
        """Every entry, in the file's order."""
        image, offset, end = self.image, self.entries, len(self.image) - TRAILER
        while offset < end:
            ham, spam, weight, length = self.layout.struct.unpack_from(image, offset)
            start = offset + self.layout.size
            yield bytes(image[start:start + length]).decode("utf-8"), (ham, spam, self.layout.weight(weight))
            offset = start + length


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

    def clues_of(self, unique: set[str] | frozenset[str]) -> dict[str, float]:
        nham, nspam = self.nham, self.nspam
        clues = {}
        for token, (ham, spam, _) in self.index.found(unique).items():
            p = clue_probability(ham, spam, nham, nspam)
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
