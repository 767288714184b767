"""One process the main process starts and keeps running (an incoming process, the delivery
process), as the main process sees it: ``Supervised``.

Owns: starting it (``child_command`` and ``child_environment``, its end of a SOCK_SEQPACKET
socketpair passed as a descriptor, the other end an app/channel.Channel); when it was last heard
from, and the watchdog that kills one silent too long (``check_alive``); reaping it once its
channel closed (killed when it has not ended after STOP_GRACE); starting it again (at once, or
after RESTART_PAUSE when it died younger than QUICK_DEATH); killing it when it does not stop in
time; and the log lines of all these ("<name> (pid N) ended: …; starting it again").

Must never: give its packets a meaning or decide what the process is sent (its owner does:
app/incoming.Incoming, app/delivery.Delivery, through ``on_message``, ``on_lost``, ``on_reaped``);
block the loop while it waits for a process to end (it polls); start a process once the main
process is stopping.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from typing import Any, Callable, Protocol

from smtpgw import child_environment
from smtpgw.app.channel import Channel, exit_status
from smtpgw.net.loop import EventLoop

log = logging.getLogger("smtpgw")

STOP_GRACE = 5.0  # seconds a process whose channel closed has to end before it is killed
QUICK_DEATH = 1.0  # a process that dies younger than this is started again only after RESTART_PAUSE
RESTART_PAUSE = 1.0
REAP_POLL = 0.05  # seconds between looks at a process whose channel closed


class Main(Protocol):
    """What ``Supervised`` needs from the main process (app/gateway.Gateway)."""

    loop: EventLoop
    stopping: bool


def nothing_more() -> str:
    return ""


class Supervised:
    """One process of the main process's: ``start`` it; its packets go to ``on_message`` (a
    ``{"ready": true}`` one sets ``ready`` first); when its channel closes ``on_lost`` runs, and
    once it has ended ``on_reaped``, whose answer ends the log line "ended: …" before it is
    started again. ``name`` is how the log calls it ("incoming process 1"), ``called`` how it
    says it cannot start it ("the delivery process"; ``name`` by default)."""

    def __init__(self, main: Main, name: str, command: Callable[[int], list[str]],
                 on_message: Callable[[dict[str, Any]], None], on_lost: Callable[[], None],
                 on_reaped: Callable[[], str] = nothing_more, on_spawned: Callable[[], None] = lambda: None,
                 called: str = "") -> None:
        self.main = main
        self.name = name
        self.called = called or name
        self.command = command  # its command line, given the descriptor number of its channel
        self.on_message = on_message
        self.on_lost = on_lost
        self.on_reaped = on_reaped
        self.on_spawned = on_spawned
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: Channel | None = None
        self.ready = False  # it said so (watched from then on)
        self.started = 0.0
        self.heard = 0.0  # time.monotonic() of its last packet (the watchdog's)
        self.reap_tries = 0

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(self.command(theirs.fileno()), pass_fds=(theirs.fileno(),),
                                         env=child_environment(), stdin=subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            log.error("cannot start %s: %s", self.called, exc)
            self.main.loop.call_later(RESTART_PAUSE, self._restart)
            return
        finally:
            theirs.close()
        self.started = self.heard = time.monotonic()
        self.ready = False
        self.reap_tries = 0
        self.on_spawned()
        self.channel = Channel(self.main.loop, ours, self._message, self._lost)

    def _restart(self) -> None:
        if not self.main.stopping and self.proc is None:
            self.start()

    def send(self, message: dict[str, Any]) -> None:
        """A packet now; with no process running, none (a new one starts from what is on disk)."""
        if self.channel is not None:
            self.channel.send(message)

    def _message(self, message: dict[str, Any], fds: list[int]) -> None:
        self.heard = time.monotonic()
        for fd in fds:  # a process of the main process's sends none
            os.close(fd)
        if message.get("ready"):
            self.ready = True
        self.on_message(message)

    def check_alive(self, limit: float, setting: str) -> None:
        """A process sends a packet at least once a second; one silent for ``limit`` seconds (the
        ``setting``) is hung (its loop stopped: stuck, or stopped by a signal) and is killed,
        then reaped and started again like one that died (as Postfix's daemon_timeout)."""
        now = time.monotonic()
        if self.ready and self.proc is not None and now - self.heard > limit:
            log.error("%s (pid %d) silent for %ds (%s): killed", self.name, self.proc.pid, int(now - self.heard),
                      setting)
            self.proc.kill()
            self.heard = now  # its channel closes next: _lost reaps it and starts a new one

    def _lost(self) -> None:
        """Its channel closed: the process ended (or is ending)."""
        self.ready = False
        self.channel = None
        self.on_lost()
        self._reap()

    def _reap(self) -> None:
        proc = self.proc
        if proc is None:  # already killed and reaped at the end of a stop (kill_unstopped)
            return
        if proc.poll() is None:
            self.reap_tries += 1
            if self.reap_tries > STOP_GRACE / REAP_POLL:
                proc.kill()
            self.main.loop.call_later(REAP_POLL, self._reap)
            return
        self.proc = None
        more = self.on_reaped()
        status = exit_status(proc)
        if self.main.stopping:
            log.info("%s (pid %d) stopped: %s", self.name, proc.pid, status)
            return
        lived = time.monotonic() - self.started
        log.error("%s (pid %d) ended: %s%s; starting it again", self.name, proc.pid, status, more)
        self.main.loop.call_later(0 if lived >= QUICK_DEATH else RESTART_PAUSE, self._restart)

    def kill_unstopped(self) -> None:
        """After a stop's wait: a process still running is killed."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            log.error("%s (pid %d) did not stop in time: killed", self.name, self.proc.pid)
            self.proc = None
