"""Writing buffered output to a non-blocking socket, plain or TLS, for both SMTP sides.

Owns: sending as much of a connection's pending output as the socket takes now, telling "try
again when writable" (plain EWOULDBLOCK, or TLS wanting to read or write first) from a broken
connection.

Must never: block, drop output that was not sent (it stays at the front of the buffer), or decide
what a broken connection means (the caller's session ends or its delivery fails).
"""

from __future__ import annotations

import socket

from smtpgw.net import tls

__all__ = ["send_pending"]


def send_pending(sock: socket.socket, out: bytearray) -> int:
    """Send from the front of ``out`` until it is empty or the socket would block; what was sent
    leaves ``out``. Returns the number of bytes sent; raises OSError (ssl.SSLError is one) when
    the connection is broken."""
    sent_total = 0
    while out:
        try:
            sent = sock.send(out)
        except tls.AGAIN:  # the socket takes nothing more now (a TLS one may need to read first, RFC
            break  # 8446 §4.6.3 post-handshake messages; the caller's reader and writer both stay registered)
        del out[:sent]
        sent_total += sent
    return sent_total
