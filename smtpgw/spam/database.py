"""The on-disk spam database: token counts, term rules and metadata in one file.

Owns: the file format (``spam.db``), loading it with full validation, writing
it deterministically and atomically (temp file, fsync, rename, fsync of the
directory), and the lock that serialises writers (``spam learn``).

The site layer (``site_file``: ``site-spam.db`` beside the BasesPath folder)
has the same format: the counts of the messages the site learned and the term
weight changes they made, added to the shipped database's at lookup time.

Format (UTF-8 text, LF line ends, fields separated by one TAB)::

    smtpgw-spam-db<TAB>2                      magic and format version
    version<TAB>2005.03.11-1                  database version (free text)
    date<TAB>2005-03-11                       date of the training data
    ham<TAB>2868                              messages trained as ham
    spam<TAB>1328                             messages trained as spam
    source<TAB>...                            where the training mail came from
    rules<TAB>N                               then N rule lines (see ``rules``)
    terms-bias<TAB>-0.25                      bias of the learned term weights (see ``terms``)
    tokens<TAB>M                              then M lines TOKEN<TAB>HAM<TAB>SPAM<TAB>WEIGHT, sorted
    end<TAB>SHA-256 of every byte before this line

Format 1 (no ``terms-bias`` line, no WEIGHT column) still loads, with no
term weights: the score is then the Bayes classifier's and the rules' alone.

Why text and not sqlite3 or a binary format: sorted text lines give
byte-identical rebuilds and readable diffs between database versions; the
checksum line makes a truncated or edited file fail to load instead of
filtering with half a database. The gateway does not filter with this form:
``dbindex`` builds a binary hash table from it (``streamed`` reads it line by
line with the same checks as ``load``), which every process maps and shares.
``load`` (the whole file into dicts) serves learning, the command line and
the update checks.

Must never: replace a good database with one that failed validation, leave a
half-written file under the database name, or accept a token containing a TAB,
a line break or a space.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO

from smtpgw.spam.bayes import Bayes
from smtpgw.spam.rules import Rule, RuleError, parse_rule
from smtpgw.spam.terms import MAX_WEIGHT, Terms

MAGIC = "smtpgw-spam-db"
FORMAT_VERSION = 2
READABLE_FORMATS = ("1", "2")
FILE_NAME = "spam.db"
SITE_FILE_NAME = "site-spam.db"  # the site layer, beside the BasesPath folder (never inside it)
MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_COUNT = 2**31 - 1


class DatabaseError(Exception):
    """The database file is missing, damaged or of an unknown format."""


@dataclass
class DatabaseInfo:
    version: str = "0"
    date: str = "1970-01-01"
    source: str = ""
    format: int = FORMAT_VERSION


@dataclass
class SpamDatabase:
    info: DatabaseInfo
    bayes: Bayes
    rules: list[Rule] = field(default_factory=list)
    terms: Terms = field(default_factory=Terms)

    @classmethod
    def empty(cls, rules: list[Rule] | None = None, info: DatabaseInfo | None = None) -> SpamDatabase:
        return cls(info or DatabaseInfo(), Bayes({}, 0, 0), list(rules or []), Terms())

    # -- writing -------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The file image; equal databases give equal bytes (sorted tokens, fixed fields).

        A term weight is kept only for a token that has counts: a token the
        Bayes classifier forgot (``learn`` with count -1) loses its weight too.
        """
        info = self.info
        terms = self.terms.rounded()
        weights = terms.weights
        lines = [
            f"{MAGIC}\t{FORMAT_VERSION}",
            f"version\t{_one_line(info.version)}",
            f"date\t{_one_line(info.date)}",
            f"ham\t{self.bayes.nham}",
            f"spam\t{self.bayes.nspam}",
            f"source\t{_one_line(info.source)}",
            f"rules\t{len(self.rules)}",
        ]
        lines.extend(rule.line() for rule in self.rules)
        lines.append(f"terms-bias\t{_weight_text(terms.bias)}")
        counts = self.bayes.counts
        lines.append(f"tokens\t{len(counts)}")
        lines.extend(f"{token}\t{ham}\t{spam}\t{_weight_text(weights.get(token, 0.0))}"
                     for token, (ham, spam) in sorted(counts.items()))
        body = ("\n".join(lines) + "\n").encode("utf-8")
        return body + f"end\t{hashlib.sha256(body).hexdigest()}\n".encode("ascii")

    def save(self, path: str) -> None:
        """Write atomically: a reader sees the old file or the new one, never a mix."""
        write_atomic(path, [self.to_bytes()])

    # -- reading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str) -> SpamDatabase:
        try:
            with open(path, "rb") as src:
                data = src.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise DatabaseError(f"{path}: {exc.strerror or exc}") from None
        if len(data) > MAX_FILE_BYTES:
            raise DatabaseError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
        return cls.from_bytes(data, path)

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "spam.db") -> SpamDatabase:
        body, checksum = _split_trailer(data, where)
        if hashlib.sha256(body).hexdigest() != checksum:
            raise DatabaseError(f"{where}: checksum mismatch (damaged or edited file)")
        try:
            lines = body.decode("utf-8").split("\n")
        except UnicodeDecodeError:
            raise DatabaseError(f"{where}: not UTF-8") from None
        if lines and lines[-1] == "":
            lines.pop()
        reader = _Lines(iter(lines), where)
        head = read_head(reader)
        counts: dict[str, tuple[int, int]] = {}
        weights: dict[str, float] = {}
        for token, ham, spam, weight in reader.rows(head.tokens, head.weighted):
            counts[token] = (ham, spam)
            if weight:
                weights[token] = weight
        if len(counts) != head.tokens:
            raise DatabaseError(f"{where}: duplicate, empty or spaced token")
        return cls(head.info, Bayes(counts, head.nham, head.nspam), head.rules, Terms(weights, head.bias))


@dataclass
class Head:
    """What precedes the token lines: metadata, message counts, rules, terms bias, token count,
    and those lines as read (``text``), which ``parse_head`` reads again."""

    info: DatabaseInfo
    nham: int
    nspam: int
    rules: list[Rule]
    bias: float
    tokens: int
    text: str

    @property
    def weighted(self) -> bool:
        return self.info.format >= 2


def read_head(reader: _Lines) -> Head:
    """The lines before the tokens, checked as ``SpamDatabase.load`` checks them."""
    where = reader.where
    magic, version = reader.pair()
    if magic != MAGIC:
        raise DatabaseError(f"{where}: not a spam database")
    if version not in READABLE_FORMATS:
        raise DatabaseError(f"{where}: unsupported format version {version}")
    info = DatabaseInfo(version=reader.value("version"), date=reader.value("date"), format=int(version))
    nham = reader.number("ham")
    nspam = reader.number("spam")
    info.source = reader.value("source")
    rules = []
    for _ in range(reader.number("rules")):
        line, number = reader.next()
        try:
            rules.append(parse_rule(line.replace("\t", " "), f"{where}:{number}"))
        except RuleError as exc:
            raise DatabaseError(str(exc)) from None
    bias = reader.weight("terms-bias") if info.format >= 2 else 0.0
    tokens = reader.number("tokens")
    return Head(info, nham, nspam, rules, bias, tokens, "".join(line + "\n" for line in reader.taken))


def parse_head(text: str, where: str) -> Head:
    """A ``Head`` from its ``text`` alone (nothing may follow it)."""
    reader = _Lines(iter(text.split("\n")[:-1]), where)
    head = read_head(reader)
    reader.finish()
    return head


class _Lines:
    """Sequential reader of the database lines (an iterator: the file need not be in memory)
    with precise error messages; the lines before the tokens are kept in ``taken``."""

    def __init__(self, lines: Iterator[str], where: str) -> None:
        self.lines = lines
        self.pos = 0
        self.where = where
        self.taken: list[str] = []

    def next(self) -> tuple[str, int]:
        line = next(self.lines, None)
        if line is None:
            raise DatabaseError(f"{self.where}: unexpected end of file")
        self.pos += 1
        self.taken.append(line)
        return line, self.pos

    def pair(self) -> tuple[str, str]:
        line, number = self.next()
        key, sep, value = line.partition("\t")
        if not sep:
            raise DatabaseError(f"{self.where}:{number}: expected KEY<TAB>VALUE")
        return key, value

    def value(self, key: str) -> str:
        found, value = self.pair()
        if found != key:
            raise DatabaseError(f"{self.where}:{self.pos}: expected {key!r}, found {found!r}")
        return value

    def number(self, key: str) -> int:
        text = self.value(key)
        if not _is_count(text):
            raise DatabaseError(f"{self.where}:{self.pos}: bad {key} count {text!r}")
        return int(text)

    def weight(self, key: str) -> float:
        text = self.value(key)
        try:
            return _parse_weight(text)
        except ValueError:
            raise DatabaseError(f"{self.where}:{self.pos}: bad term weight {text!r}") from None

    def rows(self, count: int, weighted: bool) -> Iterator[tuple[str, int, int, float]]:
        """The ``count`` token lines as (token, ham, spam, weight), each checked (a weight of 0 in
        format 1); then nothing may follow. Duplicates are the caller's to find."""
        where = self.where
        for _ in range(count):
            line = next(self.lines, None)
            if line is None:
                raise DatabaseError(f"{where}: fewer token lines than announced")
            self.pos += 1
            fields = line.split("\t")
            if len(fields) != (4 if weighted else 3) or not (_is_count(fields[1]) and _is_count(fields[2])):
                raise DatabaseError(f"{where}: bad token line near line {self.pos}")
            try:
                weight = _parse_weight(fields[3]) if weighted and fields[3] != "0" else 0.0
            except ValueError:
                raise DatabaseError(f"{where}: bad token line near line {self.pos}") from None
            token = fields[0]
            if not token or " " in token:
                raise DatabaseError(f"{where}: duplicate, empty or spaced token")
            yield token, int(fields[1]), int(fields[2]), weight
        self.finish()

    def finish(self) -> None:
        if next(self.lines, None) is not None:
            raise DatabaseError(f"{self.where}:{self.pos + 1}: unexpected data after the tokens")


def _is_count(text: str) -> bool:
    return text.isascii() and text.isdigit() and int(text) <= MAX_COUNT


@contextmanager
def streamed(path: str) -> Iterator[tuple[Head, Iterator[tuple[str, int, int, float]], os.stat_result]]:
    """The database at ``path`` read line by line, with the checks of ``SpamDatabase.load``: its
    head, the token rows (read them all: the last step checks the end), and the file's stat.

    A first pass checks the size and the checksum, a second one parses: memory stays a few
    lines whatever the size of the file."""
    try:
        src = open(path, "rb")
    except OSError as exc:
        raise DatabaseError(f"{path}: {exc.strerror or exc}") from None
    with src:
        st = os.fstat(src.fileno())
        if st.st_size > MAX_FILE_BYTES:
            raise DatabaseError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
        body_lines = _checked_lines(src, path)
        src.seek(0)
        reader = _Lines(_decoded(src, body_lines, path), path)
        head = read_head(reader)
        yield head, reader.rows(head.tokens, head.weighted), st


def _checked_lines(src: BinaryIO, where: str) -> int:
    """The number of lines before the ``end`` line, once their SHA-256 matches it."""
    digest = hashlib.sha256()
    count = 0
    last = b""
    for raw in src:
        if last:
            digest.update(last)
            count += 1
        last = raw
    if not last.endswith(b"\n") or not last.startswith(b"end\t"):
        raise DatabaseError(f"{where}: truncated (no end line)")
    if last[4:-1].decode("ascii", "replace") != digest.hexdigest():
        raise DatabaseError(f"{where}: checksum mismatch (damaged or edited file)")
    return count


def _decoded(src: BinaryIO, count: int, where: str) -> Iterator[str]:
    """The first ``count`` lines of ``src``, without their LF, decoded as UTF-8."""
    for _, raw in zip(range(count), src):
        try:
            yield raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise DatabaseError(f"{where}: not UTF-8") from None


def write_atomic(path: str, chunks: Iterable[bytes]) -> None:
    """``path`` made of ``chunks``: temp file, fsync, rename, fsync of the folder; a reader sees
    the old file or the new one, never a mix."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _split_trailer(data: bytes, where: str) -> tuple[bytes, str]:
    if not data.endswith(b"\n"):
        raise DatabaseError(f"{where}: truncated (no end line)")
    cut = data.rfind(b"\n", 0, len(data) - 1) + 1
    trailer = data[cut:-1]
    if not trailer.startswith(b"end\t"):
        raise DatabaseError(f"{where}: truncated (no end line)")
    return data[:cut], trailer[4:].decode("ascii", "replace")


def _weight_text(weight: float) -> str:
    """A stored weight: "0", or its four decimals without trailing zeros ("-0.0125")."""
    text = f"{weight:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _parse_weight(text: str) -> float:
    """A weight from the file; ValueError unless it is a number within ``MAX_WEIGHT``."""
    weight = float(text)
    if not abs(weight) <= MAX_WEIGHT:  # also false for NaN
        raise ValueError(f"weight {text!r} out of range")
    return weight


def _one_line(text: str) -> str:
    return " ".join(text.split())


def database_file(path: str) -> str:
    """The database file for a --db/BasesPath argument: a file, DIR/spam.db or DIR/spam/spam.db."""
    if os.path.isdir(path):
        direct = os.path.join(path, FILE_NAME)
        nested = os.path.join(path, "spam", FILE_NAME)
        if os.path.exists(direct) or not os.path.exists(nested):
            return direct
        return nested
    return path


def site_file(path: str) -> str:
    """The site layer for a --db/BasesPath argument: ``site-spam.db`` in the folder that holds
    the bases folder (or the database file), so that keepup2date, which owns everything under
    BasesPath, never replaces, backs up or rolls back what the site learned."""
    path = os.path.abspath(path).rstrip(os.sep) or os.sep
    return os.path.join(os.path.dirname(path), SITE_FILE_NAME)


def term_weights(path: str, wanted: set[str]) -> tuple[float, dict[str, float]]:
    """The terms bias and the weights of the ``wanted`` tokens of the database at ``path``, read
    line by line: a learner needs a few hundred weights, not the whole database in memory."""
    digest = hashlib.sha256()
    bias = 0.0
    weights: dict[str, float] = {}
    in_tokens = False
    last = b""  # the line read last: the "end" trailer once the file is read (a token may be "end")
    try:
        with open(path, "rb") as src:
            for raw in src:
                if last:
                    digest.update(last)
                    line = last.decode("utf-8", "replace").rstrip("\n")
                    if in_tokens:
                        token, _, rest = line.partition("\t")
                        if token in wanted:
                            weights[token] = _parse_weight(rest.rsplit("\t", 1)[-1])
                    elif line.startswith("terms-bias\t"):
                        bias = _parse_weight(line[11:])
                    elif line.startswith("tokens\t"):
                        in_tokens = True
                last = raw
    except OSError as exc:
        raise DatabaseError(f"{path}: {exc.strerror or exc}") from None
    except ValueError:
        raise DatabaseError(f"{path}: bad term weight") from None
    checksum = last[4:].strip().decode("ascii", "replace") if last.startswith(b"end\t") else ""
    if checksum != digest.hexdigest():
        raise DatabaseError(f"{path}: checksum mismatch (damaged or edited file)")
    return bias, weights


@contextmanager
def write_lock(path: str) -> Iterator[None]:
    """Serialise writers of one database file (readers never wait: they see whole files).

    The lock is ``.NAME.lock`` beside the file (``.spam.db.lock``, ``.site-spam.db.lock``),
    an fcntl.flock held until the new file has been renamed into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, f".{os.path.basename(path)}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
