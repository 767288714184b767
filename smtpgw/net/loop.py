"""The event loop: one ``selectors`` reactor that owns every socket and timer.

Owns: readiness callbacks for file descriptors, one-shot timers, a thread-safe
wake-up (``call_soon_threadsafe``) used by worker pools to hand results back.

Must never: block (no ``time.sleep``, no blocking DNS, no CPU-heavy work in a
callback), or let one failing callback take the loop down: an exception in a
callback is logged and the loop goes on.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from typing import Any, Callable

log = logging.getLogger("smtpgw.net.loop")

Callback = Callable[..., Any]


# A cancelled timer stays in the heap until it is due; once they are more than this share of the
# heap (and at least MIN_CANCELLED of them), the heap is rebuilt without them. Session and job
# deadlines are minutes long and re-armed at every command: kept, they would pile up by the
# hundred thousand under load.
CANCELLED_SHARE = 0.5
MIN_CANCELLED = 256


def _nothing(*_args: Any) -> None:
    return None


class Timer:
    """A scheduled call; ``cancel()`` makes it a no-op and lets go of what the call would use."""

    __slots__ = ("when", "callback", "args", "cancelled", "loop")

    def __init__(self, when: float, callback: Callback, args: tuple[Any, ...], loop: "EventLoop | None" = None) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False
        self.loop = loop

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        # the callback (often a bound method of a whole session) is not kept alive by a dead timer
        self.callback, self.args = _nothing, ()
        loop, self.loop = self.loop, None
        if loop is not None:
            loop._timer_cancelled()


class EventLoop:
    """A small reactor in the style of asyncio's selector loop, without coroutines."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._cancelled = 0  # cancelled timers still in the heap
        self._seq = itertools.count()
        self._ready: deque[tuple[Callback, tuple[Any, ...]]] = deque()
        self._threadsafe: deque[tuple[Callback, tuple[Any, ...]]] = deque()
        self._lock = threading.Lock()
        self._running = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.add_reader(self._wake_r, self._drain_wakeups)

    # -- file descriptors -------------------------------------------------
    @staticmethod
    def _fd(fileobj: Any) -> int:
        return fileobj if isinstance(fileobj, int) else fileobj.fileno()

    def _update(self, fd: int) -> None:
        events = (selectors.EVENT_READ if fd in self._readers else 0) | (
            selectors.EVENT_WRITE if fd in self._writers else 0
        )
        try:
            key = self._selector.get_key(fd)
        except KeyError:
            key = None
        if key is None:
            if events:
                self._selector.register(fd, events)
        elif events:
            if key.events != events:
                self._selector.modify(fd, events)
        else:
            self._selector.unregister(fd)

    def add_reader(self, fileobj: Any, callback: Callback) -> None:
        """Call ``callback()`` whenever ``fileobj`` is readable."""
        fd = self._fd(fileobj)
        known = fd in self._readers
        self._readers[fd] = callback
        if not known:  # a reader already watched: the selector has it as it should
            self._update(fd)

    def remove_reader(self, fileobj: Any) -> None:
        fd = self._fd(fileobj)
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fileobj: Any, callback: Callback) -> None:
        """Call ``callback()`` whenever ``fileobj`` is writable."""
        fd = self._fd(fileobj)
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fileobj: Any) -> None:
        fd = self._fd(fileobj)
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def forget(self, fileobj: Any) -> None:
        """Drop every callback for ``fileobj`` (call before closing it)."""
        fd = self._fd(fileobj)
        if fd < 0:
            return
        self._readers.pop(fd, None)
        self._writers.pop(fd, None)
        self._update(fd)

    # -- timers and deferred calls ----------------------------------------
    @staticmethod
    def time() -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callback, *args: Any) -> Timer:
        timer = Timer(self.time() + max(0.0, delay), callback, args, self)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def _timer_cancelled(self) -> None:
        self._cancelled += 1
        if self._cancelled >= MIN_CANCELLED and self._cancelled > CANCELLED_SHARE * len(self._timers):
            self._timers = [entry for entry in self._timers if not entry[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled = 0

    def timer_count(self) -> int:
        """Timers still due to run (cancelled ones left out)."""
        return len(self._timers) - self._cancelled

    def call_soon(self, callback: Callback, *args: Any) -> None:
        self._ready.append((callback, args))

    def call_soon_threadsafe(self, callback: Callback, *args: Any) -> None:
        """Schedule ``callback`` from another thread and wake the loop.

        Only the first call after the loop took the pending calls writes a wake-up byte: until
        the loop takes them (after reading that byte), the calls that follow are taken with it."""
        with self._lock:
            wake = not self._threadsafe
            self._threadsafe.append((callback, args))
        if wake:
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, OSError):
                pass  # the pipe is full: the loop is already due to wake up

    def _drain_wakeups(self) -> None:
        try:
            self._wake_r.recv(4096)  # more than that waiting: the socket stays readable, read next time
        except (BlockingIOError, InterruptedError):
            pass
        with self._lock:
            pending, self._threadsafe = self._threadsafe, deque()
        self._ready.extend(pending)

    # -- running ------------------------------------------------------------
    def _run(self, callback: Callback, args: tuple[Any, ...]) -> None:
        try:
            callback(*args)
        except Exception:  # a bug in one callback must not stop the gateway
            log.exception("unhandled error in %r", callback)

    def run_once(self, max_wait: float | None = None) -> None:
        timeout: float | None
        if self._ready:
            timeout = 0.0
        elif self._timers:
            timeout = max(0.0, self._timers[0][0] - self.time())
        else:
            timeout = None
        if max_wait is not None:
            timeout = max_wait if timeout is None else min(timeout, max_wait)
        for key, events in self._selector.select(timeout):
            fd = key.fd
            if events & selectors.EVENT_READ and fd in self._readers:
                self._run(self._readers[fd], ())
            if events & selectors.EVENT_WRITE and fd in self._writers:
                self._run(self._writers[fd], ())
        now = self.time()
        while self._timers and self._timers[0][0] <= now:
            timer = heapq.heappop(self._timers)[2]
            if timer.cancelled:
                self._cancelled -= 1
            else:
                timer.loop = None  # a cancel() from inside its own callback changes no count
                self._ready.append((timer.callback, timer.args))
        for _ in range(len(self._ready)):
            if not self._ready:
                break  # a callback ran the loop itself (run_until at shutdown) and took the rest
            callback, args = self._ready.popleft()
            self._run(callback, args)

    def run_forever(self) -> None:
        self._running = True
        while self._running:
            self.run_once()

    def run_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Run until ``predicate()`` is true or ``timeout`` seconds pass."""
        deadline = self.time() + timeout
        while not predicate():
            left = deadline - self.time()
            if left <= 0:
                return False
            self.run_once(max_wait=min(left, 0.05))
        return True

    def stop(self) -> None:
        self._running = False
        self.call_soon_threadsafe(lambda: None)

    def close(self) -> None:
        self.forget(self._wake_r)
        self._wake_r.close()
        self._wake_w.close()
        self._selector.close()

