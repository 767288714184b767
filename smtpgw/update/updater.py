"""keepup2date: fetch, verify and install database updates (kmg-spec §6.1).

Usage (the arguments after ``smtpgw.py -c CONF keepup2date``; ``python3 -m
smtpgw.update.updater -c CONF ...`` runs the same)::

    keepup2date [-s URL|DIR] [-u DIR] [-b DIR] [-t DIR] [-l FILE] [--clamd-dir DIR] [--rollback] [--force]
    keepup2date keygen --out PREFIX
    keepup2date make-bundle --key PREFIX [--key PREFIX2] --db DIR --out DIR [--clamd FILE ...]

``-s`` overrides UpdateServerUrl, ``-u DIR`` makes DIR a mirror (a copy of the
checked set for other hosts, with its index and signature as published; the local
bases are left alone), ``-b``, ``-t`` and ``-l`` override BackUpPath,
UploadPatchPath and ReportFileName, ``--clamd-dir`` ClamdDatabasePath;
``--rollback`` reinstalls the backup, or with ``-s`` installs the signed set there
even when it is older (the only way down); ``--force`` downloads and verifies every
file again when the version is not newer (never an older one). ``keygen`` makes a
signing key pair, ``make-bundle`` a signed update set (smtpgw/update/signing.py).

Owns: fetching an update set (its format and checks are ``smtpgw.updateset``'s)
from ``[updater.options] UpdateServerUrl`` (an http(s) URL or a local folder, a
mirror) or ``-s``, checking it, installing it into ``[path] BasesPath`` (and
clamd signature files into ``[updater.path] ClamdDatabasePath``), the backup
kept for ``--rollback`` in ``[updater.path] BackUpPath``, the run lock
(``[updater.path] PidFile``), the post-update action and the report
(``[updater.report]``).

Must never: change an installed file before every new file is downloaded and
checked; install a set that no trusted key signed (an unsigned one only from a
local folder with AllowUnsigned=yes, said in the report), or parse an index
before its signature verifies; read a set's file from the source twice (what
is verified is the downloaded copy that is installed); install a set older than
the installed one without --rollback; leave a half-written file
under an installed name; run twice at once; run the post-update action after a
failed update.

Update sets are described in smtpgw/update/updateset.py.

A run: lock; read the index and its signature once, verify the signature
against the trusted keys ([updater.options] PublicKey, else the project's key
shipped in smtpgw/keys/); decide (same version with every file present, or a
rolled-back one: nothing to do; an older version: refused, return code 10);
download the files that
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
10 critical error (nothing changed: an unsigned or badly signed set, an older
version, a damaged or short download included), 30 the post-update action failed (the new
bases are installed), 75 configuration unreadable or invalid (bad options and a
missing update source included). ``keygen`` and ``make-bundle`` return 0 when
done, 10 when they cannot, 75 for bad options. 60 (licence missing) is never returned:
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import TextIO

from smtpgw.config import Config, ConfigError, load_config
from smtpgw.scan.clamd import ClamdError, ClamdServer
from smtpgw.spam.database import DatabaseError
from smtpgw.spam.dbindex import open_database
from smtpgw.spool.durable import fsync_dir, write_durably
from smtpgw.update.signing import (
    MAX_SIGNATURE_BYTES, SIGNATURE, PublicKey, SignatureError, check_signature, generate, shipped_keys,
)
from smtpgw.update import CONFIG_INVALID, CRITICAL, LICENCE, NO_UPDATE, POST_UPDATE_FAILED, UPDATED
from smtpgw.update.updateset import (
    CHUNK, INDEX, MAX_INDEX_BYTES, MAX_REJECTED, Entry, Index, Layout, UpdateError, build_signed_set,
    build_update_set, check_contents, copy_into, database_version, make_folder, matches, printable, read_index, scan_files,
    spam_database_path, version_key, write_file,
)

# The update-set names are also this module's (smtpgw.updateset defines them), so that one
# import serves a caller of keepup2date.
__all__ = [
    "CONFIG_INVALID", "CRITICAL", "LICENCE", "NO_UPDATE", "POST_UPDATE_FAILED", "UPDATED",
    "Entry", "Index", "Layout", "Report", "Settings", "Source", "UpdateError",
    "build_signed_set", "build_update_set", "database_version", "main", "make_bundle", "mirror", "read_index",
    "rollback", "run", "update", "version_key",
]

MEANING = {NO_UPDATE: "no update needed", UPDATED: "updated", CRITICAL: "critical error, aborted",
           POST_UPDATE_FAILED: "post-update action failed", CONFIG_INVALID: "configuration unreadable or invalid"}
DEFAULT_CONFIG = "/etc/smtpgw/smtpgw.conf"
MIN_RATE = 16 * 1024  # bytes/s a download must average, beyond ConnectTimeout
POST_UPDATE_TIMEOUT = 600  # seconds for PostUpdateCmd
RELOAD_MARKER = ".c_db_reload"
TOOLS = ("keygen", "make-bundle")  # keepup2date subcommands that need no configuration
JOURNAL = ".keepup2date.installing"  # in the bases folder while files are being replaced
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
LEVEL_LETTERS = {0: "F", 1: "E", 2: "W", 3: "I", 4: "A", 9: "D"}  # [updater.report] ReportLevel


class SettingsError(ValueError):
    """The configuration or the options cannot drive a run (return code 75)."""


# region the installed index and temporary folders


def read_current(path: str, report: Report) -> Index | None:
    """The installed (or mirrored) index; a damaged one counts as none, so that the next set
    is installed in full instead of every update failing."""
    try:
        return read_index(path)
    except UpdateError as exc:
        report.warning(f"{exc}; taken as no installed version")
        return None


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)

# endregion
# region sources


class Missing(UpdateError):
    """The source has no such file (HTTP 404, no such file in the folder)."""


class Source:
    """Where an update set is read: an http(s) URL or a folder (also as ``file://``)."""

    def __init__(self, location: str, timeout: float = 30.0, proxy: str | None = None, use_proxy: bool = False):
        self.location = location
        self.timeout = timeout
        self.folder: str | None = None
        try:
            scheme = urllib.parse.urlsplit(location).scheme.lower() if _URL.match(location) else ""
        except ValueError as exc:  # e.g. an unclosed [IPv6] host: a bad -s or UpdateServerUrl (75)
            raise SettingsError(f"update source {location}: {exc}") from None
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
            except FileNotFoundError:
                raise Missing(f"{url}: no such file") from None
            except OSError as exc:
                raise UpdateError(f"{url}: {exc.strerror or exc}") from None
            with handle:
                yield handle
            return
        try:
            response = self.opener.open(url, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            error = Missing if exc.code in (404, 410) else UpdateError
            raise error(f"{url}: HTTP {exc.code} {printable(str(exc.reason))}") from None
        except urllib.error.URLError as exc:
            raise UpdateError(f"{url}: {printable(str(exc.reason))}") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise UpdateError(f"{url}: {printable(str(exc) or type(exc).__name__)}") from None
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
                raise UpdateError(f"{where}: reading failed: {printable(str(exc) or type(exc).__name__)}") from None
            if not chunk:
                return
            got += len(chunk)
            yield chunk
            if time.monotonic() > deadline:
                raise UpdateError(f"{where}: slower than {MIN_RATE // 1024} KB/s, given up")


@dataclass(frozen=True)
class Fetched:
    """An update set's index as read once from the source: the bytes that were verified are the
    bytes that are parsed, and the bytes a mirror publishes again with their signature."""

    index: Index
    data: bytes
    signature: bytes | None  # index.json.sig; None: an unsigned set (AllowUnsigned, a local folder)
    signer: PublicKey | None


def fetch_signed(source: Source, settings: Settings, report: Report) -> Fetched:
    """Read index.json and index.json.sig once; the index is parsed only after a trusted key's
    signature over those exact bytes verifies (or, unsigned, when AllowUnsigned lets it)."""
    where = source.where(INDEX)
    data = b"".join(chunks(source, INDEX, MAX_INDEX_BYTES + 1))
    try:
        signature: bytes | None = b"".join(chunks(source, SIGNATURE, MAX_SIGNATURE_BYTES + 1))
    except Missing:
        signature = None
    signer = None
    if signature is not None:
        try:
            signer = check_signature(data, signature, settings.keys, source.where(SIGNATURE))
        except SignatureError as exc:
            raise UpdateError(f"refused: {exc}") from None
        report.info(f"{where}: signed by {signer}")
    elif not settings.allow_unsigned:
        raise UpdateError(f"refused: {where} is not signed ({source.where(SIGNATURE)} is missing)")
    elif source.folder is None:
        raise UpdateError(f"refused: {where} is not signed; AllowUnsigned=yes applies to local folders only")
    else:
        report.warning(f"UNSIGNED update set accepted from the local folder {source.folder} (AllowUnsigned): "
                       f"nothing proves who made it")
    return Fetched(Index.parse(data, where), data, signature, signer)


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
# region planning and installing


def plan(index: Index, current: Index | None, layout: Layout, report: Report,
         force: bool = False, downgrade: bool = False) -> list[Entry] | None:
    """The entries to install into ``layout``, or None when no update is needed. An older set
    is refused (UpdateError) unless ``downgrade`` (--rollback); ``force`` takes every file
    again, and a version rolled back earlier too."""
    wanted = [e for e in index.entries if layout.path(e.name)]
    if current is not None and index.key < current.key and not downgrade:
        raise UpdateError(f"refused: the update set's version {index.version} is older than the installed "
                          f"{current.version} (a stale or replayed index; a downgrade needs --rollback -s)")
    if force:
        return wanted
    if current is not None and index.version in current.rejected and not downgrade:
        report.warning(f"version {index.version} was rolled back here; it is not installed again (--force does)")
        return None
    if current is not None and index.key == current.key:
        missing = [e for e in wanted if not os.path.exists(layout.path(e.name) or "")]
        if not missing:
            report.info(f"version {index.version} is installed: no update needed")
            return None
        report.warning(f"{len(missing)} file(s) of version {index.version} are missing; installing them again")
        return missing
    return [e for e in wanted if not matches(layout.path(e.name) or "", e)]


def apply(index: Index, source: Layout, target: Layout, changed: list[Entry], report: Report,
          published: Fetched | None = None) -> None:
    """Install the ``changed`` files of ``index`` from ``source``, drop files of the previous
    set that ``index`` no longer lists, and write ``index`` last. A mirror gets ``published``:
    the index bytes exactly as they were signed, after their signature (none: an unsigned set)."""
    previous = read_current(target.index, report)
    journal = os.path.join(target.bases, JOURNAL)
    write_file(journal, lambda out: out.write(index.version.encode()))
    folders = {target.bases}
    for entry in changed:
        origin, destination = source.path(entry.name), target.path(entry.name)
        if origin is None or destination is None:
            continue
        write_file(destination, partial(copy_into, origin))
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
    if published is None:
        write_file(target.index, lambda out: out.write(index.to_bytes()))
    else:
        publish(published, target)
    os.unlink(journal)
    fsync_dir(os.path.dirname(target.index))


def publish(fetched: Fetched, target: Layout) -> None:
    """The signature, then the index it signs: a reader in between sees a mismatch and refuses
    the set for now, never an unsigned or wrongly signed one accepted."""
    signature = os.path.join(os.path.dirname(target.index), SIGNATURE)
    if fetched.signature is None:
        if os.path.exists(signature):
            os.unlink(signature)
    else:
        write_file(signature, lambda out: out.write(fetched.signature or b""))
    write_file(target.index, lambda out: out.write(fetched.data))


def published_as(fetched: Fetched, target: Layout) -> bool:
    """Whether the mirror ``target`` already publishes ``fetched``'s index and signature."""
    signature = os.path.join(os.path.dirname(target.index), SIGNATURE)
    return read_bytes(target.index) == fetched.data and read_bytes(signature) == fetched.signature


def read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read(MAX_INDEX_BYTES + 1)
    except FileNotFoundError:
        return None


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


class Report:
    """[updater.report]: ``[date time L]: message`` lines up to ``level`` (0 fatal, 1 error,
    2 warning, 3 info, 4 activity, 9 debug) to ``out``; errors also to ``errors``."""

    def __init__(self, out: TextIO, level: int = 3, errors: TextIO | None = None,
                 stamp: str = "%Y-%m-%d %H:%M:%S", owned: bool = False) -> None:
        self.out, self.level, self.errors, self.stamp, self.owned = out, level, errors, stamp, owned

    def say(self, level: int, text: str) -> None:
        line = f"[{time.strftime(self.stamp)} {LEVEL_LETTERS[level]}]: {printable(text)}\n"
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
    keys: tuple[PublicKey, ...] = ()  # trusted signers ([updater.options] PublicKey, else the shipped key)
    allow_unsigned: bool = False  # AllowUnsigned: an unsigned set from a local folder is installed

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
        try:
            keys = tuple(options.PublicKey) or shipped_keys()
        except SignatureError as exc:
            raise SettingsError(f"{exc}; name the trusted keys with [updater.options] PublicKey") from None
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
            keys=keys,
            allow_unsigned=options.AllowUnsigned,
        )
        if not args.rollback or args.source:
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


def update(settings: Settings, report: Report, force: bool = False, downgrade: bool = False) -> int:
    """Install the newest set from the source into BasesPath (and ClamdDatabasePath); with
    ``downgrade`` (--rollback -s) an older one too, and the installed version is held back."""
    source = settings.open_source()
    layout = settings.layout
    fetched = fetch_signed(source, settings, report)
    index = fetched.index
    current = read_current(layout.index, report)
    report.info(f"update set version {index.version} at {source.location}; installed: "
                f"{current.version if current else 'none'}")
    changed = plan(index, current, layout, report, force, downgrade)
    if changed is None:
        return NO_UPDATE
    skipped = [e for e in index.entries if e.name.startswith("clamd/")] if layout.clamd is None else []
    if skipped:
        report.info(f"{len(skipped)} clamd signature file(s) skipped: [updater.path] ClamdDatabasePath is not set")
    rejected = list(current.rejected) if current else []
    if downgrade and current is not None and index.key < current.key:
        rejected = (rejected + [current.version])[-MAX_REJECTED:]
    rejected = [version for version in rejected if version != index.version]
    with staging(settings) as folder:
        staged = fetch_checked(source, changed, folder)
        if os.path.exists(os.path.join(layout.bases, JOURNAL)):
            report.warning("the previous update was interrupted: the backup made before it is kept")
        elif current is None or current.version != index.version:
            back_up(settings.backup, layout, current, index, report)
        apply(replace(index, rejected=tuple(rejected)), staged, layout, changed, report)
    unsigned = "" if fetched.signer else ", UNSIGNED (AllowUnsigned)"
    report.info(f"bases updated to version {index.version} ({len(changed)} file(s) installed{unsigned})")
    return after_update(settings, index, changed, report)


def mirror(settings: Settings, folder: str, report: Report, force: bool = False) -> int:
    """``-u DIR``: make DIR a checked copy of the source's update set, for other hosts'
    UpdateServerUrl, with the index and its signature as published (downstream gateways
    verify them too); the local bases are not touched."""
    source = settings.open_source()
    layout = Layout.of_set(os.path.abspath(folder))
    fetched = fetch_signed(source, settings, report)
    index = fetched.index
    changed = plan(index, read_current(layout.index, report), layout, report, force)
    if changed is None and published_as(fetched, layout):
        return NO_UPDATE
    with staging(settings) as temp:
        staged = fetch_checked(source, changed or [], temp)
        apply(index, staged, layout, changed or [], report, published=fetched)
    signed = f"signed by {fetched.signer}" if fetched.signer else "UNSIGNED (AllowUnsigned)"
    report.info(f"mirror {folder} holds version {index.version}, {signed} ({len(changed or [])} file(s) copied)")
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
    return after_update(settings, index, changed, report)


def index_spam_databases(layout: Layout, changed: list[Entry], report: Report) -> None:
    """Build the shared index (spam/dbindex.py) of each spam database just installed, here in
    keepup2date's own process, so that the gateway's reload maps a ready index instead of
    building it in one of its I/O threads beside the event loop. A failure only costs that
    build: the gateway builds the index itself, as at a first start."""
    for entry in changed:
        path = spam_database_path(layout, entry)
        if path is None:
            continue
        try:
            open_database(path)
        except (DatabaseError, OSError) as exc:
            report.warning(f"{entry.name}: index not built ({exc}); the gateway builds it when it loads the database")
        else:
            report.info(f"{entry.name}: index built")


def after_update(settings: Settings, index: Index, changed: list[Entry], report: Report) -> int:
    """Index the new spam database, clamd RELOAD when its signatures changed, then PostUpdateCmd
    or the .c_db_reload file."""
    index_spam_databases(settings.layout, changed, report)
    if any(entry.name.startswith("clamd/") for entry in changed):
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
                                     "clamd databases from UpdateServerUrl (kmg-spec 6.1).",
                                     epilog="keys and signed sets: keepup2date keygen -h, keepup2date make-bundle -h")
    parser.add_argument("-c", "--config", help=f"configuration file (default {DEFAULT_CONFIG})")
    parser.add_argument("-s", "--source", help="update set URL or folder (overrides UpdateServerUrl)")
    parser.add_argument("-u", "--mirror", metavar="DIR", help="copy the checked update set into DIR "
                        "(a mirror for other hosts) instead of installing it")
    parser.add_argument("-b", "--backup", metavar="DIR", help="backup folder (overrides BackUpPath)")
    parser.add_argument("-t", "--temp", metavar="DIR", help="temporary folder (overrides UploadPatchPath)")
    parser.add_argument("-l", "--log", metavar="FILE", help="report file (overrides ReportFileName)")
    parser.add_argument("--clamd-dir", metavar="DIR", help="clamd DatabaseDirectory (overrides ClamdDatabasePath)")
    parser.add_argument("--rollback", action="store_true", help="reinstall the bases kept in the backup folder; "
                        "with -s, install the signed set there even when it is older (a downgrade)")
    parser.add_argument("--force", action="store_true", help="download and verify every file again, even when "
                        "the version is not newer (never an older one)")
    return parser


def build_tools_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtpgw.py keepup2date", description="Keys and signed update sets.")
    tools = parser.add_subparsers(dest="tool", required=True)
    keygen = tools.add_parser("keygen", help="make an Ed25519 key pair for signing update sets")
    keygen.add_argument("--out", required=True, metavar="PREFIX",
                        help="PREFIX receives the secret key (mode 0600), PREFIX.pub the public key")
    bundle = tools.add_parser("make-bundle", help="make a signed update set from a bases folder")
    bundle.add_argument("--key", required=True, action="append", metavar="PREFIX",
                        help="secret key file (repeat to sign with several keys, e.g. while rotating)")
    bundle.add_argument("--db", required=True, metavar="DIR", help="bases folder, laid out as the shipped "
                        "smtpgw/bases (spam/spam.db, ...)")
    bundle.add_argument("--out", required=True, metavar="DIR", help="new or empty folder for the update set")
    bundle.add_argument("--clamd", nargs="+", default=[], metavar="FILE", help="clamd signature files to add")
    bundle.add_argument("--version", help="set version (default: the spam database's)")
    bundle.add_argument("--date", help="set date (default: the spam database's)")
    return parser


def keygen(prefix: str) -> int:
    try:
        key = generate(prefix)
    except SignatureError as exc:
        print(f"keepup2date keygen: {exc}", file=sys.stderr)
        return CRITICAL
    print(f"secret key: {prefix} (mode 0600: keep it off the update server, never publish it)")
    print(f"public key: {prefix}.pub\n{key.text} {key.name}")
    print(f"gateways trust it with [updater.options] PublicKey={key.text} (or the path of {prefix}.pub)")
    return NO_UPDATE


def make_bundle(bases: str, out: str, keys: list[str], version: str | None = None, date: str | None = None,
                clamd_files: list[str] | None = None, prog: str = "keepup2date make-bundle") -> int:
    """Make and sign an update set; its summary on standard output, a failure on standard error."""
    try:
        index = build_signed_set(bases, out, keys, version, date, clamd_files or [])
    except (UpdateError, OSError) as exc:
        print(f"{prog}: {exc} ({out} is not a usable update set)", file=sys.stderr)
        return CRITICAL
    total = sum(entry.size for entry in index.entries)
    print(f"{out}: version {index.version}, {len(index.entries)} file(s), {total} bytes, "
          f"signed by {len(keys)} key(s)")
    return NO_UPDATE


def tools_main(argv: list[str]) -> int:
    """``keepup2date keygen|make-bundle``: no configuration needed."""
    try:
        args = build_tools_parser().parse_args(argv)
    except SystemExit as exc:
        return NO_UPDATE if exc.code == 0 else CONFIG_INVALID
    if args.tool == "keygen":
        return keygen(args.out)
    return make_bundle(args.db, args.out, args.key, args.version, args.date, args.clamd)


def main(argv: list[str], cfg: Config | str | None = None) -> int:
    """``keepup2date``: ``argv`` are its arguments; ``cfg`` a loaded Config, or the path of the
    configuration to load (``-c`` wins). Returns the kmg-spec §6.1 code."""
    if argv and argv[0] in TOOLS:
        return tools_main(argv)
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
        code = run(settings, report, mirror_to=args.mirror, undo=args.rollback, force=args.force,
                   from_source=bool(args.source))
        report.say(3 if code in (NO_UPDATE, UPDATED) else 1, f"keepup2date finished: {code} ({MEANING[code]})")
        return code
    finally:
        report.close()


def run(settings: Settings, report: Report, mirror_to: str | None = None, undo: bool = False,
        force: bool = False, from_source: bool = False) -> int:
    """One locked run: update, mirror into ``mirror_to``, or roll back (``undo``: to the backup,
    or, ``from_source`` (-s), to the signed set there); the return code, with every error reported."""
    try:
        make_folder(settings.bases)
        with RunLock(settings.lock):
            if undo and not from_source:
                return rollback(settings, report)
            if mirror_to:
                return mirror(settings, mirror_to, report, force)
            return update(settings, report, force, downgrade=undo)
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
