"""Message stores: quarantine, backup, incoming and outgoing archives (kmg-spec §4.7, klmaila).

Owns: the on-disk layout of a store, durable writes into it, listing, reading and removing
stored items, the klmaila-style listing, and the ``store`` command (`store_main`).

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
release is handed to the ``release_callback`` the caller gives `store_main`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, List, Mapping, Sequence, TypeVar

__all__ = [
    "STATUSES",
    "Item",
    "Store",
    "StoreError",
    "format_listing",
    "format_size",
    "status_for_verdict",
    "store_main",
]

log = logging.getLogger("smtpgw.store")

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

# Return codes of the store command (kmg-spec §4.7).
EXIT_DONE, EXIT_USAGE, EXIT_UNREADABLE, EXIT_SYSTEM, EXIT_NOT_DONE = 0, 1, 2, 3, 4


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
        raw: bytes | str | os.PathLike[str],
        envelope: Mapping[str, Any],
        status: str,
        reason: str = "",
        verdicts: Mapping[str, str] | None = None,
    ) -> str:
        """Store a message durably; returns the new item ID (the queue ID, made unique).

        ``raw`` is the message bytes or the path of a file holding them; ``verdicts``
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
            _unlink(tmp)
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
                _unlink(tmp)
            self._sync_dir()
        except BaseException:
            _unlink(self._file(item_id, ".json"))  # leave no half item behind
            _unlink(self._file(item_id, ".eml"))
            raise
        log.info("%s: stored as %s/%s, status=%s, reason=%s", qid, self.path, item_id, status, reason)
        return item_id

    def _write_temp(self, source: bytes | str | os.PathLike[str]) -> str:
        fd = -1
        tmp = os.path.join(self.path, f"{_TMP_PREFIX}{secrets.token_hex(8)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                fd = -1
                if isinstance(source, bytes):
                    out.write(source)
                else:
                    with open(source, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            if fd >= 0:
                os.close(fd)
            _unlink(tmp)
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

    # --- removing --------------------------------------------------------------------------

    def remove(self, item_id: str) -> None:
        """Remove one item. Raises StoreError (bad ID), KeyError (no such item) or OSError."""
        _check_id(item_id)
        try:
            os.unlink(self._file(item_id, ".json"))
        except FileNotFoundError:
            raise KeyError(item_id) from None
        _unlink(self._file(item_id, ".eml"))
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
                _unlink(entry.path)
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


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- listing ---------------------------------------------------------------------------------


def format_size(size: int) -> str:
    """Bytes with a B, K or M suffix, as klmailq and klmaila show them."""
    if size < 1024:
        return f"{size}B"
    value, unit = (size / 1024, "K") if size < 1024 * 1024 else (size / (1024 * 1024), "M")
    return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"


def format_listing(items: Sequence[Item], date_format: str = "%Y/%m/%d", time_format: str = "%H:%M:%S") -> str:
    """The klmaila listing: a header line, one line per item, and a footer with count and bytes."""
    rows = [("QueueID", "Status", "Size", "ArrivalTime", "Sender/Recipient")]
    for item in items:
        when = time.strftime(f"{date_format} {time_format}", time.localtime(item.time))
        rcpts = ", ".join(f"<{r}>" for r in item.recipients)
        rows.append((item.id, item.status, format_size(item.size), when, f"<{item.sender}> -> {rcpts}"))
    widths = [max(len(row[col]) for row in rows) for col in range(4)]
    lines = ["  ".join(cell.ljust(widths[col]) for col, cell in enumerate(row[:4])) + "  " + row[4] for row in rows]
    total = sum(item.size for item in items)
    lines.append(f"-- {len(items)} message(s), {total} bytes")
    return "\n".join(lines) + "\n"


# --- the store command -------------------------------------------------------------------------

ReleaseCallback = Callable[[bytes, str, "list[str]", bool], bool]


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _parser() -> _Parser:
    parser = _Parser(prog="smtpgw store", description="Manage quarantine, backup and archives.")
    parser.add_argument(
        "--path",
        default="quarantine",
        help="quarantine, backup, incoming, outgoing, or a store folder (default: quarantine)",
    )
    parser.add_argument("--group", help="take QuarantinePath/BackupPath from this group")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser("list", help="list the stored messages")
    for name, text in (("show", "print one item"), ("remove", "remove one item")):
        commands.add_parser(name, help=text).add_argument("id")
    commands.add_parser("remove-all", help="remove every item")
    release = commands.add_parser("release", help="queue one item again to its original recipients")
    release.add_argument("id")
    release_all = commands.add_parser("release-all", help="queue every item again")
    for sub in (release, release_all):
        sub.add_argument("--without-check", action="store_true", help="skip anti-virus and anti-spam checks")
    commands.add_parser("clean", help="remove leftovers of interrupted writes")
    return parser


def _store_path(name: str, group: str | None, cfg: Any) -> str:
    if name not in ("quarantine", "backup", "incoming", "outgoing"):
        return name
    if name in ("incoming", "outgoing"):
        key = "IncomingArchivePath" if name == "incoming" else "OutgoingArchivePath"
        value = getattr(getattr(cfg, "path", None), key, None)
    else:
        key = "QuarantinePath" if name == "quarantine" else "BackupPath"
        section = getattr(cfg, "policy", None)
        if group is not None:
            section = next((g for g in getattr(cfg, "groups", []) if getattr(g, "name", None) == group), None)
            if section is None:
                raise _UsageError(f"no group named {group!r}")
        value = getattr(section, key, None)
    if not value:
        raise _UsageError(f"{key} is not configured")
    return str(value)


def store_main(
    argv: Sequence[str],
    cfg: Any,
    release_callback: ReleaseCallback | None = None,
) -> int:
    """The ``store`` command; returns 0 done, 1 bad arguments, 2 folder unreadable, 3 system
    error, 4 action not performed (kmg-spec §4.7).

    ``release_callback(raw, sender, recipients, check) -> bool`` queues a released message
    (``check`` False skips anti-virus and anti-spam); without it, release is not performed.
    """
    args_in = list(argv)
    if args_in[:1] == ["store"]:
        args_in = args_in[1:]
    try:
        args = _parser().parse_args(args_in)
        store = Store(_store_path(args.path, args.group, cfg))
    except _UsageError as exc:
        print(f"smtpgw store: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return EXIT_DONE if not exc.code else EXIT_USAGE
    try:
        os.listdir(store.path)
    except OSError as exc:
        print(f"smtpgw store: cannot read {store.path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    try:
        return _run(args, store, cfg, release_callback)
    except StoreError as exc:
        print(f"smtpgw store: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyError as exc:
        print(f"smtpgw store: no item {exc.args[0]} in {store.path}", file=sys.stderr)
        return EXIT_NOT_DONE
    except OSError as exc:
        print(f"smtpgw store: {exc}", file=sys.stderr)
        return EXIT_SYSTEM


def _run(args: argparse.Namespace, store: Store, cfg: Any, release: ReleaseCallback | None) -> int:
    if args.command == "list":
        locale = getattr(cfg, "locale", None)
        date_format = getattr(locale, "DateFormat", None) or "%Y/%m/%d"
        time_format = getattr(locale, "TimeFormat", None) or "%H:%M:%S"
        print(format_listing(store.list(), date_format, time_format), end="")
        return EXIT_DONE
    if args.command == "show":
        raw, item = store.get(args.id)
        print(f"ID: {item.id}\nQueue-ID: {item.queue_id}\nStatus: {item.status} ({STATUSES[item.status]})")
        print(f"Reason: {item.reason}")
        if item.verdicts:
            print("Verdicts: " + "; ".join(f"{check} {verdict}" for check, verdict in item.verdicts if verdict))
        print(f"Sender: <{item.sender}>\nRecipients: {', '.join(item.recipients)}\n")
        _write_bytes(raw)
        return EXIT_DONE
    if args.command == "remove":
        store.remove(args.id)
        print(f"{args.id} removed")
        return EXIT_DONE
    if args.command == "remove-all":
        print(f"{store.remove_all()} message(s) removed")
        return EXIT_DONE
    if args.command == "clean":
        print(f"{store.clean_incomplete()} leftover file(s) removed")
        return EXIT_DONE
    if release is None:
        print("smtpgw store: release is not available here", file=sys.stderr)
        return EXIT_NOT_DONE
    ids = [args.id] if args.command == "release" else [item.id for item in store.list()]
    failed = 0
    for item_id in ids:
        raw, sender, recipients = store.envelope_for_release(item_id)
        if release(raw, sender, recipients, not args.without_check):
            print(f"{item_id} released to {', '.join(recipients)}")
        else:
            print(f"smtpgw store: {item_id} not released", file=sys.stderr)
            failed += 1
    return EXIT_NOT_DONE if failed else EXIT_DONE


def _write_bytes(data: bytes) -> None:
    sys.stdout.flush()
    buffer: BinaryIO | None = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        sys.stdout.write(data.decode("utf-8", "replace"))
    else:
        buffer.write(data)
        buffer.flush()
