"""What the gateway's hand-offs observe for the console: latency histograms and top lists.

Owns: cumulative histograms (Prometheus buckets, sum, count) of how long a
message took from its end of data to being durable in the queue (the 250
reply), to being scanned and to its last recipient's final delivery state; and the top lists of
recipient domains received and of groups delivered (`TOP_KEEP` entries at most).

Must never: grow with the traffic (fixed buckets; a top list past `TOP_KEEP`
keeps its larger half), or block: an observation is a few additions on the
event loop.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smtpgw.spool.queue import Envelope

# seconds; the last bucket (+Inf) is implicit
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
           21600.0, 86400.0)
TOP_KEEP = 1000  # entries of a top list
HISTOGRAMS = {
    "commit": "seconds from the end of DATA to the message being durable in the queue (the 250 reply)",
    "scan": "seconds from the end of DATA to the scanned message queued for delivery",
    "delivery": "seconds from the end of DATA to the last recipient's final delivery state",
}


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """(``le`` label, observations at most that long) per bucket, +Inf last."""
        out, running = [], 0
        for bound, count in zip((*(f"{b:g}" for b in BUCKETS), "+Inf"), self.counts):
            running += count
            out.append((bound, running))
        return out


class Traffic:
    def __init__(self) -> None:
        self.histograms = {name: Histogram() for name in HISTOGRAMS}
        self.domains: Counter[str] = Counter()  # recipients received, by domain
        self.groups: Counter[str] = Counter()  # messages delivered, by group

    def received(self, env: "Envelope") -> None:
        """A message is durable in the queue (``Gateway.message_received``)."""
        self.histograms["commit"].observe(time.time() - env.received_at)
        for rcpt in env.recipients:
            _count(self.domains, rcpt.addr.rpartition("@")[2].lower() or "(none)")

    def scanned(self, env: "Envelope") -> None:
        """A scanned message goes to the sender (``Gateway.message_scanned``); a notification the
        scan made (a new ID whose ``srcid`` is the scanned one) is not a scan of its own."""
        if env.srcid is None or env.id.startswith(f"{env.srcid}-"):  # the message or a per-group copy
            self.histograms["scan"].observe(time.time() - env.received_at)

    def delivered(self, env: "Envelope") -> None:
        """Every recipient of a message has its final state (``Gateway.delivery_complete``)."""
        self.delivered_after(time.time() - env.received_at, env.group)

    def delivered_after(self, seconds: float, group: str | None) -> None:
        """The same, as the delivery process reports it: ``seconds`` from the end of DATA."""
        self.histograms["delivery"].observe(seconds)
        _count(self.groups, group or "policy")

    def copy(self) -> dict[str, Histogram]:
        return {name: Histogram(list(h.counts), h.total) for name, h in self.histograms.items()}

    def top(self, count: int = 10) -> dict[str, list[tuple[str, int]]]:
        return {"recipient domains (received)": self.domains.most_common(count),
                "groups (delivered)": self.groups.most_common(count)}


def _count(counter: Counter[str], key: str) -> None:
    counter[key[:255]] += 1
    if len(counter) > TOP_KEEP:
        for name, _ in counter.most_common()[TOP_KEEP // 2:]:
            del counter[name]
