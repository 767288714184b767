"""Message stores: quarantine, backup, incoming and outgoing archives (kmg-spec §4.7, klmaila).

Owns: the on-disk layout of a store, durable writes into it, listing, reading and removing
stored items, purging the items past their lifetime, and item sizes as listings show them
(the ``store`` command and its klmaila-style listing are `smtpgw.app.storecli`).

A store is one folder. Each item is two files named after its item ID:
``<ID>.eml`` (the message, byte for byte) and ``<ID>.json`` (envelope, status code, stored
time, reason). Each is written to a temp file and fsync'd, then given its name (the message
by link(2), which never replaces another item, the record by rename(2)), then the folder is
fsync'd; the message first, the record last. An ``.eml`` without its ``.json`` is an item
whose write did not finish: it is never listed, and `Store.clean_incomplete` removes it
(and any lone record). Removal goes the other way round, record first.

Status codes: RCV incoming archive, SNT outgoing archive, BAK backup original (kept before the
gateway changed the message), quarantine copies by verdict CLN clean, CRD cured
(disinfected), SSP suspicious, PRT protected, ERR error, FLT filtered, INF infected, and, as
this project's extension for the anti-spam filter, SPM spam and PSP probable spam.

Must never: follow an item ID outside its folder (IDs are checked against a strict pattern),
overwrite an existing item, list an item whose write did not finish, or send a message (a
release is handed to the ``release_callback`` the caller gives `smtpgw.app.storecli.store_main`),
or remove an item before its lifetime is over (an item whose status has no lifetime is kept).

Lifetimes (days, 0 keeps items for ever) apply per status kind: `lifetimes` maps each store
folder of a configuration to {status: seconds}; when one folder serves several purposes or
groups, each status keeps the longest lifetime any of them asks for.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from typing import Any, List, Mapping, Sequence, TypeVar

from smtpgw.spool.durable import unlink_if_present
from smtpgw.spool.queue import MessageFile

__all__ = [
    "STATUSES",
    "Item",
    "Store",
    "StoreError",
    "format_size",
    "lifetimes",
    "purge_stores",
    "status_for_verdict",
]

log = logging.getLogger("smtpgw.spool.store")

STATUSES: dict[str, str] = {
    "RCV": "incoming archive",
    "SNT": "outgoing archive",
    "BAK": "backup of the original",
    "CLN": "clean",
    "CRD": "cured (disinfected)",
    "SSP": "suspicious",
    "PRT": "protected",
    "ERR": "error",
    "FLT": "filtered",
    "INF": "infected",
    "SPM": "spam (extension)",
    "PSP": "probable spam (extension)",
}
_VERDICTS = {
    "clean": "CLN",
    "disinfected": "CRD",
    "cured": "CRD",
    "suspicious": "SSP",
    "protected": "PRT",
    "error": "ERR",
    "filtered": "FLT",
    "infected": "INF",
    "spam": "SPM",
    "probable_spam": "PSP",
    "probable spam": "PSP",
}

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,79}")
_TMP_PREFIX = ".tmp-"
MAX_RECORD_BYTES = 4 * 1024 * 1024
MAX_COPIES = 1000  # items of one queue ID in one store
INCOMPLETE_GRACE = 3600.0  # seconds a lone .eml may be a write still in progress


class StoreError(ValueError):
    """A bad item ID or status code."""


def status_for_verdict(verdict: str) -> str:
    """The quarantine status code for an anti-virus status or spam verdict."""
    try:
        return _VERDICTS[verdict.strip().lower()]
    except KeyError:
        raise StoreError(f"no store status for verdict {verdict!r}") from None


@dataclass(frozen=True)
class Item:
    """One stored message as listed."""

    id: str
    queue_id: str
    status: str
    size: int
    time: float  # arrival at the gateway (stored time when unknown)
    stored_at: float
    sender: str
    recipients: tuple[str, ...]
    reason: str
    verdicts: tuple[tuple[str, str], ...] = ()  # each check's verdict: ("anti-virus", "infected"), ("spam", "Spam")


class Store:
    """One store folder."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.fspath(path))

    # --- writing -----------------------------------------------------------------------

    def put(
        self,
        qid: str,
        raw: bytes | str | os.PathLike[str] | MessageFile,
        envelope: Mapping[str, Any],
        status: str,
        reason: str = "",
        verdicts: Mapping[str, str] | None = None,
    ) -> str:
        """Store a message durably; returns the new item ID (the queue ID, made unique).

        ``raw`` is the message bytes, the path of a file holding them or a queued message
        (``Queue.open_message``, read from where it stands); ``verdicts``
        names each check's verdict (the status code says the most telling one).
        Raises StoreError for an unknown status and OSError when the disk fails.
        """
        if status not in STATUSES:
            raise StoreError(f"unknown store status {status!r}")
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        tmp = self._write_temp(raw)
        try:
            item_id = self._claim(tmp, _base_id(qid))
        finally:
            unlink_if_present(tmp)
        record = {
            "id": item_id,
            "queue_id": str(qid),
            "status": status,
            "reason": str(reason),
            "verdicts": {str(k): str(v) for k, v in (verdicts or {}).items()},
            "stored_at": time.time(),
            "size": os.stat(self._file(item_id, ".eml")).st_size,
            "envelope": dict(envelope),
        }
        try:
            tmp = self._write_temp(json.dumps(record, sort_keys=True).encode("utf-8"))
            try:
                os.replace(tmp, self._file(item_id, ".json"))
            finally:
                unlink_if_present(tmp)
            self._sync_dir()
        except BaseException:
            unlink_if_present(self._file(item_id, ".json"))  # leave no half item behind
            unlink_if_present(self._file(item_id, ".eml"))
            raise
        log.info("%s: stored as %s/%s, status=%s, reason=%s", qid, self.path, item_id, status, reason)
        return item_id

    def _write_temp(self, source: bytes | str | os.PathLike[str] | MessageFile) -> str:
        fd = -1
        tmp = os.path.join(self.path, f"{_TMP_PREFIX}{secrets.token_hex(8)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                fd = -1
                if isinstance(source, bytes):
                    out.write(source)
                elif isinstance(source, MessageFile):
                    shutil.copyfileobj(source, out, 1 << 20)
                else:
                    with open(source, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            if fd >= 0:
                os.close(fd)
            unlink_if_present(tmp)
            raise
        return tmp

    def _claim(self, tmp: str, base: str) -> str:
        """Give the written message its final name; link(2) never replaces an existing item."""
        for n in range(1, MAX_COPIES + 1):
            item_id = base if n == 1 else f"{base}-{n}"
            try:
                os.link(tmp, self._file(item_id, ".eml"))
            except FileExistsError:
                continue
            self._sync_dir()
            return item_id
        raise OSError(f"{self.path}: more than {MAX_COPIES} items for queue ID {base}")

    def _sync_dir(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- reading ---------------------------------------------------------------------------

    def list(self) -> list[Item]:
        """Every complete item, oldest arrival first. Raises OSError if the folder is unreadable."""
        items = []
        with os.scandir(self.path) as entries:
            names = {e.name for e in entries}
        for name in names:
            item_id, ext = os.path.splitext(name)
            if ext == ".json" and _ID.fullmatch(item_id) and f"{item_id}.eml" in names:
                item = self._read_item(item_id)
                if item is not None:
                    items.append(item)
        return sorted(items, key=lambda i: (i.time, i.id))

    def item(self, item_id: str) -> Item:
        """The listing entry of one item. Raises StoreError (bad ID) or KeyError (no such item)."""
        _check_id(item_id)
        item = self._read_item(item_id)
        if item is None or not os.path.exists(self._file(item_id, ".eml")):
            raise KeyError(item_id)
        return item

    def get(self, item_id: str) -> tuple[bytes, Item]:
        """(message bytes, item). Raises StoreError, KeyError, or OSError when the disk fails."""
        item = self.item(item_id)
        try:
            with open(self._file(item_id, ".eml"), "rb") as handle:
                return handle.read(), item
        except FileNotFoundError:
            raise KeyError(item_id) from None

    def message_path(self, item_id: str) -> str:
        """The path of a complete item's message, for streaming it instead of reading it whole."""
        self.item(item_id)
        return self._file(item_id, ".eml")

    def envelope(self, item_id: str) -> dict[str, Any]:
        """The envelope record stored with an item."""
        _check_id(item_id)
        record = self._read_record(item_id)
        if record is None:
            raise KeyError(item_id)
        envelope = record.get("envelope")
        return dict(envelope) if isinstance(envelope, dict) else {}

    def envelope_for_release(self, item_id: str) -> tuple[bytes, str, List[str]]:
        """(message bytes, envelope sender, original recipients) to queue the item again."""
        raw, item = self.get(item_id)
        return raw, item.sender, list(item.recipients)

    def _read_record(self, item_id: str) -> dict[str, Any] | None:
        try:
            with open(self._file(item_id, ".json"), "rb") as handle:
                data = handle.read(MAX_RECORD_BYTES + 1)
        except FileNotFoundError:
            return None
        if len(data) > MAX_RECORD_BYTES:
            log.warning("%s/%s.json: record too large, ignored", self.path, item_id)
            return None
        try:
            record = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            log.warning("%s/%s.json: unreadable record, ignored", self.path, item_id)
            return None
        return record if isinstance(record, dict) else None

    def _read_item(self, item_id: str) -> Item | None:
        record = self._read_record(item_id)
        if record is None or record.get("status") not in STATUSES:
            return None
        envelope = _field(record, "envelope", dict, {})
        stored_at = _number(record.get("stored_at")) or 0.0
        recipients = _field(envelope, "recipients", list, [])
        return Item(
            id=item_id,
            queue_id=str(record.get("queue_id", "")),
            status=record["status"],
            size=int(_number(record.get("size")) or 0),
            time=_number(envelope.get("received_at")) or stored_at,
            stored_at=stored_at,
            sender=_field(envelope, "sender", str, ""),
            recipients=tuple(
                r["addr"] for r in recipients if isinstance(r, dict) and isinstance(r.get("addr"), str)
            ),
            reason=str(record.get("reason", "")),
            verdicts=tuple((str(k), str(v)) for k, v in _field(record, "verdicts", dict, {}).items()),
        )

    def purge(self, max_age: Mapping[str, float], now: float, limit: int) -> tuple[list[Item], bool]:
        """Remove up to ``limit`` items older than ``max_age[status]`` seconds (stored time).

        Returns (the items removed, whether more may be due). Only records whose file is old
        enough are read, so a purge that finds nothing costs one stat(2) per item."""
        ages = [age for age in max_age.values() if age > 0]
        if not ages:
            return [], False
        oldest_allowed = now - min(ages)
        removed: list[Item] = []
        with os.scandir(self.path) as entries:
            candidates = [e.name[:-5] for e in entries if e.name.endswith(".json") and _ID.fullmatch(e.name[:-5])
                          and _mtime(e) < oldest_allowed]
        for item_id in candidates:
            item = self._read_item(item_id)
            age = max_age.get(item.status, 0) if item is not None else 0
            if item is None or age <= 0 or now - item.stored_at <= age:
                continue
            if len(removed) >= limit:
                return removed, True
            try:
                self.remove(item_id)
            except KeyError:
                continue  # removed meanwhile by the store command
            removed.append(item)
        return removed, False

    # --- removing --------------------------------------------------------------------------

    def remove(self, item_id: str) -> None:
        """Remove one item. Raises StoreError (bad ID), KeyError (no such item) or OSError."""
        _check_id(item_id)
        try:
            os.unlink(self._file(item_id, ".json"))
        except FileNotFoundError:
            raise KeyError(item_id) from None
        unlink_if_present(self._file(item_id, ".eml"))
        self._sync_dir()
        log.info("%s/%s: removed", self.path, item_id)

    def remove_all(self) -> int:
        """Remove every complete item; returns how many."""
        count = 0
        for item in self.list():
            try:
                self.remove(item.id)
            except KeyError:
                continue  # removed meanwhile by someone else
            count += 1
        return count

    def clean_incomplete(self, older_than: float = INCOMPLETE_GRACE) -> int:
        """Remove leftovers of interrupted writes older than ``older_than`` seconds; returns how many."""
        limit = time.time() - older_than
        removed = 0
        with os.scandir(self.path) as entries:
            found = {e.name: e for e in entries if e.is_file(follow_symlinks=False)}
        for name, entry in found.items():
            item_id, ext = os.path.splitext(name)
            other = {".eml": ".json", ".json": ".eml"}.get(ext)
            lone = other is not None and f"{item_id}{other}" not in found
            if (lone or name.startswith(_TMP_PREFIX)) and entry.stat().st_mtime < limit:
                unlink_if_present(entry.path)
                removed += 1
        if removed:
            self._sync_dir()
            log.info("%s: removed %d incomplete item file(s)", self.path, removed)
        return removed

    def _file(self, item_id: str, ext: str) -> str:
        return os.path.join(self.path, item_id + ext)


def _base_id(qid: str) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]", "_", str(qid))[:64].lstrip("_-")
    return base or "item"


def _check_id(item_id: str) -> None:
    if not isinstance(item_id, str) or not _ID.fullmatch(item_id):
        raise StoreError(f"bad item ID {item_id!r}")


T = TypeVar("T")


def _field(record: Mapping[str, Any], key: str, kind: type[T], default: T) -> T:
    """``record[key]`` when it has the expected type (records are read back from disk)."""
    value = record.get(key)
    return value if isinstance(value, kind) else default


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _mtime(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return float("inf")  # removed meanwhile


# --- lifetimes ---------------------------------------------------------------------------------

QUARANTINE_STATUSES = ("CLN", "CRD", "SSP", "PRT", "ERR", "FLT", "INF")
SPAM_STATUSES = ("SPM", "PSP")


def named_stores(cfg: Any) -> dict[str, str]:
    """The stores the console and the digests name, by name (``quarantine``, ``spam`` when
    SpamQuarantinePath keeps spam apart, ``backup``, and ``KIND:GROUP`` for a group's own
    folder; the names of the ``store --path`` command): never a path from a request."""
    found: dict[str, str] = {}
    for section in (cfg.policy, *cfg.groups):
        suffix = "" if section is cfg.policy else f":{section.name}"
        for kind, path in (("quarantine", section.QuarantinePath), ("spam", section.SpamQuarantinePath),
                           ("backup", section.BackupPath)):
            if section is cfg.policy and kind != "spam":
                found[kind] = path  # the policy's own stores are always named, set or not
            elif path and path not in found.values():
                found[f"{kind}{suffix}"] = path
    return found


def lifetimes(cfg: Any) -> dict[str, dict[str, float]]:
    """{store folder: {status: lifetime in seconds}} of every store the configuration names.

    [smtpgw.policy] and each group: QuarantineLifetime for the verdicts kept in QuarantinePath
    (and in SpamQuarantinePath for spam, QuarantinePath when that is not set), BackupLifetime
    for BackupPath; [smtpgw.path]: IncomingArchiveLifetime, OutgoingArchiveLifetime. A lifetime
    of 0 keeps the items for ever, and wins over any other lifetime for the same folder."""
    plan: dict[str, dict[str, float]] = {}

    def add(folder: str | None, statuses: Sequence[str], days: int) -> None:
        if not folder:
            return
        kept = plan.setdefault(os.path.abspath(folder), {})
        for status in statuses:
            seconds = days * 86400.0 if days > 0 else float("inf")
            kept[status] = max(kept.get(status, 0.0), seconds)

    for section in [cfg.policy, *cfg.groups]:
        add(section.QuarantinePath, QUARANTINE_STATUSES + SPAM_STATUSES, section.QuarantineLifetime)
        add(section.SpamQuarantinePath, SPAM_STATUSES, section.QuarantineLifetime)
        add(section.BackupPath, ("BAK",), section.BackupLifetime)
    add(cfg.path.IncomingArchivePath, ("RCV",), cfg.path.IncomingArchiveLifetime)
    add(cfg.path.OutgoingArchivePath, ("SNT",), cfg.path.OutgoingArchiveLifetime)
    return {folder: {s: age for s, age in kept.items() if age != float("inf")} for folder, kept in plan.items()}


def purge_stores(plan: Mapping[str, Mapping[str, float]], now: float,
                 limit: int) -> tuple[list[tuple[str, Item, float]], bool]:
    """One purge pass over the stores of `lifetimes`: (folder, item, lifetime) of each item
    removed, and whether more may be due (``limit`` reached in some folder). A folder that does
    not exist yet is skipped; one that cannot be read is logged and skipped."""
    removed: list[tuple[str, Item, float]] = []
    more = False
    for folder, max_age in plan.items():
        try:
            items, left = Store(folder).purge(max_age, now, limit)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.error("%s: cannot purge the store: %s", folder, exc)
            continue
        removed += [(folder, item, max_age[item.status]) for item in items]
        more = more or left
    return removed, more


# --- sizes -----------------------------------------------------------------------------------


def format_size(size: int) -> str:
    """Bytes with a B, K or M suffix, as klmailq and klmaila show them."""
    if size < 1024:
        return f"{size}B"
    value, unit = (size / 1024, "K") if size < 1024 * 1024 else (size / (1024 * 1024), "M")
    return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
