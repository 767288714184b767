"""The main process's memory: the ``.c_memory`` report.

Owns: a report of the main process's memory (RSS, open file descriptors, the C heap's bytes in
use and free, live Python objects after a full collection, the objects by type, and, when the
interpreter traces allocations, tracemalloc's total and its largest sources) together with the
length of every registry the gateway keeps per message, session or destination, and the RSS of
its other processes (scanner workers, incoming processes, the delivery process); written as
JSON to ``<ControlPath>/memory`` (temp, fsync, rename) and summed up in one log line. (Giving
freed heap back, once a minute from the gateway's loop, is ``smtpgw.release_heap``: glibc keeps
the pages of freed blocks resident, so a process that frees as much as it allocates still grows,
by about 150 bytes a message.)

Must never: keep what it measured (the previous tracemalloc snapshot is the only thing held,
to report what grew since), or change any state of the gateway it reports on; fail where
there is no glibc (the heap figures are then left out).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import logging
import os
import time
import tracemalloc
from collections import Counter
from typing import TYPE_CHECKING, Any, Protocol

from smtpgw.app.delivery import Delivery
from smtpgw.app.incoming import Incoming
from smtpgw.config import Config
from smtpgw.net.dns import Resolver
from smtpgw.net.loop import EventLoop
from smtpgw.receive.quota import Quota
from smtpgw.receive.receiver import Sessions
from smtpgw.scan.scanner import Scanner
from smtpgw.spool.durable import write_durably
from smtpgw.spool.queue import Committer
from smtpgw.stats import Stats

if TYPE_CHECKING:
    from smtpgw.deliver.sender import Sender

log = logging.getLogger("smtpgw.app.memory")

REPORT_NAME = "memory"  # in ControlPath
TOP_TYPES = 30
TOP_SOURCES = 25


_previous: tracemalloc.Snapshot | None = None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):  # not glibc, or a glibc before 2.33
        return None


_LIBC = _libc()


def heap() -> dict[str, int]:
    """The C heap: bytes in use and bytes free but still held (glibc's mallinfo2), or {}."""
    if _LIBC is None:
        return {}
    info = _LIBC.mallinfo2()
    return {"heap_in_use": info.uordblks + info.hblkhd, "heap_free": info.fordblks}


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


class Reported(Protocol):
    """The running gateway's registries this report measures (``app/gateway.Gateway``)."""

    cfg: Config
    loop: EventLoop
    inbound: Sessions
    scanner: Scanner
    sender: Sender | Delivery
    resolver: Resolver
    stats: Stats
    quota: Quota
    committer: Committer
    incoming: Incoming | None


def registries(gw: Reported) -> dict[str, int]:
    """The length of every collection the gateway keeps per message, session, destination or timer."""
    scanner, loop = gw.scanner, gw.loop
    return {
        "sessions": len(gw.inbound.open),
        "sessions_per_ip": len(gw.inbound.per_ip),
        "scanner_waiting": len(scanner.waiting),
        "scanner_envelopes": len(scanner.envelopes),
        "scanner_inflight": len(scanner.inflight),
        "scanner_scanning": len(scanner.scanning),
        "scanner_held_mail": len(scanner.flow_first) + len(scanner.flow_waiters),
        "scanner_retries": len(scanner.retries),
        **gw.sender.registries(),  # the delivery process's as it last reported them (DeliveryProcess)
        "dns_cache": gw.resolver.cache_len(),
        "stats_counters": len(gw.stats.counters),
        "quota_recipients": len(gw.quota.recipients),  # at most MaximalProtectedRecipients
        "loop_timers": loop.timer_count(),
        "loop_readers": len(loop._readers),
        "loop_writers": len(loop._writers),
        "workers": len(scanner.pool.workers),
        "queue_spare_files": gw.committer.spare_count(),  # open descriptors, made ahead of need
    }


def processes(gw: Reported) -> list[dict[str, Any]]:
    """The gateway's other processes: kind, pid and resident size (0 for one that just ended)."""
    pids = [("worker", worker.proc.pid) for worker in gw.scanner.pool.workers]
    if gw.incoming is not None:
        pids += [("incoming", pid) for pid in gw.incoming.pids()]
    if isinstance(gw.sender, Delivery):
        pids += [("delivery", pid) for pid in gw.sender.pids()]
    return [{"kind": kind, "pid": pid, "rss_kib": proc_status(pid).get("VmRSS", 0)} for kind, pid in pids]


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


def report(gw: Reported) -> dict[str, Any]:
    objects, by_type = _gc_counts()
    status = proc_status()
    return {
        "time": time.time(),
        "pid": os.getpid(),
        "rss_kib": status.get("VmRSS", 0),
        "rss_peak_kib": status.get("VmHWM", 0),
        "open_fds": open_fds(),
        **heap(),
        "gc_objects": objects,
        "gc_by_type": by_type,
        "registries": registries(gw),
        "processes": processes(gw),
        "tracemalloc": _traced(),
    }


def dump(gw: Reported) -> None:
    """``.c_memory``: the report to ``<ControlPath>/memory`` and a summary line in the log."""
    data = report(gw)
    traced = data["tracemalloc"]
    others = data["processes"]
    log.info("memory: rss=%dKiB fds=%d objects=%d traced=%s others=%d/%dKiB registries=%s", data["rss_kib"],
             data["open_fds"], data["gc_objects"], traced["traced_bytes"] if traced else "off", len(others),
             sum(p["rss_kib"] for p in others),
             ",".join(f"{k}={v}" for k, v in data["registries"].items()))
    path = os.path.join(gw.cfg.path.ControlPath, REPORT_NAME)
    try:
        write_durably(path, json.dumps(data, indent=1).encode())
    except OSError as exc:
        log.error("cannot write the memory report %s: %s", path, exc)
