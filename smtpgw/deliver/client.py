"""Outbound SMTP client connections on the event loop (RFC 5321 client side).

Owns: one connection to one next-hop host: greeting, EHLO with HELO fallback,
capability parsing, transactions (MAIL, RCPT..., DATA) sent pipelined when the
peer offers PIPELINING (RFC 2920) and one at a time otherwise, streaming the
message file with dot-stuffing, per-reply timeouts (``Sending*Timeout``),
opportunistic STARTTLS (RFC 3207), QUIT.

Must never: block the loop, read a whole message into memory, send a message
body to a peer that refused the transaction, or pass 8-bit data to a peer
that does not offer 8BITMIME (the sender decides before it asks us).
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from smtpgw.net import smtp, tls
from smtpgw.net.loop import EventLoop, Timer
from smtpgw.net.smtp import ServerReply
from smtpgw.net.stream import send_pending
from smtpgw.spool.queue import MessageFile, Recipient

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("smtpgw.deliver.client")

CHUNK = 65536


@dataclass
class Transaction:
    """One message to one destination: what to send and, afterwards, what happened."""

    sender: str
    recipients: list[Recipient]
    message: Callable[[], MessageFile]  # opens the bytes to send (``Queue.open_message``)
    size: int
    body: str = "7BIT"
    ret: str | None = None
    envid: str | None = None
    # results: recipient address → (final?, ServerReply or error text)
    rcpt_replies: dict[str, ServerReply] = field(default_factory=dict)
    mail_reply: ServerReply | None = None
    data_reply: ServerReply | None = None
    error: str | None = None  # connection-level failure before a final reply


class Connection:
    """One SMTP client connection; the owner feeds it transactions one at a time."""

    def __init__(
        self,
        loop: EventLoop,
        host: str,
        ip: str,
        port: int,
        helo_name: str,
        timeouts: object,
        on_ready: Callable[["Connection"], None],
        on_done: Callable[["Connection", Transaction], None],
        on_closed: Callable[["Connection", str | None], None],
        tls_context: Callable[[], ssl.SSLContext] | None = None,
    ) -> None:
        self.loop = loop
        self.host, self.ip, self.port = host, ip, port
        self.helo_name = helo_name
        self.t = timeouts
        self.on_ready, self.on_done, self.on_closed = on_ready, on_done, on_closed
        # opportunistic STARTTLS: the context, made when a peer first offers it (None: never TLS)
        self.tls_context = tls_context
        self.sock: socket.socket | None = None
        self.parser = smtp.ReplyParser()
        self.out = bytearray()
        self.waiting: deque[tuple[Callable[[ServerReply], None], float]] = deque()
        self.timer: Timer | None = None
        self.write_timer: Timer | None = None
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.busy = False
        self.closed = False
        self.greeted = False
        self.closing: ServerReply | None = None  # the peer's 421: it is closing the channel
        self.txn: Transaction | None = None
        self._body: object | None = None
        self._body_left = 0  # bytes of the queue file not read yet
        self.transactions = 0

    # -- capabilities -------------------------------------------------------------
    def has(self, keyword: str) -> bool:
        return keyword in self.extensions

    @property
    def max_size(self) -> int | None:
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isdigit() and int(value) > 0 else None

    @property
    def reusable(self) -> bool:
        """Open, and no 421 received: another command may follow (RFC 5321 §3.8)."""
        return not self.closed and self.closing is None

    # -- connection -----------------------------------------------------------------
    def connect(self) -> None:
        family = socket.AF_INET6 if ":" in self.ip else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        # Commands and the end of data are small writes that must not wait for
        # the peer's delayed ACK (Nagle); PIPELINING already batches them.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock.connect((self.ip, self.port))
        except BlockingIOError:
            pass
        except OSError as exc:
            self.loop.call_soon(self.fail, f"connect to {self.ip}:{self.port}: {exc.strerror or exc}")
            return
        self.loop.add_writer(self.sock, self._connected)
        self._arm(self.t.SendingInitialTimeout, "connect")

    def _connected(self) -> None:
        assert self.sock is not None
        self.loop.remove_writer(self.sock)
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail(f"connect to {self.ip}:{self.port}: {os.strerror(err)}")
            return
        self.loop.add_reader(self.sock, self._readable)
        self.expect(self._greeting, self.t.SendingInitialTimeout)

    def _arm(self, seconds: float, what: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(seconds, self.fail, f"timeout waiting for {what} from {self.host}[{self.ip}]")

    def expect(self, handler: Callable[[ServerReply], None], timeout: float) -> None:
        """Queue a handler for the next reply (replies come in command order, RFC 2920 §3.1)."""
        self.waiting.append((handler, timeout))
        if len(self.waiting) == 1:
            self._arm(timeout, "reply")

    def send(self, data: bytes) -> None:
        self.out += data
        self._flush()

    def _flush(self) -> None:
        if self.closed or self.sock is None:
            return
        try:
            progress = send_pending(self.sock, self.out) > 0
        except OSError as exc:  # ssl.SSLError is one
            self.fail(f"write to {self.host}[{self.ip}]: {exc}")
            return
        if self.write_timer is not None and (progress or not self.out):
            self.write_timer.cancel()
            self.write_timer = None
        if self.out:
            # WriteTimeout: a peer that stops reading is given up (its window never opens)
            if self.write_timer is None:
                self.write_timer = self.loop.call_later(
                    self.t.WriteTimeout, self.fail, f"timeout writing to {self.host}[{self.ip}]")
            self.loop.add_writer(self.sock, self._flush)
            return
        self.loop.remove_writer(self.sock)
        if self._body is not None:
            # the next chunk in a later loop turn: no recursion, fair to other sessions
            self.loop.call_soon(self._pump_body)

    def _readable(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(CHUNK)
        except tls.AGAIN:
            return
        except OSError as exc:  # ssl.SSLError is one
            self.fail(f"read from {self.host}[{self.ip}]: {exc}")
            return
        if not data:
            self.fail(f"connection closed by {self.host}[{self.ip}]")
            return
        try:
            replies = self.parser.feed(data)
        except ValueError as exc:
            self.fail(f"protocol error from {self.host}[{self.ip}]: {exc}")
            return
        for reply in replies:
            if not self.waiting:
                self.fail(f"unexpected reply from {self.host}[{self.ip}]: {reply}")
                return
            handler, _ = self.waiting.popleft()
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if self.waiting:
                self._arm(self.waiting[0][1], "reply")
            if reply.code == 421:
                # RFC 5321 §3.8: the server is closing the channel. The reply answers its command;
                # then the session ends here, and is never given another transaction.
                self.closing = reply
            handler(reply)
            if self.closed:
                return
            if self.closing is not None:
                self.fail(f"{self.host}[{self.ip}] is closing the session: {reply}")
                return

    # -- session setup ------------------------------------------------------------------
    def _greeting(self, reply: ServerReply) -> None:
        if reply.code != 220:
            self.fail(f"greeting from {self.host}[{self.ip}]: {reply}", reply)
            return
        self._ehlo()

    def _ehlo(self) -> None:
        self.send(f"EHLO {self.helo_name}\r\n".encode())
        self.expect(self._ehlo_reply, self.t.SendingHelloTimeout)

    def _ehlo_reply(self, reply: ServerReply) -> None:
        if reply.code == 250:
            self.extensions = {}
            for line in reply.lines[1:]:
                keyword, _, value = line.partition(" ")
                self.extensions[keyword.upper()] = value.strip()
            if self.tls_context is not None and not self.tls and self.has("STARTTLS"):
                self.send(b"STARTTLS\r\n")
                self.expect(self._starttls_reply, self.t.SendingHelloTimeout)
                return
            self._ready()
        elif 500 <= reply.code < 600:
            # RFC 5321 §3.2: a server that does not know EHLO gets HELO.
            self.send(f"HELO {self.helo_name}\r\n".encode())
            self.expect(self._helo_reply, self.t.SendingHelloTimeout)
        else:
            self.fail(f"EHLO rejected by {self.host}[{self.ip}]: {reply}", reply)

    def _helo_reply(self, reply: ServerReply) -> None:
        if reply.code != 250:
            self.fail(f"HELO rejected by {self.host}[{self.ip}]: {reply}", reply)
            return
        self.extensions = {}
        self._ready()

    def _starttls_reply(self, reply: ServerReply) -> None:
        if reply.code != 220:
            self._ready()  # opportunistic: carry on in the clear
            return
        if self.parser.pending:
            # RFC 3207 §4.2: nothing sent in the clear after 220 may be read as a TLS-time reply
            self.fail(f"{self.host}[{self.ip}] sent data after its 220 to STARTTLS")
            return
        self.parser = smtp.ReplyParser()
        assert self.sock is not None and self.tls_context is not None
        try:
            self.sock = tls.wrap(self.loop, self.tls_context(), self.sock, server_side=False)
        except OSError as exc:  # ssl.SSLError is one
            self._again_in_clear(f"TLS with {self.host}[{self.ip}]: {exc}")
            return
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(self.t.SendingHelloTimeout, self._again_in_clear,
                                          f"timeout in the TLS handshake with {self.host}[{self.ip}]")
        tls.Handshake(self.loop, self.sock, self._tls_started, self._tls_failed).step()

    def _tls_failed(self, exc: OSError) -> None:
        self._again_in_clear(f"TLS handshake with {self.host}[{self.ip}]: {exc}")

    def _tls_started(self) -> None:
        assert self.sock is not None
        self.loop.add_reader(self.sock, self._readable)
        self.tls = True
        self._ehlo()  # RFC 3207 §4.2: capabilities are learnt again

    def _again_in_clear(self, why: str) -> None:
        """Opportunistic TLS (RFC 7435 §1.3, as Postfix's security level "may"): a failed handshake is
        no reason to hold the mail. The session starts over on a new connection without STARTTLS."""
        log.info("%s; connecting again without TLS", why)
        for timer in (self.timer, self.write_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.write_timer = None
        assert self.sock is not None
        self.loop.forget(self.sock)
        try:
            self.sock.close()
        except OSError:
            pass
        self.tls_context = None
        self.parser = smtp.ReplyParser()
        self.out.clear()
        self.waiting.clear()
        self.extensions = {}
        self.connect()

    def _ready(self) -> None:
        if not self.reusable:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.greeted = True
        self.on_ready(self)

    # -- transactions ----------------------------------------------------------------------
    def start(self, txn: Transaction) -> None:
        """Send one transaction; ``on_done`` is called with its results."""
        self.busy = True
        self.txn = txn
        params = []
        if self.has("SIZE"):
            params.append(f"SIZE={txn.size}")
        if txn.body == "8BITMIME" and self.has("8BITMIME"):
            params.append("BODY=8BITMIME")
        dsn = self.has("DSN")
        if dsn and txn.ret:
            params.append(f"RET={txn.ret}")
        if dsn and txn.envid:
            params.append(f"ENVID={smtp.xtext_encode(txn.envid)}")
        mail_line = f"MAIL FROM:<{txn.sender}>{''.join(' ' + p for p in params)}\r\n".encode()
        rcpt_lines: list[tuple[bytes, str]] = []
        for rcpt in txn.recipients:
            rparams = []
            if dsn and rcpt.notify:
                rparams.append("NOTIFY=" + ",".join(rcpt.notify))
            if dsn and rcpt.orcpt:
                addr_type, _, addr = rcpt.orcpt.partition(";")
                rparams.append(f"ORCPT={addr_type};{smtp.xtext_encode(addr)}")
            rcpt_lines.append((f"RCPT TO:<{rcpt.addr}>{''.join(' ' + p for p in rparams)}\r\n".encode(), rcpt.addr))
        if self.has("PIPELINING"):
            # RFC 2920 §3.1: MAIL, RCPT... and DATA in one group; replies in order.
            self.send(mail_line + b"".join(line for line, _ in rcpt_lines) + b"DATA\r\n")
            self.expect(self._mail_reply, self.t.SendingMailTimeout)
            for _, addr in rcpt_lines:
                self.expect(self._rcpt_handler(addr, then=None), self.t.SendingRcptTimeout)
            self.expect(self._data_reply, self.t.SendingDataInitiationTimeout)
        else:
            self._sequence = deque(rcpt_lines)
            self.send(mail_line)
            self.expect(self._mail_reply, self.t.SendingMailTimeout)

    def _next_rcpt(self) -> None:
        """Without PIPELINING: one command, one reply (RFC 5321 §4.3)."""
        if self._sequence:
            line, addr = self._sequence.popleft()
            self.send(line)
            self.expect(self._rcpt_handler(addr, then=self._next_rcpt), self.t.SendingRcptTimeout)
        elif self._accepted():
            self.send(b"DATA\r\n")
            self.expect(self._data_reply, self.t.SendingDataInitiationTimeout)
        else:
            self._finish_refused()

    def _accepted(self) -> list[str]:
        assert self.txn is not None
        return [a for a, r in self.txn.rcpt_replies.items() if 200 <= r.code < 300]

    def _mail_ok(self) -> bool:
        assert self.txn is not None
        return self.txn.mail_reply is not None and self.txn.mail_reply.code < 400

    def _mail_reply(self, reply: ServerReply) -> None:
        assert self.txn is not None
        self.txn.mail_reply = reply
        if not self.has("PIPELINING"):
            if reply.code >= 400:
                self._finish_refused()
            else:
                self._next_rcpt()

    def _rcpt_handler(self, addr: str, then: Callable[[], None] | None) -> Callable[[ServerReply], None]:
        def handler(reply: ServerReply) -> None:
            assert self.txn is not None
            self.txn.rcpt_replies[addr] = reply
            if then is not None and self.reusable:
                then()

        return handler

    def _data_reply(self, reply: ServerReply) -> None:
        if reply.code != 354 and reply.code < 400:
            # RFC 5321 §4.3.2: the only positive reply to DATA is 354. A 2xx (or another 3xx) came
            # before any of the message was sent: never a delivery. What the peer now expects is
            # unknown, so the session ends and the transaction is deferred.
            self.fail(f"protocol error from {self.host}[{self.ip}]: {reply} in reply to DATA")
            return
        if reply.code == 354 and self._mail_ok() and self._accepted():
            self._begin_body()
        elif reply.code == 354:
            # RFC 2920 §3.1: DATA accepted although nothing else was: send a lone
            # dot, which the server must refuse, then carry on.
            self.send(b".\r\n")
            self.expect(lambda _reply: self._finish_refused(), self.t.SendingDataTerminationTimeout)
        else:
            self._finish_refused(data_reply=reply)

    def _finish_refused(self, data_reply: ServerReply | None = None) -> None:
        txn = self.txn
        if txn is None:
            return
        if data_reply is not None and self._accepted():
            txn.data_reply = data_reply
        needs_rset = self.reusable
        self._complete()
        if needs_rset and not self.closed:
            self.busy = True
            self.send(b"RSET\r\n")
            self.expect(self._rset_reply, self.t.SendingMailTimeout)

    def _rset_reply(self, reply: ServerReply) -> None:
        self.busy = False
        if reply.code != 250:
            self.close()
            return
        self.on_ready(self)

    # -- body ---------------------------------------------------------------------------
    def _begin_body(self) -> None:
        assert self.txn is not None
        try:
            # a queue file is never written again once queued: its size tells which read is the
            # last, and the last chunk goes out with the final dot in one write
            body = self.txn.message()
            self._body_left = body.size
        except OSError as exc:
            self.fail(f"cannot read queue file: {exc}")  # the transaction ends deferred
            return
        self._body = body
        self._line_start = True
        self._carry = b""
        # No reply timer while the message goes out: WriteTimeout bounds each stalled write (RFC 5321
        # §4.5.3.2.5, data block) and SendingDataTerminationTimeout starts at the final dot (§4.5.3.2.6,
        # the wait for the reply), so a large message on a slow link is not cut off for being large.
        self._pump_body()

    def _pump_body(self) -> None:
        """Send the next chunk when the previous one is out (bounded memory)."""
        body = self._body
        if body is None or self.out or self.closed:
            return
        chunk = body.read(CHUNK)  # type: ignore[attr-defined]
        self._body_left -= len(chunk)
        if chunk and self._body_left > 0:
            data = self._carry + chunk
            cut = data.rfind(b"\n") + 1
            if cut == 0 and len(data) < CHUNK * 4:
                self._carry = data
                self.loop.call_soon(self._pump_body)
                return
            cut = cut or len(data)
            data, self._carry = data[:cut], data[cut:]
            stuffed, self._line_start = smtp.dot_stuff(data, self._line_start)
            self.send(stuffed)
            return
        body.close()  # type: ignore[attr-defined]
        self._body = None
        tail = self._carry + chunk
        if tail:
            stuffed, self._line_start = smtp.dot_stuff(tail, self._line_start)
            tail = stuffed
        if tail and not tail.endswith(b"\r\n"):
            tail += b"\r\n"
        elif not tail and not self._line_start:
            tail = b"\r\n"
        self.send(tail + b".\r\n")  # RFC 5321 §4.1.1.4
        self.expect(self._dot_reply, self.t.SendingDataTerminationTimeout)

    def _dot_reply(self, reply: ServerReply) -> None:
        assert self.txn is not None
        self.txn.data_reply = reply
        self.transactions += 1
        self._complete()
        if self.reusable:
            self.on_ready(self)

    def _complete(self) -> None:
        txn, self.txn = self.txn, None
        self.busy = False
        if txn is not None:
            self.on_done(self, txn)

    # -- ending -------------------------------------------------------------------------
    def quit(self) -> None:
        if self.closed or self.sock is None:
            return
        self.busy = True
        self.send(b"QUIT\r\n")
        self.expect(lambda reply: self.close(), self.t.SendingQuitTimeout)

    def fail(self, why: str, reply: ServerReply | None = None, retire_only: bool = False) -> None:
        """A connection-level failure: the current transaction (if any) ends with ``why``."""
        if self.closed:
            return
        log.info("%s", why)
        txn = self.txn
        if txn is not None and not retire_only:
            txn.error = why
            if reply is not None and txn.mail_reply is None:
                txn.mail_reply = reply
            self.txn = None
            self.busy = False
            self.on_done(self, txn)
        self.close(why)

    def close(self, why: str | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        for timer in (self.timer, self.write_timer):
            if timer is not None:
                timer.cancel()
        if self._body is not None:
            self._body.close()  # type: ignore[attr-defined]
            self._body = None
        if self.sock is not None:
            self.loop.forget(self.sock)
            try:
                self.sock.close()
            except OSError:
                pass
        self.on_closed(self, why if not self.greeted or why else None)
