"""Statistics counters and their dump (kmg-spec §7.2).

Owns: the cumulative counters named as in the reference (``mta_received_messages``
and the rest) plus gauges, and writing them as ``name=value`` lines to
``StatFilename`` on the ``.c_stats`` control command.

Must never: block the event loop for long (the dump is one small durable write).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter
from datetime import datetime, timezone

from smtpgw.log import TEXT, escape
from smtpgw.queue import write_durably

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
    "mta_malformed_messages", "mta_dsn_generated",
    "antiviral_checking_sessions_current", "antiviral_checked_messages",
    "antiviral_scanner_unavailable",
)

# Refusals of a message for its form (RFC 5321 §2.3.8 bare CR or LF, §4.5.3.1.6 a line over 1000
# octets, RFC 2045 §2.8 NUL): kmg-spec §7.2 counts them as ``mta_malformed_messages`` too
# ("malformed incoming messages").
MALFORMED = frozenset({"bare_newline", "line_length", "nul_character"})


class Stats:
    def __init__(self) -> None:
        self.started = time.time()
        self.counters: Counter[str] = Counter({name: 0 for name in NAMES})

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
