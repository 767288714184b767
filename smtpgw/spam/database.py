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

Why text and not sqlite3 or a binary format: the file is read whole at start-up
(about 0.3 s for the shipped 2.6 MB) into a dict, which makes a lookup a hash
probe; sorted text lines give byte-identical rebuilds and readable diffs
between database versions; the checksum line makes a truncated or edited file
fail to load instead of filtering with half a database.

Must never: replace a good database with one that failed validation, leave a
half-written file under the database name, or accept a token containing a TAB,
a line break or a space.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from contextlib import contextmanager
from collections.abc import Iterator
from dataclasses import dataclass, field

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
        data = self.to_bytes()
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".spam.db.", dir=folder)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
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
        reader = _Lines(lines, where)
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
        weighted = info.format >= 2
        bias = reader.weight("terms-bias") if weighted else 0.0
        counts, weights = reader.tokens(reader.number("tokens"), weighted)
        reader.finish()
        return cls(info, Bayes(counts, nham, nspam), rules, Terms(weights, bias))


class _Lines:
    """Sequential reader of the database lines with precise error messages."""

    def __init__(self, lines: list[str], where: str) -> None:
        if lines and lines[-1] == "":
            lines.pop()
        self.lines = lines
        self.pos = 0
        self.where = where

    def next(self) -> tuple[str, int]:
        if self.pos >= len(self.lines):
            raise DatabaseError(f"{self.where}: unexpected end of file")
        self.pos += 1
        return self.lines[self.pos - 1], self.pos

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
        if not text.isdigit() or int(text) > MAX_COUNT:
            raise DatabaseError(f"{self.where}:{self.pos}: bad {key} count {text!r}")
        return int(text)

    def weight(self, key: str) -> float:
        text = self.value(key)
        try:
            return _parse_weight(text)
        except ValueError:
            raise DatabaseError(f"{self.where}:{self.pos}: bad term weight {text!r}") from None

    def tokens(self, count: int, weighted: bool) -> tuple[dict[str, tuple[int, int]], dict[str, float]]:
        """The token lines: counts and, in format 2, the term weights (zeros left out)."""
        end = self.pos + count
        if end > len(self.lines):
            raise DatabaseError(f"{self.where}: fewer token lines than announced")
        counts: dict[str, tuple[int, int]] = {}
        weights: dict[str, float] = {}
        try:
            for line in self.lines[self.pos : end]:
                if weighted:
                    token, ham, spam, weight = line.split("\t")
                    if weight != "0":
                        weights[token] = _parse_weight(weight)
                else:
                    token, ham, spam = line.split("\t")
                counts[token] = (int(ham), int(spam))
        except ValueError:
            raise DatabaseError(f"{self.where}: bad token line near line {self.pos + len(counts) + 1}") from None
        if len(counts) != count or any(" " in t or not t for t in counts):
            raise DatabaseError(f"{self.where}: duplicate, empty or spaced token")
        self.pos = end
        return counts, weights

    def finish(self) -> None:
        if self.pos != len(self.lines):
            raise DatabaseError(f"{self.where}:{self.pos + 1}: unexpected data after the tokens")


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
