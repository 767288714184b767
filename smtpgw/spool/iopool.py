"""The I/O threads: disk work that must not stall the event loop.

Owns: a small pool of threads for blocking file-system work (fsyncs, store writes, purges,
statistics files) and the hand-back of each result to the loop through its thread-safe
``call_soon_threadsafe``.

Must never: run a callback on a thread other than the loop's (results go back through
``call_soon_threadsafe``), swallow an error silently (a job with no one waiting is logged),
or know what the jobs do (the spool's group commit is `smtpgw.spool.queue.Committer`).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

__all__ = ["IOPool"]

log = logging.getLogger("smtpgw.spool.iopool")


class IOPool:
    """A few I/O threads; ``pool`` is the executor for callers that want a Future."""

    def __init__(self, call_soon_threadsafe: Callable[..., None], threads: int = 4,
                 name: str = "commit") -> None:
        self.call_soon_threadsafe = call_soon_threadsafe
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix=name)

    def call(self, job: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        """Run ``job`` in an I/O thread; ``done(result, error)`` runs on the loop afterwards."""
        future = self.pool.submit(job)
        future.add_done_callback(
            lambda f: self.call_soon_threadsafe(done, None if f.exception() else f.result(), f.exception()))

    def run(self, job: Callable[[], None]) -> None:
        """Disk work that needs no answer (an archive copy)."""
        self.pool.submit(self._logged, job)

    @staticmethod
    def _logged(job: Callable[[], None]) -> None:
        try:
            job()
        except Exception:
            log.exception("background disk job failed")

    def close(self) -> None:
        """Wait for the jobs already submitted, then stop the threads."""
        self.pool.shutdown(wait=True)
