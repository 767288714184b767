"""The ``.c_memory`` control command: what the gateway process holds, for an admin or a test.

Owns: a report of the main process's memory (RSS, open file descriptors, live Python
objects after a full collection, the objects by type, and, when the interpreter traces
allocations, tracemalloc's total and its largest sources) together with the length of every
registry the gateway keeps per message, session or destination; written as JSON to
``<ControlPath>/memory`` (temp, fsync, rename) and summed up in one log line.

Must never: keep what it measured (the previous tracemalloc snapshot is the only thing held,
to report what grew since), or change any state of the gateway it reports on.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
import tracemalloc
from collections import Counter
from typing import TYPE_CHECKING, Any

from smtpgw.queue import write_durably

if TYPE_CHECKING:
    from smtpgw.gateway import Gateway

log = logging.getLogger("smtpgw.memory")

REPORT_NAME = "memory"  # in ControlPath
TOP_TYPES = 30
TOP_SOURCES = 25

_previous: tracemalloc.Snapshot | None = None


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM and the rest of /proc/PID/status in KiB (Linux)."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                fields = rest.split()
                if name.startswith("Vm") and fields and fields[0].isdigit():
                    values[name] = int(fields[0])
    except OSError:
        pass
    return values


def open_fds(pid: int | str = "self") -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def registries(gw: "Gateway") -> dict[str, int]:
    """The length of every collection the gateway keeps per message, session, destination or timer."""
    scanner, sender, loop = gw.scanner, gw.sender, gw.loop
    return {
        "sessions": len(gw.sessions),
        "sessions_per_ip": len(gw.per_ip),
        "scanner_waiting": len(scanner.waiting),
        "scanner_envelopes": len(scanner.envelopes),
        "scanner_inflight": len(scanner.inflight),
        "scanner_retries": len(scanner.retries),
        "sender_schedule": len(sender.schedule),
        "sender_envelopes": len(sender.envelopes),
        "sender_inflight": len(sender.inflight),
        "sender_destinations": len(sender.dests),
        "sender_connections": sender.total_connections,
        "sender_unreachable": len(sender.unreachable),
        "dns_cache": gw.resolver.cache_len(),
        "stats_counters": len(gw.stats.counters),
        "loop_timers": loop.timer_count(),
        "loop_readers": len(loop._readers),
        "loop_writers": len(loop._writers),
        "workers": len(scanner.pool.workers),
    }


def _gc_counts() -> tuple[int, list[tuple[str, int]]]:
    gc.collect()
    objects = gc.get_objects()
    by_type = Counter(type(o).__name__ for o in objects)
    total = len(objects)
    del objects
    return total, by_type.most_common(TOP_TYPES)


def _traced() -> dict[str, Any] | None:
    """tracemalloc's figures (when tracing, e.g. PYTHONTRACEMALLOC=1) and what grew since the last report."""
    global _previous
    if not tracemalloc.is_tracing():
        return None
    current, peak = tracemalloc.get_traced_memory()
    snapshot = tracemalloc.take_snapshot().filter_traces(
        (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")))
    top = [f"{stat.traceback[0].filename}:{stat.traceback[0].lineno} size={stat.size} count={stat.count}"
           for stat in snapshot.statistics("lineno")[:TOP_SOURCES]]
    grown: list[str] = []
    if _previous is not None:
        grown = [f"{d.traceback[0].filename}:{d.traceback[0].lineno} size_diff={d.size_diff} count_diff={d.count_diff}"
                 for d in snapshot.compare_to(_previous, "lineno")[:TOP_SOURCES]]
    _previous = snapshot
    return {"traced_bytes": current, "traced_peak_bytes": peak, "top": top, "grown_since_last": grown}


def report(gw: "Gateway") -> dict[str, Any]:
    objects, by_type = _gc_counts()
    status = proc_status()
    return {
        "time": time.time(),
        "pid": os.getpid(),
        "rss_kib": status.get("VmRSS", 0),
        "rss_peak_kib": status.get("VmHWM", 0),
        "open_fds": open_fds(),
        "gc_objects": objects,
        "gc_by_type": by_type,
        "registries": registries(gw),
        "tracemalloc": _traced(),
    }


def dump(gw: "Gateway") -> None:
    """``.c_memory``: the report to ``<ControlPath>/memory`` and a summary line in the log."""
    data = report(gw)
    traced = data["tracemalloc"]
    log.info("memory: rss=%dKiB fds=%d objects=%d traced=%s registries=%s", data["rss_kib"], data["open_fds"],
             data["gc_objects"], traced["traced_bytes"] if traced else "off",
             ",".join(f"{k}={v}" for k, v in data["registries"].items()))
    path = os.path.join(gw.cfg.path.ControlPath, REPORT_NAME)
    try:
        write_durably(path, json.dumps(data, indent=1).encode())
    except OSError as exc:
        log.error("cannot write the memory report %s: %s", path, exc)
