"""Statistics counters, their dump, and the daily history (kmg-spec §7.2).

Owns: the cumulative counters named as in the reference (``mta_received_messages``
and the rest) plus gauges; writing them as ``name=value`` lines to ``StatFilename``
on the ``.c_stats`` control command and every ``StatSaveInterval`` seconds; reading
them back at start, so that they survive restarts (``time_initialized`` is when they
began); and the daily history, one line per day (HISTORY_FIELDS) in
``QueuePath/stats.history`` for HISTORY_DAYS days, which ``smtpgw.py stats --days N``
prints.

A day's line holds what was counted from its first save to its last, so a count made
just before midnight may be given to the next day (at most StatSaveInterval's worth);
a crash loses what was counted since the last save.

Must never: block the event loop for long (the writes are small durable writes, made
by the caller in an I/O thread), or restore a gauge (``*_current``) from an earlier run.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter
from datetime import date, datetime, timezone

from smtpgw.log import TEXT, escape
from smtpgw.spool.durable import write_durably

# Counters that exist from the start (shown as 0), in the reference's order.
NAMES = (
    "mta_received_messages", "mta_received_bytes", "mta_received_recipients",
    "mta_sent_messages", "mta_sent_bytes", "mta_sent_recipients",
    "mta_stored_messages_current",
    "mta_incoming_connections_total", "mta_incoming_connections_current",
    "mta_incoming_connections_maximum", "mta_incoming_connections_errors",
    "mta_receivings_refused_total", "mta_receivings_refused_for_message_size_limit",
    "mta_receivings_refused_for_session_size_limit", "mta_receivings_refused_for_hops_limit",
    "mta_receivings_refused_for_messages_per_session_limit",
    "mta_receivings_refused_for_recipients_limit", "mta_receivings_refused_for_relay",
    "mta_receivings_refused_for_bare_newline", "mta_receivings_refused_for_line_length",
    "mta_receivings_refused_for_nul_character",
    "mta_sendings_failed_total", "mta_sendings_failed_for_message_size_limit",
    "mta_sendings_failed_for_8bitmime", "mta_sendings_deferred_total",
    "mta_outgoing_connections_total", "mta_outgoing_connections_current",
    "mta_outgoing_connections_errors",
    "mta_malformed_messages", "mta_dsn_generated", "mta_blocked_messages",
    "antiviral_checking_sessions_current", "antiviral_checked_messages",
    "antiviral_scanner_unavailable",
)

# Refusals of a message for its form (RFC 5321 §2.3.8 bare CR or LF, §4.5.3.1.6 a line over 1000
# octets, RFC 2045 §2.8 NUL): kmg-spec §7.2 counts them as ``mta_malformed_messages`` too
# ("malformed incoming messages").
MALFORMED = frozenset({"bare_newline", "line_length", "nul_character"})


HISTORY_NAME = "stats.history"
HISTORY_DAYS = 366
MAX_STAT_FILE = 1 << 20  # bytes of StatFilename or history read back
# The history's fields: (name, the counters it sums); spam verdicts follow as spam_<verdict>.
HISTORY_FIELDS = (
    ("received", ("mta_received_messages",)),
    ("delivered", ("mta_sent_messages",)),
    ("viruses", ("antiviral_status_infected", "antiviral_status_disinfected", "antiviral_status_suspicious")),
    ("blocked", ("mta_blocked_messages",)),
    ("refused", ("mta_receivings_refused_total",)),
    ("bytes", ("mta_received_bytes",)),
)
SPAM_PREFIX = "antispam_status_"
NOT_SPAM = ("not_detected", "clean")


def history_path(queue_path: str) -> str:
    return os.path.join(queue_path, HISTORY_NAME)


def _pairs(text: str) -> dict[str, int]:
    """``name=value`` items (lines or words) with integer values; anything else is skipped."""
    values: dict[str, int] = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        if sep and value.lstrip("-").isdigit():
            values[name] = int(value)
    return values


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_STAT_FILE).decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def read_history(path: str) -> list[str]:
    """The history's lines (``YYYY-MM-DD name=value ...``), oldest first; unreadable lines skipped."""
    return [line for line in _read(path).splitlines() if _day_of(line)]


def _day_of(line: str) -> str:
    day = line[:10]
    try:
        date.fromisoformat(day)
    except ValueError:
        return ""
    return day


class Stats:
    def __init__(self) -> None:
        self.started = time.time()
        self.counters: Counter[str] = Counter({name: 0 for name in NAMES})
        self.day = date.today().isoformat()
        self.day_base: Counter[str] = Counter()  # the counters when the day's counting began
        self.history: list[str] = []  # earlier days' lines

    def restore(self, stat_file: str, history_file: str) -> None:
        """Start from the counters saved by the last run, and from today's line of the history.
        Raises OSError when a file exists but cannot be read."""
        saved = _pairs(_read(stat_file))
        for name, value in saved.items():
            if name.startswith("time_") or name.endswith("_current"):
                continue
            self.counters[name] = value
        if saved.get("time_initialized", 0) > 0:
            self.started = float(saved["time_initialized"])
        lines = read_history(history_file)[-HISTORY_DAYS:]
        today = lines[-1] if lines and _day_of(lines[-1]) == self.day else None
        self.history = lines[:-1] if today else lines
        self.day_base = Counter(self.counters)
        if today:  # today's counting goes on from its saved line
            for field, value in self._fields_to_counters(_pairs(today[10:])).items():
                self.day_base[field] -= value

    def _fields_to_counters(self, fields: dict[str, int]) -> dict[str, int]:
        """One counter per history field that stands for it (the first it sums), for the baseline."""
        counters = {names[0]: fields.get(field, 0) for field, names in HISTORY_FIELDS}
        counters.update({SPAM_PREFIX + name[5:]: value for name, value in fields.items() if name.startswith("spam_")})
        return counters

    def day_line(self) -> str:
        """Today's history line: what was counted since the day began."""
        delta = Counter({name: value - self.day_base.get(name, 0) for name, value in self.counters.items()})
        fields = [f"{field}={sum(delta[n] for n in names)}" for field, names in HISTORY_FIELDS]
        fields += [f"spam_{name[len(SPAM_PREFIX):]}={delta[name]}" for name in sorted(delta)
                   if name.startswith(SPAM_PREFIX) and name[len(SPAM_PREFIX):] not in NOT_SPAM]
        return f"{self.day} " + " ".join(fields)

    def snapshot(self) -> tuple[bytes, bytes]:
        """(StatFilename's text, the history's text) to save now; a new day closes the last one."""
        lines = [*self.history, self.day_line()]
        today = date.today().isoformat()
        if today != self.day:
            self.history = lines[-(HISTORY_DAYS - 1):]
            self.day, self.day_base = today, Counter(self.counters)
            lines = [*self.history, self.day_line()]
        return self.render().encode(), ("\n".join(lines[-HISTORY_DAYS:]) + "\n").encode()

    def inc(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def set(self, name: str, value: int) -> None:
        self.counters[name] = value

    def refuse(self, reason: str) -> None:
        """A refused receiving: the total and the per-reason counter."""
        self.counters["mta_receivings_refused_total"] += 1
        self.counters[f"mta_receivings_refused_for_{reason}"] += 1
        if reason in MALFORMED:
            self.counters["mta_malformed_messages"] += 1

    def connection_opened(self) -> None:
        c = self.counters
        c["mta_incoming_connections_total"] += 1
        c["mta_incoming_connections_current"] += 1
        c["mta_incoming_connections_maximum"] = max(
            c["mta_incoming_connections_maximum"], c["mta_incoming_connections_current"]
        )

    def render(self) -> str:
        lines = [
            f"time_initialized={int(self.started)}",
            "time_initialized_iso=" + datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds"),
            f"time_processing={int(time.time() - self.started)}",
        ]
        lines += [f"{name}={value}" for name, value in sorted(self.counters.items())]
        return "\n".join(lines) + "\n"

    def dump(self, path: str) -> None:
        write_durably(path, self.render().encode())


def save(stat_file: str, history_file: str, texts: tuple[bytes, bytes]) -> None:
    """Write a `Stats.snapshot` durably (temp, fsync, rename, fsync of the folder): the history
    first, so that a StatFilename showing a count means the history holds it too."""
    write_durably(history_file, texts[1])
    write_durably(stat_file, texts[0])


def format_history(lines: list[str], days: int) -> str:
    """The last ``days`` days of the history, as stored (one ``YYYY-MM-DD name=value ...`` line each)."""
    return "".join(line + "\n" for line in lines[-days:]) if days > 0 else ""


def write_av_statistics(target: str, rows: list[list[object]]) -> None:
    """``AVStatistics`` (kmg-spec §7.3): one tab-separated line per scanned object (a row of
    fields, each escaped by ``log.escape``: a tab, a line end or another control byte in a
    sender or Message-ID cannot add a column or a record), appended to a file or sent to a TCP
    statistics server; when the target is unavailable the records are dropped silently, as the
    reference does (a debug line says so)."""
    data = "".join("\t".join(escape(field, TEXT) for field in row) + "\n" for row in rows).encode("utf-8", "replace")
    host, sep, port = target.rpartition(":")
    try:
        if sep and port.isdigit() and not target.startswith("/"):
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2) as conn:
                conn.sendall(data)
        else:
            fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
    except OSError as exc:
        logging.getLogger("smtpgw.stats").debug("AVStatistics record dropped: %s", exc)
