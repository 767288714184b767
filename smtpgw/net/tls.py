"""TLS on the event loop: a socket wrapped for a handshake, and the handshake driven without blocking.

Owns: taking a plain socket off the loop and wrapping it (server or client side), and stepping
``do_handshake`` from the loop's readiness callbacks until it completes or fails; the one place
both STARTTLS sides (RFC 3207 §4: the handshake starts after the 220 to STARTTLS) go through.

ssl is imported only where a context is made (a certificate configured for inbound STARTTLS, a
next hop offering it): a process that speaks no TLS does without libssl and libcrypto (4 MiB RSS).
Until then no TLS socket exists, and ``AGAIN`` holds the plain socket's "try again" only.

Must never: block (every step runs from a readiness callback), read or write application data
(the caller registers its own reader once the handshake is done), decide what a failure means
(the server side closes, the client side tries again in the clear: each caller's ``failed``
says), or keep a registration on the loop once it is done or has failed, other than the reader
it left for the caller to replace.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Callable

from smtpgw.net.loop import EventLoop

if TYPE_CHECKING:
    import ssl

__all__ = ["AGAIN", "Handshake", "wrap"]

# Not an error: a non-blocking socket takes or gives nothing now. A TLS socket may also want to
# read or write first (a handshake step, RFC 8446 §4.6.3 post-handshake messages): ssl's two are
# added by ``wrap``, the one way a TLS socket reaches the loop. Read at each use (``tls.AGAIN``).
AGAIN: tuple[type[OSError], ...] = (BlockingIOError, InterruptedError)


def wrap(loop: EventLoop, context: ssl.SSLContext, sock: socket.socket, server_side: bool) -> ssl.SSLSocket:
    """``sock`` off the loop and wrapped by ``context``, the handshake not started.

    Raises OSError (ssl.SSLError is one) when the context cannot wrap it; ``sock`` is then
    still the caller's, off the loop."""
    global AGAIN
    import ssl  # loaded already: ``context`` is one of its objects

    AGAIN = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
    loop.forget(sock)
    return context.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)


class Handshake:
    """A non-blocking handshake on ``sock``: call ``step`` once; it registers itself for the
    readiness the handshake wants next, then calls ``done()`` (writer removed) or
    ``failed(exc)`` (registrations left for the caller to forget with the socket)."""

    def __init__(self, loop: EventLoop, sock: ssl.SSLSocket, done: Callable[[], None],
                 failed: Callable[[OSError], None]) -> None:
        self.loop = loop
        self.sock = sock
        self.done = done
        self.failed = failed

    def step(self) -> None:
        import ssl  # loaded: ``sock`` is an SSLSocket

        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.loop.remove_writer(self.sock)
            self.loop.add_reader(self.sock, self.step)
            return
        except ssl.SSLWantWriteError:
            self.loop.add_writer(self.sock, self.step)
            return
        except OSError as exc:  # ssl.SSLError included
            self.failed(exc)
            return
        self.loop.remove_writer(self.sock)
        self.done()
