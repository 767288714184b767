"""The channel between the main process and a process it starts (incoming processes,
the delivery process): one SOCK_SEQPACKET socketpair, one JSON object per packet; and what
such a process does alike on its side (signals, the log, exiting when the main process is gone).

Owns: packets in and out on a loop (in order, a descriptor with a packet when asked), and
noticing that the other end is gone; ``serve_signals``, ``setup_log``, ``flush_log_every``,
``leave``, ``exit_orphaned``, ``exit_status``, ``publish_reload``.

Must never: block the loop (a packet the socket does not take now waits in order), or read
more than MAX_PACKET bytes at once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from smtpgw import RELEASE_INTERVAL, release_heap
from smtpgw import log as logsetup
from smtpgw.config import Config, save_snapshot
from smtpgw.net.loop import EventLoop

if TYPE_CHECKING:
    import subprocess

log = logging.getLogger("smtpgw")

MAX_PACKET = 65536  # bytes of one channel packet; longer lists are sent in several


class Channel:
    """One end of a process's socketpair on a loop: JSON packets in and out, a descriptor with
    a packet; ``on_closed`` runs once when the other end is gone."""

    def __init__(self, loop: EventLoop, sock: socket.socket,
                 on_message: Callable[[dict[str, Any], list[int]], None], on_closed: Callable[[], None]) -> None:
        self.loop = loop
        self.sock = sock
        self.on_message = on_message
        self.on_closed = on_closed
        self.outbox: deque[bytes] = deque()
        self.closed = False
        sock.setblocking(False)
        loop.add_reader(sock, self._readable)

    def _readable(self) -> None:
        for _ in range(64):  # bounded: other sockets get their turn
            if self.closed:
                return
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_PACKET, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self.close()
                return
            try:
                message = json.loads(data)
            except ValueError:
                log.error("unreadable packet on a process's channel (%d bytes)", len(data))
                message = {}
            self.on_message(message, fds)

    def send(self, message: dict[str, Any]) -> None:
        """Queue a packet; it leaves as soon as the socket takes it, in order."""
        if self.closed:
            return
        self.outbox.append(json.dumps(message, separators=(",", ":")).encode())
        self._flush()

    def send_descriptor(self, message: dict[str, Any], fd: int) -> bool:
        """A packet with a descriptor, now or not at all (False: the other end is behind)."""
        if self.closed or self.outbox:
            return False
        try:
            socket.send_fds(self.sock, [json.dumps(message, separators=(",", ":")).encode()], [fd])
        except OSError:  # BlockingIOError among them: the other process is not reading
            return False
        return True

    def _flush(self) -> None:
        while self.outbox:
            try:
                self.sock.send(self.outbox[0])
            except (BlockingIOError, InterruptedError):
                self.loop.add_writer(self.sock, self._flush)
                return
            except OSError:
                self.close()
                return
            self.outbox.popleft()
        self.loop.remove_writer(self.sock)

    def finish(self, timeout: float) -> None:
        """Send what is queued, waiting for the socket at most ``timeout`` seconds (at exit)."""
        if self.closed:
            return
        self.sock.settimeout(timeout)
        try:
            for packet in self.outbox:
                self.sock.send(packet)
        except OSError:
            pass
        self.outbox.clear()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.forget(self.sock)
        self.sock.close()
        self.on_closed()


def publish_reload(path: str, cfg: Config, who: str) -> bool:
    """At a HUP the main process accepted: its configuration where ``who`` reads it (a
    snapshot, app/config.save_snapshot); False, logged, when it cannot be written (they keep theirs)."""
    try:
        save_snapshot(path, cfg)
    except OSError as exc:
        log.error("%s: the configuration in force is kept: cannot write %s: %s", who, path, exc)
        return False
    return True


# -- a process the main process started, on its side ----------------------------------------
def serve_signals(loop: EventLoop, stop: Callable[[], None]) -> None:
    """INT and HUP are the main process's (a terminal's ^C reaches every process; a reload is
    passed on over the channel); TERM stops this process on its loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: loop.call_soon(stop))
    signal.set_wakeup_fd(loop._wake_w.fileno(), warn_on_full_buffer=False)


def setup_log(cfg: Config) -> None:
    """The gateway's LogFile, appended to in whole lines (log.BufferedFileHandler)."""
    logsetup.setup(cfg.options.LogFile, cfg.options.LogLevel, cfg.locale.DateFormat, cfg.locale.TimeFormat)


def flush_log_every(loop: EventLoop, interval: float) -> None:
    logsetup.flush_all()
    loop.call_later(interval, flush_log_every, loop, interval)


def release_heap_every(loop: EventLoop) -> None:
    """A started process's freed heap given back once every ``RELEASE_INTERVAL``, as the main
    process does (app/gateway, once a minute)."""
    release_heap()
    loop.call_later(RELEASE_INTERVAL, release_heap_every, loop)


def leave(loop: EventLoop, channel: Channel, grace: float) -> None:
    """The end of a stop: what is queued for the main process sent (``grace`` seconds at most),
    the channel closed, the log written, the loop stopped."""
    channel.finish(grace)
    channel.close()
    logsetup.flush_all()
    loop.stop()


def exit_orphaned(what: str) -> None:
    """The main process is gone (killed): exit at once, doing nothing more."""
    log.error("%s: the main process is gone; exiting", what)
    logsetup.flush_all()
    os._exit(1)


def exit_status(proc: subprocess.Popen[bytes]) -> str:
    """How a process that ended ended, for the log."""
    code = proc.returncode
    return f"exit status {code}" if code >= 0 else f"signal {-code}"
