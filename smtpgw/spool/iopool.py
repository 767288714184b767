"""The I/O threads: disk work that must not stall the event loop.

Owns: a small pool of threads for blocking file-system work (fsyncs, store writes, purges,
statistics files), the job queue they take their work from, and the hand-back of the results
to the loop through its thread-safe ``call_soon_threadsafe``.

Each hand-off between the loop and a thread costs a wake-up (a futex, a context switch) and the
GIL passed across; the queue is built to need few of them under load. A thread that wakes takes
the jobs waiting, not one: up to BATCH of them, or its share of them when more wait (their number
over the threads'), and wakes another thread for the rest, so that a backlog is spread over the
threads (fsyncs in threads of their own overlap; one thread's run one after the other). A job
submitted while a woken thread has not yet come for its jobs wakes no other (that one takes it
too); a job submitted while every thread is busy wakes none (the first to finish takes it). The
results of the jobs a thread took go back to the loop in one ``call_soon_threadsafe``. A job may
name a finishing step (``then``: a group fsync of a folder) that is run once after all the jobs of
the batch that name it, before their results go back. A job that may take long (``alone``: it
asks another program, reads a whole database) is taken in a batch of its own, so that no other
job waits behind it.

Must never: run a callback on a thread other than the loop's (results go back through
``call_soon_threadsafe``), swallow an error silently (a job's error reaches its callback; a job
with no one waiting is logged), hand a result back before the job's finishing step is done, stop
before the jobs submitted are done (``close``), or know what the jobs do (the spool's group
commit is `smtpgw.spool.queue.Committer`).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Callable

__all__ = ["IOPool", "Done"]

log = logging.getLogger("smtpgw.spool.iopool")

# The jobs a thread takes at once when no more than this many times the threads wait: several
# share a commit's folder fsyncs and one hand-back; a larger backlog is shared out among the threads.
BATCH = 4

Done = Callable[[Any, "BaseException | None"], None]
# a job: what to run, the callback for its result (None: logged if it fails), its finishing step,
# whether it is taken alone
Job = tuple[Callable[[], Any], "Done | None", "Callable[[], None] | None", bool]
# a result on its way back: the callback, the job's result, its error
Result = tuple[Done, Any, "BaseException | None"]


class IOPool:
    """Up to ``threads`` I/O threads (started when first needed) taking jobs in batches."""

    def __init__(self, call_soon_threadsafe: Callable[..., None], threads: int = 4,
                 name: str = "commit") -> None:
        self.call_soon_threadsafe = call_soon_threadsafe
        self.max_threads = max(1, threads)
        self.name = name
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition(threading.Lock())
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for jobs
        self._woken = 0  # threads woken (or started) that have not yet come for the jobs
        self._closed = False

    # -- submitting (the loop, or any thread) ---------------------------------------------
    def call(self, job: Callable[[], Any], done: Done, then: Callable[[], None] | None = None,
             alone: bool = False) -> None:
        """Run ``job`` in an I/O thread; ``done(result, error)`` runs on the loop afterwards.

        ``then`` (a finishing step, the same callable for the jobs that share it) runs once after
        the jobs of the batch that name it and before their callbacks; a job whose finishing step
        fails gets that error. ``alone``: a job that may take long, taken in a batch of its own."""
        self._put((job, done, then, alone))

    def run(self, job: Callable[[], None]) -> None:
        """Disk work that needs no answer (an archive copy); an error is logged."""
        self._put((job, None, None, False))

    def _put(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("the I/O threads are closed")
            self._jobs.append(job)
            if not self._woken:  # else a thread is on its way: it takes this job with the others
                self._wake()

    def _wake(self) -> None:
        """(holding the lock) A thread for the jobs waiting: an idle one, else a new one if there
        is room; else every thread is busy, and the first one done takes them."""
        if self._idle:
            self._woken += 1
            self._cv.notify()
        elif len(self._threads) < self.max_threads:
            self._woken += 1
            self._start_thread()

    def _start_thread(self) -> None:
        thread = threading.Thread(target=self._work, name=f"{self.name}_{len(self._threads)}", daemon=True)
        self._threads.append(thread)
        thread.start()

    # -- the threads ---------------------------------------------------------------------------
    def _take(self, woken: bool) -> list[Job]:
        """The jobs waiting, BATCH or this thread's share of them, up to the first to be taken alone
        (waiting for one if there is none); [] once closed and all done."""
        with self._cv:
            if woken:
                self._woken -= 1
            while not self._jobs:
                if self._closed:
                    return []
                self._idle += 1
                self._cv.wait()
                self._idle -= 1
                self._woken = max(0, self._woken - 1)  # a notify ended the wait (close: all of them)
            waiting = self._jobs
            share = max(BATCH, -(-len(waiting) // self.max_threads))
            jobs = [waiting.popleft()]
            while waiting and len(jobs) < share and not jobs[0][3] and not waiting[0][3]:
                jobs.append(waiting.popleft())
            if waiting and not self._woken:  # the jobs left need a thread of their own
                self._wake()
            return jobs

    def _work(self) -> None:
        batch = self._take(woken=True)
        while batch:
            results = self._run_batch(batch)
            if results:
                try:
                    self.call_soon_threadsafe(self._hand_back, results)
                except Exception:  # the loop is gone (closed at exit): no one waits for them
                    log.exception("results of %d disk jobs not handed back", len(results))
            batch = self._take(woken=False)

    def _run_batch(self, batch: list[Job]) -> list[Result]:
        """Run the jobs, then their finishing steps once each; the results with a callback."""
        results: list[Result] = []
        steps: dict[Callable[[], None], list[int]] = {}  # a finishing step → its jobs' results
        for job, done, then, _alone in batch:
            try:
                result, error = job(), None
            except BaseException as exc:  # handed to the callback, as a Future would
                result, error = None, exc
            if done is None:
                if error is not None:
                    log.error("background disk job failed", exc_info=error)
                continue
            if then is not None and error is None:
                steps.setdefault(then, []).append(len(results))
            results.append((done, result, error))
        for step, indexes in steps.items():
            try:
                step()
            except BaseException as exc:
                for index in indexes:
                    results[index] = (results[index][0], None, exc)
        return results

    @staticmethod
    def _logged(job: Callable[[], None]) -> None:
        """Run ``job`` (in an I/O thread), an error logged instead of raised."""
        try:
            job()
        except Exception:
            log.exception("background disk job failed")

    @staticmethod
    def _hand_back(results: list[Result]) -> None:
        """(the loop) Each callback of a batch, one failing callback stopping none of the others."""
        for done, result, error in results:
            try:
                done(result, error)
            except Exception:
                log.exception("unhandled error in %r", done)

    def close(self) -> None:
        """Wait for the jobs already submitted, then stop the threads (a job submitted after this
        raises RuntimeError)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        joined = 0
        while True:
            with self._cv:  # a thread may start another for the jobs it left (``_take``)
                threads = self._threads[joined:]
            if not threads:
                return
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()
            joined += len(threads)
