"""Quarantine digests: each protected recipient told what the quarantine holds for them.

The reference tells recipients about a blocked message one notice at a time (kmg-spec §5.1);
a digest, as spam gateways send them, lists everything held in one message. ``[smtpgw.digest]
Schedule=N`` sends one every N hours (0, the default: none on a schedule); the control file
``.c_digest`` sends one now whatever the schedule.

Owns: finding what the quarantine stores (QuarantinePath and SpamQuarantinePath of the policy
and of each group) hold per recipient in ProtectedDomains (`held`), the digest message built
from ``digest.tmpl`` ([path] TemplatesPath, the shipped one when that folder has none) with
each item's ID, date, sender, subject and release instruction (``smtpgw.py store release ID``,
and a console link when [smtpgw.console] ListenOn is set), the schedule and the time of the
last digest in ``QueuePath/digest.state`` (written durably after the digests are queued, so a
restart neither resends nor skips one).

Must never: send a digest to the null sender or to a recipient outside ProtectedDomains; list
more than MAX_ITEMS items in one digest or write to more than MAX_RECIPIENTS recipients at once;
read a store or build a digest on the event loop (`collect` runs in an I/O thread); change a
store.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

from smtpgw import PACKAGE_DIR, PRODUCT, __version__
from smtpgw.config import Config
from smtpgw.log import event
from smtpgw.mail import headers
from smtpgw.net.loop import EventLoop
from smtpgw.reports import notify, templates
from smtpgw.rules.routing import is_protected
from smtpgw.spool.durable import write_durably
from smtpgw.spool.queue import QUE, new_id, Committer, Envelope, Queue, Recipient
from smtpgw.spool.store import QUARANTINE_STATUSES, SPAM_STATUSES, named_stores, Item, Store

log = logging.getLogger("smtpgw")

STATE_NAME = "digest.state"
TEMPLATE_NAME = "digest.tmpl"
SHIPPED_TEMPLATE = os.path.join(PACKAGE_DIR, "templates", TEMPLATE_NAME)
HELD_STATUSES = frozenset(QUARANTINE_STATUSES + SPAM_STATUSES)
MAX_ITEMS = templates.MAX_ITEMS  # items listed in one digest (the oldest are left out beyond)
MAX_RECIPIENTS = 10000  # digests built in one pass
MAX_HEADER_BYTES = 64 * 1024  # of a stored message read for its Subject
CHECK_INTERVAL = 60.0  # seconds between looks at the schedule (a reload may change it)


@dataclass(frozen=True)
class Held:
    """One quarantined item as a digest lists it."""

    folder: str
    item: Item
    subject: str


def folders(cfg: Any) -> list[str]:
    """The quarantine folders of the policy and the groups, each once."""
    found: list[str] = []
    for section in (cfg.policy, *cfg.groups):
        for folder in (section.QuarantinePath, section.SpamQuarantinePath):
            if folder and os.path.abspath(folder) not in found:
                found.append(os.path.abspath(folder))
    return found


def template_path(cfg: Any) -> str:
    """digest.tmpl of [path] TemplatesPath, or the shipped one when that folder has none."""
    path = os.path.join(cfg.base.TemplatesPath, TEMPLATE_NAME)
    return path if os.path.exists(path) else SHIPPED_TEMPLATE


def load(cfg: Any) -> templates.Template:
    """The digest template, checked. Raises templates.TemplateError."""
    return templates.load_template(template_path(cfg), "digest")


def subject_of(path: str) -> str:
    """The decoded Subject of a stored message ("" when it has none or cannot be read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(MAX_HEADER_BYTES)
    except OSError:
        return ""
    return notify.decode_subject(headers.get_raw(head, "Subject"))


def held(cfg: Any, store_folders: Sequence[str]) -> dict[str, list[Held]]:
    """{protected recipient (lower case): its quarantined items, oldest first}. A folder that
    does not exist is skipped; one that cannot be read is logged and skipped."""
    found: dict[str, list[Held]] = {}
    for folder in store_folders:
        try:
            items = Store(folder).list()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.error("%s: cannot list the store for the digest: %s", folder, exc)
            continue
        for item in items:
            if item.status not in HELD_STATUSES:
                continue
            wanted = {r.lower() for r in item.recipients if r and is_protected(cfg.network.ProtectedDomains, r)}
            if not wanted:
                continue
            entry = Held(folder, item, subject_of(os.path.join(folder, f"{item.id}.eml")))
            for recipient in wanted:
                found.setdefault(recipient, []).append(entry)
    return found


def console_url(cfg: Any) -> str:
    """The console's address as a recipient would reach it ("" when no console listens)."""
    listen = cfg.console.ListenOn
    if not listen:
        return ""
    scheme = "https" if cfg.console.TLSCertificateFile else "http"
    return f"{scheme}://{cfg.network.Hostname}:{listen[1]}"


def release_command(cfg: Any, folder: str, item_id: str) -> str:
    """The command that releases an item: ``--path`` names any store but the policy's quarantine."""
    if cfg.policy.QuarantinePath and os.path.abspath(cfg.policy.QuarantinePath) == folder:
        return f"smtpgw.py store release {item_id}"
    return f"smtpgw.py store --path {folder} release {item_id}"


def build(cfg: Any, template: templates.Template, recipient: str, entries: Sequence[Held],
          console_stores: Mapping[str, str], now: float) -> bytes:
    """One recipient's digest. Raises ValueError for an address unfit for a header field."""
    date_format, time_format = cfg.locale.DateFormat, cfg.locale.TimeFormat
    base = console_url(cfg)
    shown = list(entries)[-MAX_ITEMS:]
    items = []
    for entry in shown:
        name = console_stores.get(entry.folder)
        link = f"{base}/store/item?name={urllib.parse.quote(name)}&id={entry.item.id}" if base and name else base
        items.append({
            "ITEM_ID": entry.item.id,
            "ITEM_DATE": notify.local_time(date_format, entry.item.time),
            "ITEM_TIME": notify.local_time(time_format, entry.item.time),
            "ITEM_SENDER": entry.item.sender or "<>",
            "ITEM_SUBJECT": entry.subject,
            "ITEM_STATUS": entry.item.status,
            "ITEM_RELEASE": release_command(cfg, entry.folder, entry.item.id),
            "ITEM_LINK": link,
        })
    values = {
        "RECIPIENT": recipient, "ITEM_COUNT": str(len(entries)), "HOSTNAME": cfg.network.Hostname,
        "DATE": notify.local_time(date_format, now), "TIME": notify.local_time(time_format, now),
        "PRODUCT": f"{PRODUCT} {__version__}", "CONSOLE_URL": base,
    }
    fields, body = template.render(values, {"ITEMS": items, "CONSOLE": templates.flag(bool(base))})
    subject = next((v for n, v in fields if n == "Subject" and v), "Quarantine digest")
    extra = [(n, v) for n, v in fields if n != "Subject" and v]
    return notify.compose_text(cfg.policy.NotifyFromAddress, [recipient], subject, body, now, extra)


def collect(cfg: Any, console_stores: Mapping[str, str], now: float) -> list[tuple[str, int, bytes]]:
    """(recipient, items held, digest) for each protected recipient something is held for, at most
    MAX_RECIPIENTS. Runs in an I/O thread. Raises templates.TemplateError for a bad template."""
    template = load(cfg)
    found = held(cfg, folders(cfg))
    if len(found) > MAX_RECIPIENTS:
        log.warning("quarantine digest: %d recipients, only the first %d written to", len(found), MAX_RECIPIENTS)
    digests = []
    for recipient in sorted(found)[:MAX_RECIPIENTS]:
        try:
            digests.append((recipient, len(found[recipient]), build(cfg, template, recipient, found[recipient],
                                                                    console_stores, now)))
        except ValueError as exc:
            log.error("no quarantine digest for <%s>: %s", recipient, exc)
    return digests


# --- the schedule --------------------------------------------------------------------------------


def read_last(path: str) -> float | None:
    """The time of the last digest saved in ``path``, or None."""
    try:
        with open(path, "rb") as f:
            last = json.loads(f.read(4096)).get("last")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as exc:
        log.error("quarantine digest state %s unreadable, starting the schedule now: %s", path, exc)
        return None
    return float(last) if isinstance(last, (int, float)) and not isinstance(last, bool) else None


class Digesting(Protocol):
    """What the digests need from the running gateway: the configuration in force, the loop, the
    spool and its I/O threads, whether it is stopping, and where a queued digest goes."""

    cfg: Config
    loop: EventLoop
    queue: Queue
    committer: Committer
    stopping: bool

    def message_scanned(self, env: Envelope) -> None:
        """``env`` is in QUE, ready for the Sender."""


class Digests:
    """The running gateway's digests: a timer on the loop, the work in an I/O thread."""

    def __init__(self, host: Digesting) -> None:
        self.host = host
        self.path = os.path.join(host.queue.root, STATE_NAME)
        self.last: float | None = None
        self.timer: Any = None
        self.running = False

    def start(self) -> None:
        self.last = read_last(self.path)
        if self.last is None:  # a first start: the first digest one interval from now
            self._save(time.time())
        self._tick()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _tick(self) -> None:
        hours = self.host.cfg.digest.Schedule
        if hours and self.last is not None and time.time() >= self.last + hours * 3600:
            self.send_now()
        self.timer = self.host.loop.call_later(CHECK_INTERVAL, self._tick)

    def send_now(self) -> None:
        """Build the digests in an I/O thread, then queue them (``.c_digest`` and the schedule)."""
        if self.running or self.host.stopping:
            return
        self.running = True
        now = time.time()
        stores = {os.path.abspath(path): name for name, path in named_stores(self.host.cfg).items() if path}
        self.host.committer.call(functools.partial(collect, self.host.cfg, stores, now),
                                 lambda built, error: self._built(built, error, now), alone=True)

    def _built(self, built: list[tuple[str, int, bytes]] | None, error: BaseException | None, now: float) -> None:
        self.running = False
        if error is not None:
            log.error("quarantine digest not sent: %s", error)
            return
        queued = 0
        for recipient, count, data in built or ():
            queued += self._queue(recipient, count, data)
        event("", "DIGEST, recipients=%d", queued)
        self._save(now)  # after the digests are queued: a crash between repeats them, never loses them

    def _queue(self, recipient: str, count: int, data: bytes) -> int:
        cfg = self.host.cfg
        env = Envelope(id=new_id(), sender=cfg.policy.NotifyFromAddress, recipients=[Recipient(addr=recipient)],
                       helo=cfg.network.Hostname, received_at=time.time(), size=len(data))
        try:
            self.host.queue.add_message(env, QUE, data=data)
        except OSError as exc:
            log.error("cannot queue the quarantine digest for <%s>: %s", recipient, exc)
            return 0
        event(env.id, "NOTIFICATION, kind=digest, to=%s, items=%d", [recipient], count)
        self.host.message_scanned(env)
        return 1

    def _save(self, when: float) -> None:
        self.last = when
        try:
            write_durably(self.path, json.dumps({"last": when}).encode())
        except OSError as exc:
            log.error("cannot save the quarantine digest time to %s: %s", self.path, exc)
