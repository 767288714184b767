"""keepup2date: fetch, verify and install database updates (kmg-spec §6.1).

Usage (the arguments after ``smtpgw.py -c CONF keepup2date``; ``python3 -m
smtpgw.updater -c CONF ...`` runs the same)::

    keepup2date [-s URL|DIR] [-u DIR] [-b DIR] [-t DIR] [-l FILE] [--clamd-dir DIR] [--rollback]

``-s`` overrides UpdateServerUrl, ``-u DIR`` makes DIR a mirror (a copy of the
checked set for other hosts; the local bases are left alone), ``-b``, ``-t`` and
``-l`` override BackUpPath, UploadPatchPath and ReportFileName, ``--clamd-dir``
ClamdDatabasePath; ``--rollback`` reinstalls the backup.

Owns: the update-set format (``index.json``), fetching a set from
``[updater.options] UpdateServerUrl`` (an http(s) URL or a local folder, a
mirror) or ``-s``, checking it, installing it into ``[path] BasesPath`` (and
clamd signature files into ``[updater.path] ClamdDatabasePath``), the backup
kept for ``--rollback`` in ``[updater.path] BackUpPath``, the run lock
(``[updater.path] PidFile``), the post-update action and the report
(``[updater.report]``).

Must never: change an installed file before every new file is downloaded and
checked; install a set older than the installed one; leave a half-written file
under an installed name; run twice at once; run the post-update action after a
failed update.

An update set is a folder, served over http(s) or read locally::

    index.json          {"format": "smtpgw-update-set", "format_version": 1,
                         "version": "2005.03.11-1", "date": "2005-03-11",
                         "files": [{"name": "bases/spam/spam.db", "size": N, "sha256": "..."}]}
    bases/...           files installed under BasesPath (the same relative paths)
    clamd/NAME.ndb      clamd signature files, installed under ClamdDatabasePath

Versions are numbers separated by dots or dashes, compared part by part
(``2005.03.11-1`` is 2005, 3, 11, 1). The installed set's index is kept as
``BasesPath/index.json``; it also lists the versions undone by ``--rollback``,
which are not installed again.

A run: lock; read the index; decide (same version with every file present, an
older version, or a rolled-back one: nothing to do); download the files that
differ from the installed ones into a temporary folder, checking size and
SHA-256 while reading and the content afterwards (the spam database must load;
clamd signatures must load in ``clamscan``); copy the installed bases and the
clamd files about to change into BackUpPath (itself an update set, replaced by
one rename); install each file as temp file, fsync, rename; remove files of the
previous set the new one no longer has; write the index last. A crash half way
leaves the old index and a journal file, so the next run installs the set again
and keeps the backup made before the crash. Then clamd is told
to RELOAD when its signatures changed, and ``PostUpdateCmd`` runs (default: the
``.c_db_reload`` control file is dropped into ControlPath, so a running gateway
loads the new databases). Run as root, new files and folders take the owner of
the folder they are made in (the service account's bases stay its own).

Return codes (kmg-spec §6.1): 0 no update needed, 1 updated (or rolled back),
10 critical error (nothing changed), 30 the post-update action failed (the new
bases are installed), 75 configuration unreadable or invalid (bad options and a
missing update source included). 60 (licence missing) is never returned:
smtpgw has no licence keys.

Options accepted from reference configurations and unused: UseUpdateServerUrl,
UseUpdateServerUrlOnly (there are no built-in servers: UpdateServerUrl is the
source), PassiveFtp (ftp is not supported), RegionSettings. ProxyAddress takes
``host:port`` or ``http://user:password@host:port`` (Basic authentication).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import IO, Any, TextIO

from smtpgw.av import ClamdError, ClamdServer
from smtpgw.config import Config, ConfigError, load_config
from smtpgw.queue import fsync_dir, write_durably
from smtpgw.spam.database import FILE_NAME as SPAM_DATABASE
from smtpgw.spam.database import DatabaseError, SpamDatabase, database_file

__all__ = [
    "CONFIG_INVALID", "CRITICAL", "LICENCE", "NO_UPDATE", "POST_UPDATE_FAILED", "UPDATED",
    "Entry", "Index", "Layout", "Report", "Settings", "Source", "UpdateError",
    "build_update_set", "database_version", "main", "mirror", "rollback", "run", "update", "version_key",
]

NO_UPDATE, UPDATED, CRITICAL, POST_UPDATE_FAILED, LICENCE, CONFIG_INVALID = 0, 1, 10, 30, 60, 75
MEANING = {NO_UPDATE: "no update needed", UPDATED: "updated", CRITICAL: "critical error, aborted",
           POST_UPDATE_FAILED: "post-update action failed", CONFIG_INVALID: "configuration unreadable or invalid"}
DEFAULT_CONFIG = "/etc/smtpgw/smtpgw.conf"
INDEX = "index.json"
FORMAT, FORMAT_VERSION = "smtpgw-update-set", 1
MAX_INDEX_BYTES = 4 * 1024 * 1024
MAX_FILES = 10_000
MAX_FILE_BYTES = 1 << 30
MAX_SET_BYTES = 8 << 30
MAX_REJECTED = 100
MIN_RATE = 16 * 1024  # bytes/s a download must average, beyond ConnectTimeout
CHUNK = 64 * 1024
CHECK_TIMEOUT = 600  # seconds for clamscan to load the new signatures
POST_UPDATE_TIMEOUT = 600  # seconds for PostUpdateCmd
RELOAD_MARKER = ".c_db_reload"
JOURNAL = ".keepup2date.installing"  # in the bases folder while files are being replaced
# clamd database file types (clamav's signatures.pdf) accepted under clamd/
CLAMD_EXTENSIONS = frozenset({
    "cvd", "cld", "cud", "ndb", "ndu", "hdb", "hdu", "hsb", "hsu", "mdb", "mdu", "msb", "msu", "ldb", "ldu",
    "cdb", "idb", "fp", "sfp", "ign", "ign2", "pdb", "gdb", "wdb", "ftm", "crb", "cbc", "pwdb", "yar", "yara",
})
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")  # no hidden names, no "..", no "/"
_VERSION = re.compile(r"\d{1,12}(?:[.-]\d{1,12}){0,15}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
LEVEL_LETTERS = {0: "F", 1: "E", 2: "W", 3: "I", 4: "A", 9: "D"}  # [updater.report] ReportLevel


class UpdateError(Exception):
    """The run cannot go on (return code 10); the message says why."""


class SettingsError(ValueError):
    """The configuration or the options cannot drive a run (return code 75)."""


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


def read_current(path: str, report: Report) -> Index | None:
    """The installed (or mirrored) index; a damaged one counts as none, so that the next set
    is installed in full instead of every update failing."""
    try:
        return read_index(path)
    except UpdateError as exc:
        report.warning(f"{exc}; taken as no installed version")
        return None


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
        write_file(target, partial(_copy_into, source))
        entries.append(Entry(name, *file_digest(target)))
    if len({entry.name for entry in entries}) != len(entries):
        raise UpdateError("two files would have the same name in the update set")
    index = Index(version, date or "", tuple(entries))
    if check:
        with tempfile.TemporaryDirectory(prefix="update-set.") as scratch:
            check_contents(layout, entries, scratch)
    write_file(layout.index, lambda out_file: out_file.write(index.to_bytes()))
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


def _copy_into(source: str, out: IO[bytes]) -> None:
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


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)

# endregion
# region sources


class Source:
    """Where an update set is read: an http(s) URL or a folder (also as ``file://``)."""

    def __init__(self, location: str, timeout: float = 30.0, proxy: str | None = None, use_proxy: bool = False):
        self.location = location
        self.timeout = timeout
        self.folder: str | None = None
        scheme = urllib.parse.urlsplit(location).scheme.lower() if _URL.match(location) else ""
        if scheme in ("http", "https"):
            self.base = location if location.endswith("/") else location + "/"
            if use_proxy and proxy:
                url = proxy if "://" in proxy else "http://" + proxy
                proxies: dict[str, str] | None = {"http": url, "https": url}
            else:
                proxies = None if use_proxy else {}  # None: the environment's proxies; {}: none
            self.opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
        elif scheme == "file":
            self.folder = urllib.request.url2pathname(urllib.parse.urlsplit(location).path)
        elif not scheme:
            self.folder = os.path.abspath(location)
        else:
            raise SettingsError(f"update source {location}: only http://, https:// and folders are supported")

    @contextmanager
    def open(self, name: str) -> Iterator[io.BufferedIOBase]:
        """A binary stream of the set's file ``name`` (``index.json`` or an entry name)."""
        url = self.where(name)
        if self.folder is not None:
            try:
                handle = open(url, "rb")
            except OSError as exc:
                raise UpdateError(f"{url}: {exc.strerror or exc}") from None
            with handle:
                yield handle
            return
        try:
            response = self.opener.open(url, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raise UpdateError(f"{url}: HTTP {exc.code} {_printable(str(exc.reason))}") from None
        except urllib.error.URLError as exc:
            raise UpdateError(f"{url}: {_printable(str(exc.reason))}") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise UpdateError(f"{url}: {_printable(str(exc) or type(exc).__name__)}") from None
        with response:
            yield response

    def where(self, name: str) -> str:
        """The path or URL of the set's file ``name``."""
        if self.folder is not None:
            return os.path.join(self.folder, *name.split("/"))
        return self.base + urllib.parse.quote(name)


def chunks(source: Source, name: str, limit: int) -> Iterator[bytes]:
    """The first ``limit`` bytes of the set's file ``name``. Each read waits ConnectTimeout at
    most, and the whole must come at MIN_RATE on average: a trickling server is given up."""
    where = source.where(name)
    deadline, got = time.monotonic() + source.timeout + limit / MIN_RATE, 0
    with source.open(name) as stream:
        while got < limit:
            try:
                chunk = stream.read1(min(CHUNK, limit - got))  # read1: whatever has come, not a full CHUNK
            except (OSError, http.client.HTTPException) as exc:
                raise UpdateError(f"{where}: reading failed: {_printable(str(exc) or type(exc).__name__)}") from None
            if not chunk:
                return
            got += len(chunk)
            yield chunk
            if time.monotonic() > deadline:
                raise UpdateError(f"{where}: slower than {MIN_RATE // 1024} KB/s, given up")


def fetch_index(source: Source) -> Index:
    return Index.parse(b"".join(chunks(source, INDEX, MAX_INDEX_BYTES + 1)), source.where(INDEX))


def download(source: Source, entry: Entry, target: str) -> None:
    """Copy one file of the set to ``target``, checking its size and SHA-256 as it comes."""
    where = source.where(entry.name)
    digest, got = hashlib.sha256(), 0
    make_folder(os.path.dirname(target))
    with open(target, "wb") as out:
        for chunk in chunks(source, entry.name, entry.size + 1):
            got += len(chunk)
            if got > entry.size:
                raise UpdateError(f"{where}: longer than the {entry.size} bytes the index gives")
            digest.update(chunk)
            out.write(chunk)
    if got != entry.size:
        raise UpdateError(f"{where}: {got} bytes, the index gives {entry.size}")
    if digest.hexdigest() != entry.sha256:
        raise UpdateError(f"{where}: SHA-256 differs from the index (damaged or altered file)")

# endregion
# region checking, planning and installing


def check_contents(layout: Layout, entries: list[Entry], folder: str) -> None:
    """Beyond the checksums: each spam database must load, the clamd signatures must load in
    clamscan (only checked files are installed; kmg-spec §6.1 AVBasesTestPath)."""
    for entry in entries:
        path = layout.path(entry.name)
        if path is not None and entry.name.startswith("bases/") and os.path.basename(path) == SPAM_DATABASE:
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
        raise UpdateError(f"clamd signature files do not load: {_printable(lines[-1])}")


def plan(index: Index, current: Index | None, layout: Layout, report: Report) -> list[Entry] | None:
    """The entries to install into ``layout``, or None when no update is needed."""
    if current is not None:
        if index.version in current.rejected:
            report.warning(f"version {index.version} was rolled back here; it is not installed again")
            return None
        if index.key < current.key:
            report.warning(f"the update set's version {index.version} is older than the installed "
                           f"{current.version}: refused")
            return None
        if index.key == current.key:
            missing = [e for e in index.entries if (path := layout.path(e.name)) and not os.path.exists(path)]
            if not missing:
                report.info(f"version {index.version} is installed: no update needed")
                return None
            report.warning(f"{len(missing)} file(s) of version {index.version} are missing; installing them again")
            return missing
    return [e for e in index.entries if (path := layout.path(e.name)) and not matches(path, e)]


def apply(index: Index, source: Layout, target: Layout, changed: list[Entry], report: Report) -> None:
    """Install the ``changed`` files of ``index`` from ``source``, drop files of the previous
    set that ``index`` no longer lists, and write ``index`` last."""
    previous = read_current(target.index, report)
    journal = os.path.join(target.bases, JOURNAL)
    write_file(journal, lambda out: out.write(index.version.encode()))
    folders = {target.bases}
    for entry in changed:
        origin, destination = source.path(entry.name), target.path(entry.name)
        if origin is None or destination is None:
            continue
        write_file(destination, partial(_copy_into, origin))
        folders.add(os.path.dirname(destination))
        report.activity(f"installed {entry.name} ({entry.size} bytes)")
    wanted = {entry.name for entry in index.entries}
    for entry in previous.entries if previous else ():
        path = target.path(entry.name)
        if entry.name not in wanted and path is not None and os.path.isfile(path):
            os.unlink(path)
            folders.add(os.path.dirname(path))
            report.activity(f"removed {entry.name} (not in version {index.version})")
    for folder in folders:
        fsync_dir(folder)
    write_file(target.index, lambda out: out.write(index.to_bytes()))
    os.unlink(journal)
    fsync_dir(os.path.dirname(target.index))


def back_up(backup: str, layout: Layout, current: Index | None, index: Index, report: Report) -> None:
    """Make ``backup`` an update set of what is installed now (the bases folder, and the clamd
    files the new set replaces or drops), replacing the previous backup with one rename."""
    names = {e.name for e in index.entries} | {e.name for e in (current.entries if current else ())}
    clamd_files = sorted(p for n in names if n.startswith("clamd/") and (p := layout.path(n)) and os.path.isfile(p))
    if not scan_files(layout.bases) and not clamd_files:
        report.info("nothing installed yet: no backup made")
        return
    fresh, stale = f"{backup}.new-{os.getpid()}", f"{backup}.old-{os.getpid()}"
    version = current.version if current else "0"
    remove_tree(fresh)
    try:
        build_update_set(layout.bases, fresh, version, current.date if current else "", clamd_files,
                         skipped=lambda text: report.warning(f"backup: {text}"))
        if os.path.exists(backup):
            os.rename(backup, stale)
        os.rename(fresh, backup)
        fsync_dir(os.path.dirname(os.path.abspath(backup)))
    finally:
        remove_tree(fresh)
        remove_tree(stale)
    report.info(f"installed version {version} kept in {backup}")

# endregion
# region the run lock


class RunLock:
    """Only one keepup2date at a time: an flock on the PID file, which holds the owner's PID."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        make_folder(os.path.dirname(self.path))
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                os.close(fd)
                raise UpdateError(f"another keepup2date (pid {holder or '?'}) is running: {self.path} is locked") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False  # the previous holder removed the file between our open and flock
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self.fd = fd
                return self
            os.close(fd)
        raise UpdateError(f"cannot lock {self.path}: it keeps being replaced")

    def __exit__(self, *exc_info: object) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # while still locked: the next run makes a fresh file
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None

# endregion
# region the report


def _printable(text: str) -> str:
    return "".join(char if char.isprintable() else " " for char in text)[:2000]


class Report:
    """[updater.report]: ``[date time L]: message`` lines up to ``level`` (0 fatal, 1 error,
    2 warning, 3 info, 4 activity, 9 debug) to ``out``; errors also to ``errors``."""

    def __init__(self, out: TextIO, level: int = 3, errors: TextIO | None = None,
                 stamp: str = "%Y-%m-%d %H:%M:%S", owned: bool = False) -> None:
        self.out, self.level, self.errors, self.stamp, self.owned = out, level, errors, stamp, owned

    def say(self, level: int, text: str) -> None:
        line = f"[{time.strftime(self.stamp)} {LEVEL_LETTERS[level]}]: {_printable(text)}\n"
        if level <= self.level:
            self.out.write(line)
            self.out.flush()
        if level <= 1 and self.errors is not None:
            self.errors.write(line)
            self.errors.flush()

    def error(self, text: str) -> None:
        self.say(1, text)

    def warning(self, text: str) -> None:
        self.say(2, text)

    def info(self, text: str) -> None:
        self.say(3, text)

    def activity(self, text: str) -> None:
        self.say(4, text)

    def close(self) -> None:
        if self.owned:
            self.out.close()

    @classmethod
    def open(cls, cfg: Config, log_file: str | None) -> Report:
        """The report [updater.report] and ``-l`` ask for; KeepSilent keeps stdout to errors."""
        section, stamp = cfg.updater_report, f"{cfg.locale.DateFormat} {cfg.locale.TimeFormat}"
        path = log_file or section.ReportFileName
        if path is None:
            level = min(section.ReportLevel, 1) if cfg.updater_options.KeepSilent else section.ReportLevel
            return cls(sys.stdout, level, None, stamp)
        make_folder(os.path.dirname(os.path.abspath(path)))
        handle = open(path, "a" if section.Append else "w", encoding="utf-8")
        return cls(handle, section.ReportLevel, sys.stderr, stamp, owned=True)

# endregion
# region the commands


@dataclass(frozen=True)
class Settings:
    """What a run needs, from the configuration and the options."""

    source: str | None  # URL or folder; None: not configured
    bases: str
    backup: str
    lock: str
    clamd: str | None = None
    temp: str | None = None
    control: str | None = None
    post_update_cmd: str | None = None
    clamd_addresses: tuple[str, ...] = ()
    timeout: float = 30.0
    proxy: str | None = None
    use_proxy: bool = False

    @property
    def layout(self) -> Layout:
        return Layout.installed(self.bases, self.clamd)

    def open_source(self) -> Source:
        if not self.source:
            raise SettingsError("no update source: set [updater.options] UpdateServerUrl "
                                "(an http(s) URL or a folder) or give -s")
        return Source(self.source, self.timeout, self.proxy, self.use_proxy)

    @classmethod
    def from_config(cls, cfg: Config, args: argparse.Namespace) -> Settings:
        paths, options = cfg.updater_path, cfg.updater_options
        bases = cfg.base.BasesPath
        source = os.path.abspath(args.source) if args.source and not _URL.match(args.source) else args.source
        settings = cls(
            source=source or options.UpdateServerUrl,
            bases=bases,
            backup=os.path.abspath(args.backup or paths.BackUpPath or bases.rstrip("/") + ".backup"),
            lock=paths.PidFile or os.path.join(bases, ".keepup2date.pid"),
            clamd=os.path.abspath(args.clamd_dir) if args.clamd_dir else getattr(paths, "ClamdDatabasePath", None),
            temp=os.path.abspath(args.temp) if args.temp else paths.UploadPatchPath,
            control=cfg.path.ControlPath,
            post_update_cmd=options.PostUpdateCmd,
            clamd_addresses=tuple(cfg.ave.ClamdAddress),
            timeout=float(options.ConnectTimeout),
            proxy=options.ProxyAddress,
            use_proxy=options.UseProxy,
        )
        if not args.rollback:
            settings.open_source()  # an unusable source is a configuration problem (75)
        return settings


@contextmanager
def staging(settings: Settings) -> Iterator[str]:
    """A temporary folder under -t / UploadPatchPath (or the system's), removed afterwards."""
    if settings.temp:
        make_folder(settings.temp)
    folder = tempfile.mkdtemp(prefix="keepup2date.", dir=settings.temp)
    try:
        yield folder
    finally:
        remove_tree(folder)


def fetch_checked(source: Source, entries: list[Entry], folder: str) -> Layout:
    """Download ``entries`` into an update set under ``folder`` and check them."""
    staged = Layout.of_set(os.path.join(folder, "set"))
    for entry in entries:
        download(source, entry, staged.path(entry.name) or "")
    check_contents(staged, entries, folder)
    return staged


def update(settings: Settings, report: Report) -> int:
    """Install the newest set from the source into BasesPath (and ClamdDatabasePath)."""
    source = settings.open_source()
    layout = settings.layout
    index = fetch_index(source)
    current = read_current(layout.index, report)
    report.info(f"update set version {index.version} at {source.location}; installed: "
                f"{current.version if current else 'none'}")
    changed = plan(index, current, layout, report)
    if changed is None:
        return NO_UPDATE
    skipped = [e for e in index.entries if e.name.startswith("clamd/")] if layout.clamd is None else []
    if skipped:
        report.info(f"{len(skipped)} clamd signature file(s) skipped: [updater.path] ClamdDatabasePath is not set")
    with staging(settings) as folder:
        staged = fetch_checked(source, changed, folder)
        if os.path.exists(os.path.join(layout.bases, JOURNAL)):
            report.warning("the previous update was interrupted: the backup made before it is kept")
        elif current is None or current.version != index.version:
            back_up(settings.backup, layout, current, index, report)
        apply(replace(index, rejected=current.rejected if current else ()), staged, layout, changed, report)
    report.info(f"bases updated to version {index.version} ({len(changed)} file(s) installed)")
    return after_update(settings, index, any(e.name.startswith("clamd/") for e in changed), report)


def mirror(settings: Settings, folder: str, report: Report) -> int:
    """``-u DIR``: make DIR a checked copy of the source's update set, for other hosts'
    UpdateServerUrl; the local bases are not touched."""
    source = settings.open_source()
    layout = Layout.of_set(os.path.abspath(folder))
    index = fetch_index(source)
    changed = plan(index, read_current(layout.index, report), layout, report)
    if changed is None:
        return NO_UPDATE
    with staging(settings) as temp:
        staged = fetch_checked(source, changed, temp)
        apply(index, staged, layout, changed, report)
    report.info(f"mirror {folder} holds version {index.version} ({len(changed)} file(s) copied)")
    return UPDATED


def rollback(settings: Settings, report: Report) -> int:
    """``--rollback``: reinstall the backup; the version undone is not installed again."""
    backup, layout = Layout.of_set(settings.backup), settings.layout
    index = read_index(backup.index)
    if index is None:
        raise UpdateError(f"no backup to roll back to in {settings.backup}")
    damaged = [e.name for e in index.entries if not matches(backup.path(e.name) or "", e)]
    if damaged:
        raise UpdateError(f"the backup in {settings.backup} is damaged: {', '.join(damaged[:5])}")
    wanted = [e for e in index.entries if layout.path(e.name) is not None]
    with staging(settings) as folder:
        check_contents(backup, wanted, folder)
    current = read_current(layout.index, report)
    rejected = list(current.rejected) if current else []
    if current is not None and current.version != index.version and current.version not in rejected:
        rejected = (rejected + [current.version])[-MAX_REJECTED:]
    changed = [e for e in wanted if not matches(layout.path(e.name) or "", e)]
    apply(replace(index, rejected=tuple(rejected)), backup, layout, changed, report)
    undone = current.version if current else "none"
    report.info(f"rolled back from version {undone} to {index.version} ({len(changed)} file(s) restored)")
    return after_update(settings, index, any(e.name.startswith("clamd/") for e in changed), report)


def after_update(settings: Settings, index: Index, clamd_changed: bool, report: Report) -> int:
    """clamd RELOAD when its signatures changed, then PostUpdateCmd or the .c_db_reload file."""
    if clamd_changed:
        for address in settings.clamd_addresses:
            try:
                report.info(f"clamd {address}: {ClamdServer(address).reload()}")
            except (ClamdError, ValueError) as exc:
                report.warning(f"clamd {address} not reloaded ({exc}); its SelfCheck will load the signatures")
    if settings.post_update_cmd:
        environment = dict(os.environ, SMTPGW_BASES_VERSION=index.version, SMTPGW_BASES_PATH=settings.bases)
        try:
            done = subprocess.run(settings.post_update_cmd, shell=True, env=environment, capture_output=True,
                                  timeout=POST_UPDATE_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            report.error(f"PostUpdateCmd failed: {exc}")
            return POST_UPDATE_FAILED
        output = (done.stdout + done.stderr).decode("utf-8", "replace").strip()
        if done.returncode != 0:
            report.error(f"PostUpdateCmd exited with {done.returncode}: {output[-500:]}")
            return POST_UPDATE_FAILED
        report.info("PostUpdateCmd done" + (f": {output[-500:]}" if output else ""))
        return UPDATED
    if not settings.control or not os.path.isdir(settings.control):
        report.warning(f"ControlPath {settings.control} does not exist: the gateway loads the new bases when it starts")
        return UPDATED
    try:
        write_durably(os.path.join(settings.control, RELOAD_MARKER), b"")
    except OSError as exc:
        report.error(f"cannot ask the gateway to reload its databases: {exc}")
        return POST_UPDATE_FAILED
    report.info(f"{RELOAD_MARKER} dropped into {settings.control}: the gateway reloads its databases")
    return UPDATED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtpgw.py keepup2date", description="Update the anti-spam and "
                                     "clamd databases from UpdateServerUrl (kmg-spec 6.1).")
    parser.add_argument("-c", "--config", help=f"configuration file (default {DEFAULT_CONFIG})")
    parser.add_argument("-s", "--source", help="update set URL or folder (overrides UpdateServerUrl)")
    parser.add_argument("-u", "--mirror", metavar="DIR", help="copy the checked update set into DIR "
                        "(a mirror for other hosts) instead of installing it")
    parser.add_argument("-b", "--backup", metavar="DIR", help="backup folder (overrides BackUpPath)")
    parser.add_argument("-t", "--temp", metavar="DIR", help="temporary folder (overrides UploadPatchPath)")
    parser.add_argument("-l", "--log", metavar="FILE", help="report file (overrides ReportFileName)")
    parser.add_argument("--clamd-dir", metavar="DIR", help="clamd DatabaseDirectory (overrides ClamdDatabasePath)")
    parser.add_argument("--rollback", action="store_true", help="reinstall the bases kept in the backup folder")
    return parser


def main(argv: list[str], cfg: Config | str | None = None) -> int:
    """``keepup2date``: ``argv`` are its arguments; ``cfg`` a loaded Config, or the path of the
    configuration to load (``-c`` wins). Returns the kmg-spec §6.1 code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return NO_UPDATE if exc.code == 0 else CONFIG_INVALID
    if args.mirror and args.rollback:
        print("keepup2date: -u and --rollback cannot be combined", file=sys.stderr)
        return CONFIG_INVALID
    try:
        if args.config or not isinstance(cfg, Config):
            cfg = load_config(args.config or (cfg if isinstance(cfg, str) else None) or DEFAULT_CONFIG)
        settings = Settings.from_config(cfg, args)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        print(f"keepup2date: {MEANING[CONFIG_INVALID]}", file=sys.stderr)
        return CONFIG_INVALID
    except SettingsError as exc:
        print(f"keepup2date: {exc}", file=sys.stderr)
        return CONFIG_INVALID
    try:
        report = Report.open(cfg, args.log)
    except OSError as exc:
        print(f"keepup2date: cannot write the report: {exc}", file=sys.stderr)
        return CRITICAL
    try:
        code = run(settings, report, mirror_to=args.mirror, undo=args.rollback)
        report.say(3 if code in (NO_UPDATE, UPDATED) else 1, f"keepup2date finished: {code} ({MEANING[code]})")
        return code
    finally:
        report.close()


def run(settings: Settings, report: Report, mirror_to: str | None = None, undo: bool = False) -> int:
    """One locked run: update, mirror into ``mirror_to``, or roll back (``undo``); the return
    code, with every error reported."""
    try:
        make_folder(settings.bases)
        with RunLock(settings.lock):
            if undo:
                return rollback(settings, report)
            if mirror_to:
                return mirror(settings, mirror_to, report)
            return update(settings, report)
    except SettingsError as exc:
        report.error(str(exc))
        return CONFIG_INVALID
    except UpdateError as exc:
        report.error(str(exc))
    except OSError as exc:
        report.error(f"{exc.filename or 'system error'}: {exc.strerror or exc}")
    return CRITICAL


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

# endregion
