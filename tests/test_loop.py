"""The event loop's timers: a cancelled timer lets go of its call, and cancelled timers do not pile up."""

from __future__ import annotations

import gc
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
