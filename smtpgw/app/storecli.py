"""The ``store`` command: quarantine, backup and archives from the command line (klmaila, kmg-spec §4.7).

Owns: the command's arguments and return codes (0 done, 1 bad arguments, 2 folder
unreadable, 3 system error, 4 action not performed), naming a store by purpose
(``quarantine``, ``spam``, ``backup``, ``incoming``, ``outgoing``, for the policy or a
group), the listing filters (``--status``, ``--sender``, ``--recipient``, ``--since``,
``--until``) and the listing formats: ``text`` (klmaila's), ``tsv`` and ``json`` (one
object per line, as ``postqueue -j``) for scripts.

A release of a quarantined spam (status SPM/PSP, or a spam verdict of Spam or
Probable Spam) with ``[smtpgw.antispam] LearnOnRelease=yes`` first learns the
message as ham into the site spam database (``spam learn --ham``), so that the
scan of the released copy already counts it; a failed learning is reported and
the release goes on.

Must never: send a message itself (a release goes to the ``release_callback`` the caller
gives), or write to a store except through `smtpgw.store.Store`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any, BinaryIO, Callable, Sequence

from smtpgw.rules.masks import match_any
from smtpgw.spool import ops
from smtpgw.spool.store import STATUSES, Item, Store, StoreError, format_size

__all__ = ["store_main", "filter_items", "format_tsv", "format_json"]

# Return codes of the store command (kmg-spec §4.7).
EXIT_DONE, EXIT_USAGE, EXIT_UNREADABLE, EXIT_SYSTEM, EXIT_NOT_DONE = 0, 1, 2, 3, 4
TSV_COLUMNS = ("id", "queue_id", "status", "size", "arrival", "stored", "sender", "recipients", "reason")
_DATE_FORMATS = ("%Y-%m-%d", "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S")
_NAMED = {
    "quarantine": "QuarantinePath", "spam": "SpamQuarantinePath", "backup": "BackupPath",
    "incoming": "IncomingArchivePath", "outgoing": "OutgoingArchivePath",
}

ReleaseCallback = Callable[[bytes, str, "list[str]", bool], bool]


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _when(text: str) -> float:
    """A --since / --until value: local ``YYYY-MM-DD[ HH:MM[:SS]]`` or seconds since the epoch."""
    if text.isdigit():
        return float(text)
    for form in _DATE_FORMATS:
        try:
            return time.mktime(time.strptime(text, form))
        except ValueError:
            continue
    raise argparse.ArgumentTypeError(f"{text!r} is not YYYY-MM-DD[ HH:MM[:SS]] or seconds since the epoch")


def _statuses(text: str) -> frozenset[str]:
    codes = frozenset(code.strip().upper() for code in text.split(",") if code.strip())
    unknown = sorted(codes - set(STATUSES))
    if unknown or not codes:
        raise argparse.ArgumentTypeError(f"unknown status {', '.join(unknown) or text!r} (one of {', '.join(STATUSES)})")
    return codes


def _parser() -> _Parser:
    parser = _Parser(prog="smtpgw store", description="Manage quarantine, backup and archives.")
    parser.add_argument(
        "--path",
        default="quarantine",
        help="quarantine, spam, backup, incoming, outgoing, or a store folder (default: quarantine)",
    )
    parser.add_argument("--group", help="take QuarantinePath/SpamQuarantinePath/BackupPath from this group")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    listing = commands.add_parser("list", help="list the stored messages")
    listing.add_argument("--status", type=_statuses, help="only these status codes (comma-separated: INF,SPM)")
    listing.add_argument("--sender", action="append", help="only from a sender matching this mask (* and ?)")
    listing.add_argument("--recipient", action="append", help="only to a recipient matching this mask (* and ?)")
    listing.add_argument("--since", type=_when, help="only arrived at or after this time (local)")
    listing.add_argument("--until", type=_when, help="only arrived before this time (local)")
    listing.add_argument("--format", choices=("text", "tsv", "json"), default="text", help="output format")
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
    key = _NAMED.get(name)
    if key is None:
        return name
    if name in ("incoming", "outgoing"):
        value = getattr(getattr(cfg, "path", None), key, None)
    else:
        section = getattr(cfg, "policy", None)
        if group is not None:
            section = next((g for g in getattr(cfg, "groups", []) if getattr(g, "name", None) == group), None)
            if section is None:
                raise _UsageError(f"no group named {group!r}")
        value = getattr(section, key, None)
        if name == "spam" and not value:  # SpamQuarantinePath defaults to QuarantinePath
            key, value = "QuarantinePath", getattr(section, "QuarantinePath", None)
    if not value:
        raise _UsageError(f"{key} is not configured")
    return str(value)


def filter_items(items: Sequence[Item], args: argparse.Namespace) -> list[Item]:
    """The items the list filters keep (each given filter must hold)."""
    def kept(item: Item) -> bool:
        return ((args.status is None or item.status in args.status)
                and (not args.sender or match_any(args.sender, item.sender))
                and (not args.recipient or any(match_any(args.recipient, r) for r in item.recipients))
                and (args.since is None or item.time >= args.since)
                and (args.until is None or item.time < args.until))
    return [item for item in items if kept(item)]


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="seconds")


def _row(item: Item) -> dict[str, Any]:
    return {"id": item.id, "queue_id": item.queue_id, "status": item.status, "size": item.size,
            "arrival": _iso(item.time), "stored": _iso(item.stored_at), "sender": item.sender,
            "recipients": list(item.recipients), "reason": item.reason}


def _cell(value: Any) -> str:
    text = ",".join(value) if isinstance(value, list) else str(value)
    return " ".join(text.replace("\t", " ").splitlines())  # one line, no tab inside a field


def format_tsv(items: Sequence[Item]) -> str:
    """A header line, then one tab-separated line per item (columns: TSV_COLUMNS, times in UTC)."""
    lines = ["\t".join(TSV_COLUMNS)]
    lines += ["\t".join(_cell(row[col]) for col in TSV_COLUMNS) for row in map(_row, items)]
    return "\n".join(lines) + "\n"


def format_json(items: Sequence[Item]) -> str:
    """One JSON object per line and per item (as ``postqueue -j``)."""
    return "".join(json.dumps(_row(item), sort_keys=True) + "\n" for item in items)


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


def _list(args: argparse.Namespace, store: Store, cfg: Any) -> str:
    items = filter_items(store.list(), args)
    if args.format == "tsv":
        return format_tsv(items)
    if args.format == "json":
        return format_json(items)
    locale = getattr(cfg, "locale", None)
    date_format = getattr(locale, "DateFormat", None) or "%Y/%m/%d"
    time_format = getattr(locale, "TimeFormat", None) or "%H:%M:%S"
    return format_listing(items, date_format, time_format)


def _run(args: argparse.Namespace, store: Store, cfg: Any, release: ReleaseCallback | None) -> int:
    if args.command == "list":
        print(_list(args, store, cfg), end="")
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
        _learn_released(store, item_id, cfg)
        if release(raw, sender, recipients, not args.without_check):
            print(f"{item_id} released to {', '.join(recipients)}")
        else:
            print(f"smtpgw store: {item_id} not released", file=sys.stderr)
            failed += 1
    return EXIT_NOT_DONE if failed else EXIT_DONE


def _learn_released(store: Store, item_id: str, cfg: Any) -> None:
    """LearnOnRelease: a released spam is learned as ham into the site spam database."""
    antispam = getattr(cfg, "antispam", None)
    if not ops.learns_on_release(store.item(item_id), bool(getattr(antispam, "LearnOnRelease", False))):
        return
    from smtpgw.spam.database import DatabaseError, site_file
    from smtpgw.spam.spamfilter import default_bases
    from smtpgw.spam.training import learn_files

    bases = getattr(getattr(cfg, "base", None), "BasesPath", None) or default_bases()
    try:
        learn_files(bases, [store.message_path(item_id)], is_spam=False)
    except (DatabaseError, OSError) as exc:
        print(f"smtpgw store: {item_id} not learned as ham: {exc}", file=sys.stderr)
        return
    print(f"{item_id} learned as ham into {site_file(bases)}")


def _write_bytes(data: bytes) -> None:
    sys.stdout.flush()
    buffer: BinaryIO | None = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        sys.stdout.write(data.decode("utf-8", "replace"))
    else:
        buffer.write(data)
        buffer.flush()


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
