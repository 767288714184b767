"""Traffic history for the console's charts: counts per minute (24 hours) and per hour (30 days).

Owns: turning the cumulative statistics counters into per-minute and per-hour
counts of a few series (received, delivered, refused, spam, viruses), the ring
that keeps the last `MINUTES` minutes and `HOURS` hours, and its file
(``QueuePath/.console-history``, JSON, written whole with a durable write) so
that a restart does not erase it.

Must never: fail the gateway over its file (an unreadable one is logged and
started afresh), grow without bound, or count a counter's restart from zero as
a negative amount.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Mapping

from smtpgw.spool.durable import write_durably

log = logging.getLogger("smtpgw.console.history")

FILE = ".console-history"
MINUTES = 24 * 60
HOURS = 30 * 24
MAX_FILE_BYTES = 1024 * 1024
# series -> the statistics counters it sums (stats.NAMES and the scanner's per-status counters)
SERIES: dict[str, tuple[str, ...]] = {
    "received": ("mta_received_messages",),
    "delivered": ("mta_sent_messages",),
    "refused": ("mta_receivings_refused_total",),
    "spam": ("antispam_status_spam", "antispam_status_probable_spam", "antispam_status_blacklisted"),
    "viruses": ("antiviral_status_infected",),
}


def totals(counters: Mapping[str, int]) -> list[int]:
    return [sum(counters.get(name, 0) for name in names) for names in SERIES.values()]


class History:
    def __init__(self) -> None:
        self.minutes: dict[int, list[int]] = {}  # epoch minute -> count per series
        self.hours: dict[int, list[int]] = {}  # epoch hour -> count per series
        self.last = [0] * len(SERIES)  # the totals at the previous sample

    def continue_from(self, counters: Mapping[str, int]) -> None:
        """Counters restored at start (StatFilename) are not new traffic: growth counts from them."""
        self.last = totals(counters)

    def sample(self, counters: Mapping[str, int], now: float) -> None:
        """Add what the counters grew by since the previous sample to the current minute and hour."""
        current = totals(counters)
        grown = [max(0, new - old) for new, old in zip(current, self.last)]
        self.last = current
        minute = int(now // 60)
        for ring, key, keep in ((self.minutes, minute, MINUTES), (self.hours, minute // 60, HOURS)):
            bucket = ring.setdefault(key, [0] * len(SERIES))
            ring[key] = [a + b for a, b in zip(bucket, grown)]
            for old in [k for k in ring if k <= key - keep]:
                del ring[old]

    def series(self, by_hour: bool, now: float) -> dict[str, list[int]]:
        """Per series, the counts of each minute (or hour) of the window, oldest first."""
        ring, keep = (self.hours, HOURS) if by_hour else (self.minutes, MINUTES)
        end = int(now // 3600) if by_hour else int(now // 60)
        rows = [ring.get(key, [0] * len(SERIES)) for key in range(end - keep + 1, end + 1)]
        return {name: [row[index] for row in rows] for index, name in enumerate(SERIES)}

    def to_bytes(self) -> bytes:
        return json.dumps({"series": list(SERIES), "minutes": self.minutes, "hours": self.hours}).encode()

    @classmethod
    def load(cls, path: str) -> "History":
        history = cls()
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read(MAX_FILE_BYTES + 1))
            if data.get("series") != list(SERIES):
                raise ValueError("other series")
            for ring, name in ((history.minutes, "minutes"), (history.hours, "hours")):
                for key, counts in data[name].items():
                    if not (isinstance(counts, list) and len(counts) == len(SERIES)
                            and all(isinstance(c, int) and c >= 0 for c in counts)):
                        raise ValueError(f"bad {name} entry")
                    ring[int(key)] = counts
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("console history %s unreadable, started afresh: %s", path, exc)
            return cls()
        return history

    @staticmethod
    def path(queue_root: str) -> str:
        return os.path.join(queue_root, FILE)

    def save(self, path: str) -> None:
        write_durably(path, self.to_bytes())
