"""The update-set format: what keepup2date reads from UpdateServerUrl, and how a set is made.

An update set is a folder, served over http(s) or read locally::

    index.json          {"format": "smtpgw-update-set", "format_version": 1,
                         "version": "2005.03.11-1", "date": "2005-03-11",
                         "files": [{"name": "bases/spam/spam.db", "size": N, "sha256": "..."}]}
    index.json.sig      Ed25519 signatures of index.json's exact bytes (smtpgw.signing)
    bases/...           files installed under BasesPath (the same relative paths)
    clamd/NAME.ndb      clamd signature files, installed under ClamdDatabasePath

Versions are numbers separated by dots or dashes, compared part by part
(``2005.03.11-1`` is 2005, 3, 11, 1). The installed set's index is kept as
``BasesPath/index.json``; it also lists the versions undone by ``--rollback``
(``rejected``), which are not installed again.

Owns: parsing and checking ``index.json`` (``Index``, ``Entry``, ``version_key``, the
rules for file names), where a set's files lie (``Layout``), checking files against
their entries (size, SHA-256) and their contents (the spam database loads, clamd
signatures load in ``clamscan``), making a set from a bases folder
(``build_update_set``; signed: ``build_signed_set``), and the atomic file writing it
shares with the installer.

Must never: accept an index field it has not checked (a name outside bases/ or
clamd/, a hidden name, "..", counts and sizes past their bounds), read more than
``MAX_INDEX_BYTES`` of an index, write an index that does not describe the files
beside it, or leave a half-written file under its final name. Fetching a set and
installing it are ``smtpgw.update.updater``'s.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import IO, Any

from smtpgw.spam.database import DatabaseError, SpamDatabase, database_file
from smtpgw.spam.database import FILE_NAME as SPAM_DATABASE
from smtpgw.update.signing import SIGNATURE, SignatureError, read_secret_key, sign_index

__all__ = [
    "CHUNK", "INDEX", "MAX_INDEX_BYTES", "MAX_REJECTED",
    "Entry", "Index", "Layout", "UpdateError",
    "build_signed_set", "build_update_set", "check_contents", "copy_into", "database_version", "file_digest",
    "make_folder",
    "matches", "name_problem", "printable", "read_index", "scan_files", "version_key", "write_file",
]

INDEX = "index.json"
FORMAT, FORMAT_VERSION = "smtpgw-update-set", 1
MAX_INDEX_BYTES = 4 * 1024 * 1024
MAX_FILES = 10_000
MAX_FILE_BYTES = 1 << 30
MAX_SET_BYTES = 8 << 30
MAX_REJECTED = 100
CHUNK = 64 * 1024
CHECK_TIMEOUT = 600  # seconds for clamscan to load the new signatures
# clamd database file types (clamav's signatures.pdf) accepted under clamd/
CLAMD_EXTENSIONS = frozenset({
    "cvd", "cld", "cud", "ndb", "ndu", "hdb", "hdu", "hsb", "hsu", "mdb", "mdu", "msb", "msu", "ldb", "ldu",
    "cdb", "idb", "fp", "sfp", "ign", "ign2", "pdb", "gdb", "wdb", "ftm", "crb", "cbc", "pwdb", "yar", "yara",
})
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")  # no hidden names, no "..", no "/"
_VERSION = re.compile(r"\d{1,12}(?:[.-]\d{1,12}){0,15}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class UpdateError(Exception):
    """The run cannot go on (return code 10); the message says why."""


# region the update-set index

def version_key(version: str) -> tuple[int, ...]:
    """``2005.03.11-1`` -> (2005, 3, 11, 1): the order of database versions."""
    return tuple(int(part) for part in re.split(r"[.-]", version))


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a file of an update set, or None when it can."""
    parts = name.split("/")
    if not all(_COMPONENT.fullmatch(part) for part in parts[1:]):
        return "a path part is empty, hidden, too long or has unusual characters"
    if parts[0] == "bases":
        if not 2 <= len(parts) <= 6:
            return "bases/ files are 1 to 5 folders deep"
        if name == f"bases/{INDEX}":
            return f"bases/{INDEX} is reserved for the installed index"
        return None
    if parts[0] == "clamd":
        if len(parts) != 2 or name.rpartition(".")[2] not in CLAMD_EXTENSIONS:
            return "clamd/ holds signature files only (.ndb, .hdb, .ldb, .cvd, ...), no folders"
        return None
    return "names start with bases/ or clamd/"


@dataclass(frozen=True)
class Entry:
    """One file of a set: ``bases/<path>`` or ``clamd/<file>``."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Index:
    version: str
    date: str = ""
    entries: tuple[Entry, ...] = ()
    rejected: tuple[str, ...] = ()  # versions undone by --rollback (installed index only)

    @property
    def key(self) -> tuple[int, ...]:
        return version_key(self.version)

    def to_bytes(self) -> bytes:
        document: dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "version": self.version, "date": self.date,
            "files": [{"name": e.name, "size": e.size, "sha256": e.sha256} for e in self.entries],
        }
        if self.rejected:
            document["rejected"] = list(self.rejected)
        return (json.dumps(document, indent=1) + "\n").encode("utf-8")

    @classmethod
    def parse(cls, data: bytes, where: str) -> Index:
        """Check every field; raises UpdateError naming ``where`` and the problem."""
        if len(data) > MAX_INDEX_BYTES:
            raise UpdateError(f"{where}: larger than {MAX_INDEX_BYTES} bytes")
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise UpdateError(f"{where}: not a JSON update index ({exc})") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise UpdateError(f"{where}: not an update index (format is not {FORMAT!r})")
        if document.get("format_version") != FORMAT_VERSION or isinstance(document.get("format_version"), bool):
            raise UpdateError(f"{where}: unsupported format_version {document.get('format_version')!r}")
        version, date = document.get("version"), document.get("date", "")
        if not isinstance(version, str) or not _VERSION.fullmatch(version):
            raise UpdateError(f"{where}: version must be numbers separated by . or - (got {version!r:.40})")
        if not isinstance(date, str) or len(date) > 32 or not date.isprintable():
            raise UpdateError(f"{where}: date must be a short text")
        rejected = document.get("rejected", [])
        if not isinstance(rejected, list) or len(rejected) > MAX_REJECTED or not all(
            isinstance(item, str) and _VERSION.fullmatch(item) for item in rejected
        ):
            raise UpdateError(f"{where}: rejected must be a list of versions")
        return cls(version, date, cls._entries(document.get("files"), where), tuple(rejected))

    @staticmethod
    def _entries(files: object, where: str) -> tuple[Entry, ...]:
        if not isinstance(files, list) or len(files) > MAX_FILES:
            raise UpdateError(f"{where}: files must be a list of at most {MAX_FILES} entries")
        entries: dict[str, Entry] = {}
        for number, item in enumerate(files, 1):
            if not isinstance(item, dict):
                raise UpdateError(f"{where}: file {number} is not an object")
            name, size, digest = item.get("name"), item.get("size"), item.get("sha256")
            problem = name_problem(name) if isinstance(name, str) else "missing"
            if problem or not isinstance(name, str):
                raise UpdateError(f"{where}: file {number} name {name!r:.80}: {problem}")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_BYTES:
                raise UpdateError(f"{where}: {name}: size must be a whole number of bytes up to {MAX_FILE_BYTES}")
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise UpdateError(f"{where}: {name}: sha256 must be 64 lower-case hex digits")
            if name in entries:
                raise UpdateError(f"{where}: {name} listed twice")
            entries[name] = Entry(name, size, digest)
        if sum(entry.size for entry in entries.values()) > MAX_SET_BYTES:
            raise UpdateError(f"{where}: the files add up to more than {MAX_SET_BYTES} bytes")
        return tuple(entries.values())


def read_index(path: str) -> Index | None:
    """The index at ``path``, or None when there is none; a damaged one is an UpdateError."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_INDEX_BYTES + 1)
    except FileNotFoundError:
        return None
    return Index.parse(data, path)


def file_digest(path: str) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def matches(path: str, entry: Entry) -> bool:
    """``path`` is a regular file with the entry's size and SHA-256."""
    try:
        if not os.path.isfile(path) or os.path.getsize(path) != entry.size:
            return False
        return file_digest(path) == (entry.size, entry.sha256)
    except OSError:
        return False


def scan_files(root: str) -> list[str]:
    """The regular, non-hidden files under ``root`` (relative, ``/``-separated, sorted);
    symbolic links and a top-level index.json are left out."""
    found: list[str] = []
    for folder, folders, names in os.walk(root):
        folders[:] = [d for d in folders if not d.startswith(".") and not os.path.islink(os.path.join(folder, d))]
        for name in names:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            if name.startswith(".") or os.path.islink(path) or not os.path.isfile(path) or relative == INDEX:
                continue
            found.append(relative)
            if len(found) > MAX_FILES:
                raise UpdateError(f"{root}: more than {MAX_FILES} files")
    return sorted(found)


def database_version(bases: str) -> tuple[str, str]:
    """(version, date) of the spam database in a bases folder; it must load."""
    path = database_file(bases)
    try:
        info = SpamDatabase.load(path).info
    except DatabaseError as exc:
        raise UpdateError(f"cannot take the version from the spam database: {exc}") from None
    if not _VERSION.fullmatch(info.version):
        raise UpdateError(f"{path}: version {info.version!r} is not numbers separated by . or -; give one")
    return info.version, info.date


def build_update_set(bases: str, out: str, version: str | None = None, date: str | None = None,
                     clamd_files: tuple[str, ...] | list[str] = (), check: bool = False,
                     skipped: Callable[[str], None] | None = None) -> Index:
    """Make the update-set folder ``out`` (new or empty) from a bases folder and clamd signature
    files; the version and date default to the spam database's. With ``check`` the contents
    are checked as keepup2date checks them before the index is written. A file whose name
    cannot be in a set is an error, or, with ``skipped``, left out and told to it."""
    if version is None:
        version, found_date = database_version(bases)
        date = found_date if date is None else date
    if not _VERSION.fullmatch(version):
        raise UpdateError(f"version {version!r} is not numbers separated by . or -")
    if os.path.exists(out) and os.listdir(out):
        raise UpdateError(f"{out}: not empty")
    layout = Layout.of_set(out)
    copies = [(os.path.join(bases, *relative.split("/")), "bases/" + relative) for relative in scan_files(bases)]
    copies += [(path, "clamd/" + os.path.basename(path)) for path in clamd_files]
    entries = []
    for source, name in copies:
        problem = name_problem(name)
        if problem and skipped is not None:
            skipped(f"{source}: left out ({problem})")
            continue
        if problem:
            raise UpdateError(f"{source}: cannot be part of an update set: {problem}")
        target = layout.path(name)
        assert target is not None  # a set layout has every area
        write_file(target, partial(copy_into, source))
        entries.append(Entry(name, *file_digest(target)))
    if len({entry.name for entry in entries}) != len(entries):
        raise UpdateError("two files would have the same name in the update set")
    index = Index(version, date or "", tuple(entries))
    if check:
        with tempfile.TemporaryDirectory(prefix="update-set.") as scratch:
            check_contents(layout, entries, scratch)
    write_file(layout.index, lambda out_file: out_file.write(index.to_bytes()))
    return index

def build_signed_set(bases: str, out: str, key_files: list[str], version: str | None = None,
                     date: str | None = None, clamd_files: tuple[str, ...] | list[str] = ()) -> Index:
    """``build_update_set`` with its contents checked, then ``index.json.sig`` by each secret key
    file. The keys are read first: a key that cannot sign leaves no set behind."""
    try:
        secrets = [read_secret_key(path) for path in key_files]
        sign_index(b"", secrets)  # the number of keys is checked before anything is made
    except SignatureError as exc:
        raise UpdateError(str(exc)) from None
    index = build_update_set(bases, out, version, date, clamd_files, check=True)
    with open(os.path.join(out, INDEX), "rb") as handle:  # what is published is what is signed
        signature = sign_index(handle.read(), secrets)
    write_file(os.path.join(out, SIGNATURE), lambda out_file: out_file.write(signature))
    return index

# endregion
# region files and folders


@dataclass(frozen=True)
class Layout:
    """Where a set's files are: a ``bases`` folder, a ``clamd`` folder (None: not kept here)
    and the index file. An update set keeps them as bases/, clamd/ and index.json."""

    bases: str
    clamd: str | None
    index: str

    @classmethod
    def of_set(cls, folder: str) -> Layout:
        return cls(os.path.join(folder, "bases"), os.path.join(folder, "clamd"), os.path.join(folder, INDEX))

    @classmethod
    def installed(cls, bases: str, clamd: str | None) -> Layout:
        return cls(bases, clamd, os.path.join(bases, INDEX))

    def path(self, name: str) -> str | None:
        area, _, relative = name.partition("/")
        root = self.bases if area == "bases" else self.clamd
        return None if root is None else os.path.join(root, *relative.split("/"))


def make_folder(path: str) -> None:
    """Create ``path`` and its missing parents, each owned like the folder it is made in."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.isdir(path) or parent == path:
        return
    make_folder(parent)
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        return
    _own_like_parent(path)


def _own_like_parent(path: str) -> None:
    """As root, give ``path`` the owner of its folder (a gateway account can then train or clean)."""
    if os.geteuid() != 0:
        return
    parent = os.stat(os.path.dirname(os.path.abspath(path)))
    if (os.lstat(path).st_uid, os.lstat(path).st_gid) != (parent.st_uid, parent.st_gid):
        os.chown(path, parent.st_uid, parent.st_gid)


def copy_into(source: str, out: IO[bytes]) -> None:
    with open(source, "rb") as handle:
        shutil.copyfileobj(handle, out, CHUNK)


def write_file(target: str, fill: Callable[[IO[bytes]], object]) -> None:
    """Atomically replace ``target``: a temp file in its folder, filled, fsynced, renamed."""
    folder = os.path.dirname(target)
    make_folder(folder)
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o644)
        _own_like_parent(temp)
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise

# endregion
# region checking the contents


def spam_database_path(layout: Layout, entry: Entry) -> str | None:
    """Where ``entry`` is installed when it is a spam database, else None."""
    path = layout.path(entry.name)
    if path is not None and entry.name.startswith("bases/") and os.path.basename(path) == SPAM_DATABASE:
        return path
    return None


def check_contents(layout: Layout, entries: list[Entry], folder: str) -> None:
    """Beyond the checksums: each spam database must load, the clamd signatures must load in
    clamscan (only checked files are installed; kmg-spec §6.1 AVBasesTestPath)."""
    for entry in entries:
        path = spam_database_path(layout, entry)
        if path is not None:
            try:
                SpamDatabase.load(path)
            except DatabaseError as exc:
                raise UpdateError(f"{entry.name}: not a usable spam database: {exc}") from None
    if any(entry.name.startswith("clamd/") for entry in entries) and layout.clamd is not None:
        check_signatures(layout.clamd, folder)


def check_signatures(signatures: str, folder: str) -> None:
    clamscan = shutil.which("clamscan", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin"]))
    if clamscan is None:
        raise UpdateError("cannot check the clamd signature files: clamscan not found (Debian package clamav)")
    probe = os.path.join(folder, "probe")
    with open(probe, "wb"):
        pass
    command = [clamscan, "--no-summary", "--detect-pua=yes", f"--database={signatures}", probe]
    try:
        done = subprocess.run(command, capture_output=True, timeout=CHECK_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UpdateError(f"clamscan could not check the clamd signature files: {exc}") from None
    if done.returncode not in (0, 1):  # clamscan: 0 clean, 1 found, 2 error
        lines = (done.stderr or done.stdout).decode("utf-8", "replace").strip().splitlines() or ["no output"]
        raise UpdateError(f"clamd signature files do not load: {printable(lines[-1])}")


def printable(text: str) -> str:
    """``text`` for a report line: unprintable characters as spaces, at most 2000 characters."""
    return "".join(char if char.isprintable() else " " for char in text)[:2000]

# endregion
