"""The event loop: a cancelled timer lets go of its call, and cancelled timers do not pile up; calls
from other threads all run, with one wake-up for those waiting together; a reader given again."""

from __future__ import annotations

import gc
import socket
import threading
import weakref

from smtpgw.net.loop import MIN_CANCELLED, EventLoop


class Holder:
    """Stands for a session: a big object a timer's bound method keeps alive."""

    def method(self) -> None:
        raise AssertionError("a cancelled timer ran")


def test_a_cancelled_timer_no_longer_holds_its_callback():
    loop = EventLoop()
    holder = Holder()
    ref = weakref.ref(holder)
    timer = loop.call_later(300, holder.method)
    timer.cancel()
    del holder
    gc.collect()
    assert ref() is None
    loop.run_once(0)
    loop.close()


def test_cancelled_timers_are_dropped_from_the_heap_and_live_ones_still_run():
    loop = EventLoop()
    fired = []
    live = loop.call_later(0, fired.append, "live")
    for _ in range(10 * MIN_CANCELLED):
        loop.call_later(300, Holder().method).cancel()
    assert loop.timer_count() == 1
    assert len(loop._timers) <= 2 * MIN_CANCELLED  # rebuilt as they passed half the heap
    loop.run_once(0)
    assert fired == ["live"]
    assert not live.cancelled
    live.cancel()  # after it ran: changes no count
    assert loop.timer_count() == 0
    loop.close()


def test_calls_from_other_threads_all_run_with_one_wake_up_for_those_waiting_together():
    loop = EventLoop()
    ran: list[int] = []
    barrier = threading.Barrier(4)

    def caller(base: int) -> None:
        barrier.wait()
        for i in range(500):
            loop.call_soon_threadsafe(ran.append, base + i)

    threads = [threading.Thread(target=caller, args=(1000 * n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    assert loop.run_until(lambda: len(ran) == 2000, 10)
    for thread in threads:
        thread.join(10)
    assert sorted(ran) == sorted(1000 * n + i for n in range(4) for i in range(500))
    # while calls wait to be taken, no more wake-up bytes are written
    loop.call_soon_threadsafe(ran.append, -1)
    loop.call_soon_threadsafe(ran.append, -2)
    assert loop._wake_r.recv(4096, socket.MSG_PEEK) == b"\0"
    assert loop.run_until(lambda: ran[-2:] == [-1, -2], 5)
    loop.close()


def test_a_reader_given_again_replaces_its_callback():
    loop = EventLoop()
    a, b = socket.socketpair()
    seen: list[str] = []
    loop.add_reader(a, lambda: seen.append("first"))
    loop.add_reader(a, lambda: (seen.append("second"), a.recv(10)))
    b.send(b"x")
    assert loop.run_until(lambda: seen, 5)
    assert seen == ["second"]
    loop.remove_reader(a)
    b.send(b"y")
    loop.run_once(max_wait=0.05)
    assert seen == ["second"]
    a.close(), b.close()
    loop.close()
