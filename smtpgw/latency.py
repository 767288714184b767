"""Latency histograms of the pipeline, for ``/metrics``.

Owns: cumulative histograms (Prometheus buckets, sum, count) of how long a
message took from its end of data to being durable in the queue (the 250
reply) and to its last recipient's final delivery state.

Must never: grow with the traffic (a fixed set of buckets per histogram), or
block: an observation is a few additions on the event loop.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

# seconds; the last bucket (+Inf) is implicit
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
           21600.0, 86400.0)
HISTOGRAMS = {
    "commit": "seconds from the end of DATA to the message being durable in the queue (the 250 reply)",
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


class Latency:
    def __init__(self) -> None:
        self.histograms = {name: Histogram() for name in HISTOGRAMS}

    def since(self, name: str, start: float) -> None:
        """One observation for ``name``: now minus ``start`` (a ``time.time()`` value)."""
        self.histograms[name].observe(time.time() - start)

    def copy(self) -> dict[str, Histogram]:
        return {name: Histogram(list(h.counts), h.total) for name, h in self.histograms.items()}
