"""The Receiver: inbound SMTP sessions (RFC 5321 server side) on the event loop.

Owns: listening sockets, the open sessions and their admission at connect
(``IncomingSessions``, ``MaximalIncomingSessionsPerIP``), the per-session state machine, the verb table with
per-verb flags (allowed before STARTTLS, counts toward the junk-command budget;
cf. Postfix smtpd_cmd_table), every receiving limit and timeout of
``[smtpgw.limits]``/``[smtpgw.timeouts]``, STARTTLS (RFC 3207), and streaming
DATA to the queue's tmp/ folder in bounded chunks.

Must never: answer 250 to end-of-data before the queue has made the message
durable; end DATA on anything but CRLF.CRLF (SMTP smuggling); run a command or
accept a message holding a NUL byte (501 5.5.2, 550 5.6.0); keep plaintext
received before a TLS handshake (CVE-2011-0411); hold an unbounded buffer;
relay for a client and recipient no RelayRule allows.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass
from email.utils import formatdate
from typing import TYPE_CHECKING, Callable, Protocol

from smtpgw.log import event
from smtpgw.net import smtp, tls
from smtpgw.net.loop import EventLoop, Timer
from smtpgw.net.smtp import Reply, SyntaxProblem
from smtpgw.net.stream import send_pending
from smtpgw.receive.checks import Lookups, SessionChecks, relay_verdict
from smtpgw.receive.quota import Quota
from smtpgw.spool.queue import Committer, Envelope, Recipient, TmpFile, new_id
from smtpgw.stats import Stats

if TYPE_CHECKING:
    import ssl  # imported where a context is made (a certificate configured: app/incoming.server_tls)

log = logging.getLogger("smtpgw.receive.receiver")

MAX_COMMAND_LINE = 2048  # RFC 5321 §4.5.3.1.4 says 512; extensions may lengthen it (Postfix: 2048)
MAX_DATA_LINE = 1000  # RFC 5321 §4.5.3.1.6, including CRLF
READ_CHUNK = 65536
MAX_PENDING_OUTPUT = 65536  # stop reading while a client does not read its replies
CLOSE_GRACE = 10.0  # seconds for a closing session's last reply to leave
MSG_ID = re.compile(rb"<[^<>\s\",]{1,250}>")  # a msg-id as logged: one token in angle brackets
MAX_RCPT_OVERSHOOT = 1000  # 452s for recipients over the limit not counted as errors (Postfix's default)
_DATE: tuple[int, str] = (-1, "")  # the last second a Received field was dated, and its text


def _trace_date() -> str:
    """The Received field's date-time (RFC 5322 §3.3, local time), formatted once a second: it has
    no part below the second."""
    global _DATE
    second = int(time.time())
    if _DATE[0] != second:
        _DATE = (second, formatdate(second, localtime=True))
    return _DATE[1]


@functools.lru_cache(maxsize=16)
def greeting(hostname: str) -> Reply:
    """The 220 banner (RFC 5321 §4.3.1); one Reply per name, so its wire form is built once."""
    return smtp.GREETING.format(hostname)


@functools.lru_cache(maxsize=16)
def _ehlo_lines(hostname: str, max_bytes: int, starttls: bool) -> bytes:
    """The EHLO reply's wire form (RFC 5321 §4.1.1.1, a multi-line 250 naming the extensions
    offered), built once per configuration."""
    extensions = [hostname, "PIPELINING", f"SIZE {max_bytes}", "8BITMIME", "DSN", "ENHANCEDSTATUSCODES"]
    if starttls:
        extensions.append("STARTTLS")
    extensions.append("HELP")
    return smtp.R(250, "", extensions[-1]).lines(extensions[:-1])


@dataclass(frozen=True)
class Verb:
    """One SMTP command: its handler and its Postfix-style flags."""

    handler: Callable[["Session", str], None]
    pre_tls: bool = False  # allowed before STARTTLS where TLS is required
    junk: bool = False  # counts toward MaximalJunkCommands


def long_line(text: bytes) -> bool:
    """Whether ``text`` holds MAX_DATA_LINE bytes or more without a LF (RFC 5321 §4.5.3.1.6).

    Such a run covers one whole block of half that length (blocks from the start): while every
    block holds a LF, as in any usual text, there is none, and no line is split out to be measured."""
    half = MAX_DATA_LINE // 2
    find = text.find
    for start in range(0, len(text) - half + 1, half):
        if find(b"\n", start, start + half) < 0:
            return max(map(len, text.split(b"\n"))) >= MAX_DATA_LINE
    return False


class DataReader:
    """End-of-data detection, dot-unstuffing and checks over a stream of DATA bytes.

    Works on whole lines only (a partial line waits for more input, bounded by
    MAX_DATA_LINE), so CR and LF of one line ending are never split apart.
    Stops writing (but keeps reading) once a limit is crossed: the reply comes
    after end-of-data, as RFC 5321 §4.2.5 implies.
    """

    def __init__(self, fd: int, max_size: int, max_hops: int, prefix: bytes = b"", normalize_lf: bool = False) -> None:
        self.fd = fd
        # BareNewline=normalize (Postfix 3.9's smtpd_forbid_bare_newline=normalize): a bare LF ends a
        # line and is stored as CRLF; only CRLF.CRLF still ends the data (at_line_start is about CRLF).
        self.normalize_lf = normalize_lf
        self.prefix = prefix  # written with the first bytes of the message (one write, not two)
        self.max_size = max_size
        self.max_hops = max_hops
        self.size = 0
        self.hops = 0
        self.in_header = True
        self.at_line_start = True  # after a CRLF; DATA's own CRLF precedes the first line
        self.after_newline = True  # after any line end: where a transparency dot is removed
        self.carry = b""
        self.too_big = False
        self.bare_newline = False
        self.nul = False  # RFC 2045 §2.8: no NUL without BINARYMIME (RFC 3030), which is not offered
        self.long_line = False
        self.has_8bit = False
        self.message_id: str | None = None
        self.dkim_signed = False  # a DKIM-Signature field name in the header block (Envelope.dkim_signed)

    @property
    def failed(self) -> bool:
        return self.too_big or self.bare_newline or self.nul or self.long_line or self.hops > self.max_hops

    def feed(self, data: bytes) -> int:
        """Consume input; returns -1 if more is needed, else the offset after CRLF.CRLF."""
        buf = self.carry + data if self.carry else data
        last_nl = buf.rfind(b"\n")
        if last_nl < 0:
            self._hold_partial(buf)
            return -1
        complete = buf[: last_nl + 1]
        if self.at_line_start and complete.startswith(b".\r\n"):
            end = 0
        else:
            found = complete.find(b"\r\n.\r\n")
            end = found + 2 if found >= 0 else -1
        if end >= 0:
            self._content(complete[:end])
            self.carry = b""
            consumed_of_buf = end + 3
            return consumed_of_buf - (len(buf) - len(data))
        self._content(complete)
        self._hold_partial(buf[last_nl + 1 :])
        return -1

    def _hold_partial(self, partial: bytes) -> None:
        if len(partial) > MAX_DATA_LINE:
            # An over-long line: remember it, keep only its tail (for CRLF.CRLF
            # detection nothing more is needed) so memory stays bounded.
            self.long_line = True
            self._write(b"")
            partial = partial[-4:]
            self.at_line_start = self.after_newline = False
        self.carry = partial

    def _content(self, text: bytes) -> None:
        """Whole lines of message text (ending in LF), not yet unstuffed."""
        if not text:
            return
        self.at_line_start = text.endswith(b"\r\n")  # of the text as sent: only CRLF.CRLF ends the data
        lines = self._line_ends(text)
        if b"\0" in lines:
            self.nul = True
        if self.in_header:
            self._scan_header(lines)
        # RFC 5321 §4.5.2: a leading period on a line is removed.
        body = lines.replace(b"\r\n.", b"\r\n")
        if self.after_newline and body.startswith(b"."):
            body = body[1:]
        self.after_newline = True  # the text is whole lines
        # RFC 5321 §4.5.3.1.6: the limit does not count the dot duplicated for transparency.
        if len(body) >= MAX_DATA_LINE and long_line(body):
            self.long_line = True
        if not self.has_8bit and not body.isascii():
            self.has_8bit = True
        self.size += len(body)
        if self.size > self.max_size:
            self.too_big = True
        self._write(body)

    def _line_ends(self, text: bytes) -> bytes:
        """Whole lines with CRLF ends; a bare CR, or a bare LF unless normalized, fails the message.

        RFC 5321 §2.3.8: lines end in CRLF; a lone CR or LF is what SMTP smuggling uses
        (CVE-2023-51764 class). A bare CR is never a line end. A bare LF is one only under
        BareNewline=normalize, where it becomes CRLF, so the stored message and what the sender
        relays are CRLF throughout, and ``.<LF>`` or ``<LF>.<CRLF>`` never end the data.
        """
        crlf = text.count(b"\r\n")
        if text.count(b"\r") != crlf:
            self.bare_newline = True
        elif text.count(b"\n") != crlf:
            if not self.normalize_lf:
                self.bare_newline = True
            else:
                return text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        return text

    def _scan_header(self, text: bytes) -> None:
        pos = 0
        while pos < len(text):
            nl = text.find(b"\n", pos)
            line = text[pos : nl + 1]
            pos = nl + 1
            if line in (b"\r\n", b"\n"):
                self.in_header = False
                break
            lower = line[:12].lower()
            if lower.startswith(b"received:"):
                self.hops += 1  # RFC 5321 §6.3: loop detection by counting trace fields
            elif lower.startswith(b"message-id:") and self.message_id is None:
                # kmg-spec §7.1 logs ``message_id=<message id>``: the msg-id only (RFC 5322 §3.6.4),
                # never the rest of the line, whose spaces, commas and quotes would add fields.
                found = MSG_ID.search(line, 11)
                self.message_id = found.group().decode("ascii", "replace") if found else None
        # The run of bytes the DKIM key names' reader looks for in the header block before it parses
        # it (mail/dkim._may_be_signed, over the same lines as stored): without it, the reader can
        # find no signature, so the scanner need not read msg/ID for one (scan/dkimkeys).
        if not self.dkim_signed and b"dkim-signature" in text[:pos].lower():
            self.dkim_signed = True

    def finish(self) -> None:
        """At end of data: write what is still held (the prefix of an empty message)."""
        self._write(b"")

    def _write(self, body: bytes) -> None:
        if self.failed:
            return
        if self.prefix:
            body, self.prefix = self.prefix + body, b""
        view = memoryview(body)
        while view:
            view = view[os.write(self.fd, view) :]


class Inbound(Lookups, Protocol):
    """What a session needs from the process it runs in: the configuration and resolver in force
    (``Lookups``), the loop, the counters, the spool's committer (tmp files, the durable commit),
    the usage quotas, the server TLS context (None: no STARTTLS), and the hand-offs."""

    loop: EventLoop
    stats: Stats
    committer: Committer
    quota: Quota
    ssl_context: ssl.SSLContext | None

    def queue_has_space(self) -> bool:
        """``MinimalQueueFreeSpaceSize``: False while the spool's disk is short."""

    def message_received(self, env: Envelope) -> None:
        """``env`` is durable in WFC (its 250 follows)."""

    def session_closed(self, session: "Session") -> None:
        """The session's socket is closed."""

    def admit_mail(self, ready: Callable[[], None], first: bool = False) -> bool:
        """In-flow control (``InFlowDelay``): True when a new message may come now; else False,
        and ``ready`` runs once it may (the scanner's wait shrank, or the delay is over); the
        ``first`` message of a session goes ahead of the next ones of other sessions."""


class Session:
    """One inbound SMTP connection."""

    # A thousand idle sessions must stay cheap: with its ~36 attributes an instance dictionary
    # was no longer key-shared (about 1.6 KiB a session); slots take 8 bytes each.
    __slots__ = (
        "host", "cfg", "loop", "sock", "fd", "ip", "inbuf", "out", "closing", "closed", "tls",
        "handshake", "handshaking", "discarding_line", "committing", "waiting_checks", "close_timer", "checks", "helo",
        "esmtp", "junk", "errors", "messages", "session_bytes", "data", "tmp", "last_read", "state_since",
        "state_timeout", "timer", "sender", "mail", "rcpts", "rcpt_refused", "rcpt_overshoot", "qid", "flow_admitted",
    )

    def __init__(self, host: Inbound, sock: socket.socket, peer: tuple) -> None:
        self.host = host
        self.cfg = host.cfg
        self.loop = host.loop
        self.sock = sock
        self.fd = sock.fileno()
        self.ip = client_address(peer)
        self.inbuf = bytearray()
        self.out = bytearray()
        self.closing = False
        self.closed = False
        self.tls = False
        self.handshaking = False
        self.handshake: tls.Handshake | None = None
        self.discarding_line = False
        self.committing = False
        self.waiting_checks = False
        self.flow_admitted = False  # a held MAIL was let go (InFlowDelay): it goes on when taken up again
        self.close_timer: Timer | None = None
        self.checks = SessionChecks(host, self.ip)
        self.helo: str | None = None
        self.esmtp = False
        self.junk = 0
        self.errors = 0
        self.messages = 0
        self.session_bytes = 0
        self.data: DataReader | None = None
        self.tmp: TmpFile | None = None
        self.reset_transaction()
        now = self.loop.time()
        self.last_read = now
        self.state_since = now
        self.state_timeout = self.cfg.timeouts.ReceivingCommandTimeout
        self.timer = self.loop.call_later(self._next_deadline() - now, self._on_timer)

    # -- limits of the configuration in force -----------------------------------------
    @property
    def tls_required(self) -> bool:
        return bool(self.host.cfg.network.RequireTLS) and self.host.ssl_context is not None

    @property
    def max_message_bytes(self) -> int:
        return self.host.cfg.limits.MaximalIncomingMessageSize * 1024

    @property
    def max_session_bytes(self) -> int:
        return self.host.cfg.limits.MaximalIncomingSessionSize * 1024

    # -- transaction state ----------------------------------------------------
    def reset_transaction(self) -> None:
        self._discard_tmp()
        self.sender: str | None = None
        self.mail: smtp.MailParams | None = None
        self.rcpts: list[Recipient] = []
        self.rcpt_refused = 0
        self.rcpt_overshoot = 0
        self.qid: str | None = None

    def _discard_tmp(self) -> None:
        if self.tmp is not None:
            self.host.committer.discard_tmp(self.tmp)
            self.tmp = None
        self.data = None

    def set_timeout(self, seconds: int) -> None:
        self.state_since = self.loop.time()
        self.state_timeout = seconds
        if self._next_deadline() < self.timer.when:  # the timer only ever moves earlier here
            self.timer.cancel()
            self.timer = self.loop.call_later(self._next_deadline() - self.state_since, self._on_timer)

    def _next_deadline(self) -> float:
        return min(self.state_since + self.state_timeout, self.last_read + self.cfg.timeouts.ReadTimeout)

    def _on_timer(self) -> None:
        if self.closed:
            return
        now = self.loop.time()
        deadline = self._next_deadline()
        if self.committing:
            # the client is waiting for us, not the reverse: a 421 now would be followed by a 250
            self.timer = self.loop.call_later(1.0, self._on_timer)
            return
        if now >= deadline:
            if self.handshaking:
                log.info("timeout during the TLS handshake with [%s]", self.ip)
            else:
                log.info("timeout after %s from [%s]", "DATA" if self.data else "command", self.ip)
            self.reset_transaction()
            self.close_with(smtp.TIMEOUT.format(self.cfg.network.Hostname))
        else:
            self.timer = self.loop.call_later(deadline - now, self._on_timer)

    # -- I/O ----------------------------------------------------------------
    def start(self, banner: Reply) -> None:
        self.loop.add_reader(self.sock, self.on_readable)
        self.reply(banner)
        self.flush()
        if banner.code == 220:
            self.checks.connected()

    def on_readable(self) -> None:
        if self.handshaking:
            if self.handshake is not None:
                self.handshake.step()
            return
        try:
            while True:
                chunk = self.sock.recv(READ_CHUNK)
                if not chunk:
                    self.abort("connection closed by client")
                    return
                self.last_read = self.loop.time()
                if self.closing:
                    break  # input after our last reply is not read any more
                self.inbuf += chunk
                if (self.committing or self.waiting_checks) and len(self.inbuf) > MAX_PENDING_OUTPUT:
                    self.loop.remove_reader(self.sock)  # resumed by flush() after the pause
                if not self.tls or not self.sock.pending() or len(self.inbuf) > READ_CHUNK * 4:
                    break
        except tls.AGAIN:
            pass
        except OSError as exc:  # ssl.SSLError is one
            self.abort(f"read error: {exc}")
            return
        self.resume()

    def reply(self, r: Reply, extra: list[str] | None = None, counts: bool = True) -> None:
        """Queue a reply; an error reply spends the error budget unless ``counts`` is False."""
        if counts and r.is_error and r.code != 421:
            self.errors += 1
        self.out += r.lines(extra)

    def flush(self) -> None:
        if self.closed:
            return
        try:
            send_pending(self.sock, self.out)
        except OSError as exc:  # ssl.SSLError is one
            self.abort(f"write error: {exc}")
            return
        if self.out:
            self.loop.add_writer(self.sock, self.flush)
            if len(self.out) > MAX_PENDING_OUTPUT:
                self.loop.remove_reader(self.sock)
            return
        self.loop.remove_writer(self.sock)  # (nothing to do when the reply went out whole)
        if self.closing:
            self.close()
        elif self.handshaking:
            if self.handshake is None:
                self._begin_tls()  # the 220 to STARTTLS is out: the handshake may start
        elif not self.closed:
            self.loop.add_reader(self.sock, self.on_readable)

    def close_with(self, r: Reply) -> None:
        if self.handshaking:
            # RFC 3207 §4: after our 220 the next bytes on the wire are the TLS handshake's; a reply
            # can go neither in the clear nor through a TLS session not yet set up (a write would
            # only ever want more of the handshake, and the writer would spin). End it now.
            self.close()
            return
        self.reply(r)
        if not self.closing:
            # a client that never reads our last reply must not hold its slot for ever
            self.close_timer = self.loop.call_later(CLOSE_GRACE, self.close)
        self.closing = True
        self.inbuf.clear()
        self.flush()

    def abort(self, why: str) -> None:
        log.debug("[%s] %s", self.ip, why)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.timer.cancel()
        if self.close_timer is not None:
            self.close_timer.cancel()
        self.checks.cancel()
        self.reset_transaction()
        self.loop.forget(self.sock)
        try:
            self.sock.close()
        except OSError:
            pass
        self.host.session_closed(self)

    # -- input processing ---------------------------------------------------------
    def process(self) -> None:
        while self.inbuf and not (self.closing or self.closed or self.handshaking or self.committing or self.waiting_checks):
            if self.data is not None:
                if not self._feed_data():
                    return
                continue
            nl = self.inbuf.find(b"\n")
            if nl < 0:
                if len(self.inbuf) > MAX_COMMAND_LINE:
                    self.inbuf.clear()
                    if not self.discarding_line:
                        # one reply per command (RFC 2920 §3.1), however many reads the line takes
                        self.discarding_line = True
                        self.reply(smtp.LINE_TOO_LONG)
                        self._check_budgets()
                return
            line = bytes(self.inbuf[:nl])
            del self.inbuf[: nl + 1]
            if self.discarding_line:
                self.discarding_line = False
                continue
            if len(line) > MAX_COMMAND_LINE:
                self.reply(smtp.LINE_TOO_LONG)
            elif b"\0" in line:
                self.reply(smtp.NUL_IN_COMMAND)  # never dispatched: a NUL cuts C strings downstream
            else:
                self.dispatch(line.rstrip(b"\r"))
            self._check_budgets()

    def _check_budgets(self) -> None:
        # Postfix's smtpd_hard_error_limit
        if self.errors >= self.cfg.limits.MaximalIncomingErrors and not self.closing:
            self.close_with(smtp.TOO_MANY_ERRORS.format(self.cfg.network.Hostname))

    def dispatch(self, line: bytes) -> None:
        text = line.decode("latin-1")
        verb, _, arg = text.partition(" ")
        entry = VERBS.get(verb.upper())
        if entry is None or entry.junk:
            # Postfix's smtpd_junk_command_limit: past the budget the command is not run.
            self.junk += 1
            if self.junk > self.cfg.limits.MaximalJunkCommands:
                self.close_with(smtp.TOO_MANY_JUNK.format(self.cfg.network.Hostname))
                return
        if entry is None:
            self.reply(smtp.UNKNOWN_COMMAND)
            return
        if self.tls_required and not self.tls and not entry.pre_tls:
            self.reply(smtp.TLS_REQUIRED)
            return
        entry.handler(self, arg.strip())

    # -- verbs ---------------------------------------------------------------------
    def smtp_HELO(self, arg: str) -> None:
        self._hello(arg, esmtp=False)

    def smtp_EHLO(self, arg: str) -> None:
        self._hello(arg, esmtp=True)

    def _hello(self, arg: str, esmtp: bool) -> None:
        # RFC 5321 §4.1.1.1: a domain or address literal; we accept any printable
        # token (as Postfix does) but nothing that could smuggle header text.
        if not arg or len(arg) > 255 or not arg.isprintable() or " " in arg:
            self.reply(smtp.BAD_SYNTAX.format(("EHLO" if esmtp else "HELO") + " hostname"))
            return
        self.reset_transaction()
        self.helo = arg
        self.esmtp = esmtp
        self.checks.helo(arg)
        host = self.cfg.network.Hostname
        if not esmtp:
            self.reply(smtp.R(250, "", host))
            return
        self.out += _ehlo_lines(host, self.max_message_bytes, self.host.ssl_context is not None and not self.tls)

    def smtp_MAIL(self, arg: str) -> None:
        if self.helo is None:
            self.reply(smtp.HELO_FIRST)
            return
        if self.sender is not None:
            self.reply(smtp.BAD_SEQUENCE.format("nested MAIL command"))
            return
        if self.messages >= self.cfg.limits.MaximalIncomingMessagesPerSession:
            self.host.stats.refuse("messages_per_session_limit")
            self.close_with(smtp.TOO_MANY_MESSAGES.format(self.cfg.network.Hostname))
            return
        try:
            address, params = smtp.parse_path(arg, "FROM", allow_null=True)
            if params and not self.esmtp:
                raise SyntaxProblem(smtp.UNKNOWN_PARAM.format("ESMTP parameters need EHLO"))
            mail = smtp.mail_params(smtp.parse_params(params))
        except SyntaxProblem as problem:
            self.reply(problem.reply)
            return
        if mail.size is not None and mail.size > self.max_message_bytes:
            self.host.stats.refuse("message_size_limit")
            self.reply(smtp.SIZE_EXCEEDED)  # RFC 1870 §6.1
            return
        if self.session_bytes + (mail.size or 0) > self.max_session_bytes:
            self.host.stats.refuse("session_size_limit")
            self.reply(smtp.SESSION_SIZE_EXCEEDED)
            return
        if not self.host.queue_has_space():
            self.reply(smtp.NO_STORAGE)
            return
        if not self.flow_admitted and not self.host.admit_mail(self._flow_admitted, self.messages == 0):
            self._take_up_later("MAIL", arg)  # mail arrives faster than it is scanned (InFlowDelay)
            return
        self.flow_admitted = False
        self.sender, self.mail = address, mail
        self.checks.mail(address)
        self.set_timeout(self.cfg.timeouts.ReceivingCommandTimeout)
        self.reply(smtp.SENDER_OK)

    def smtp_RCPT(self, arg: str) -> None:
        if self.sender is None:
            self.reply(smtp.BAD_SEQUENCE.format("need MAIL before RCPT"))
            return
        if not self.checks.when_ready(self._checks_ready):
            self._take_up_later("RCPT", arg)  # DNS facts for the access rules are still coming
            return
        try:
            address, params = smtp.parse_path(arg, "TO", allow_null=False, local_ok=("postmaster",))
            if params and not self.esmtp:
                raise SyntaxProblem(smtp.UNKNOWN_PARAM.format("ESMTP parameters need EHLO"))
            rparams = smtp.rcpt_params(smtp.parse_params(params))
        except SyntaxProblem as problem:
            self.rcpt_refused += 1
            self.reply(problem.reply)
            return
        if len(self.rcpts) >= self.cfg.limits.MaximalIncomingRcptsPerMessage:
            self.host.stats.refuse("recipients_limit")
            # RFC 5321 §4.5.3.1.10: the client sends the message to the recipients accepted and
            # retries the others; a long pipelined list is no client error (Postfix's
            # smtpd_recipient_overshoot_limit), else it would lose its session before DATA.
            self.rcpt_overshoot += 1
            self.reply(smtp.TOO_MANY_RCPTS, counts=self.rcpt_overshoot > MAX_RCPT_OVERSHOOT)
            return
        if "@" not in address:
            # RFC 5321 §4.5.1: <Postmaster> without a domain is always accepted;
            # it means this gateway's postmaster.
            address = self.cfg.network.Postmaster
        elif not (decision := relay_verdict(self.host.cfg, self.ip, address)).allowed:
            self.rcpt_refused += 1
            self.host.stats.refuse("relay")
            log.info("relay denied: client=[%s] rcpt=<%s> rule=%s", self.ip, address, decision.why)
            self.reply(smtp.RELAY_DENIED.format(address))
            return
        elif (refusal := self.checks.decide(address)) is not None:
            self.rcpt_refused += 1
            self.host.stats.refuse("access_rule")
            log.info("access rule refused: client=[%s] rcpt=<%s>: %s", self.ip, address, refusal.text)
            self.reply(refusal)
            return
        elif (refusal := self.host.quota.refuse_recipient(self.cfg, address, self.ip, (r.addr for r in self.rcpts))) is not None:
            self.rcpt_refused += 1
            self.host.stats.refuse("quota")
            self.reply(refusal)
            return
        self.rcpts.append(Recipient(addr=address, orcpt=rparams.orcpt, notify=rparams.notify))
        self.set_timeout(self.cfg.timeouts.ReceivingDataInitiationTimeout)
        self.reply(smtp.RCPT_OK)

    def smtp_DATA(self, arg: str) -> None:
        if arg:
            self.reply(smtp.BAD_SYNTAX.format("DATA"))
            return
        if self.sender is None:
            self.reply(smtp.BAD_SEQUENCE.format("need MAIL command"))
            return
        if not self.rcpts:
            self.reply(smtp.NO_VALID_RCPTS if self.rcpt_refused else smtp.BAD_SEQUENCE.format("need RCPT command"))
            return
        self.qid = new_id()
        try:
            self.tmp = self.host.committer.take_tmp()
        except OSError as exc:
            log.error("cannot create queue file: %s", exc)
            self._discard_tmp()
            self.reply(smtp.NO_STORAGE if exc.errno == errno.ENOSPC else smtp.LOCAL_ERROR)
            return
        remaining = self.max_session_bytes - self.session_bytes
        self.data = DataReader(self.tmp.fd, min(self.max_message_bytes, remaining), self.cfg.limits.MaximalIncomingHops,
                               prefix=self._received_header(),
                               normalize_lf=self.cfg.network.BareNewline == "normalize")
        self.set_timeout(self.cfg.timeouts.ReceivingDataTerminationTimeout)
        self.reply(smtp.START_DATA)

    def _received_header(self) -> bytes:
        """The trace field (RFC 5321 §4.4), protocol names per RFC 3848."""
        proto = ("ESMTPS" if self.tls else "ESMTP") if self.esmtp else ("SMTPS" if self.tls else "SMTP")
        host = self.cfg.network.Hostname
        rcpt = f"\r\n\tfor <{self.rcpts[0].addr}>" if len(self.rcpts) == 1 else ""
        helo = "".join(c for c in (self.helo or "") if c.isprintable() and c not in "()")
        return (
            f"Received: from {helo} ({self.checks.client_name or 'unknown'} [{self.ip}])\r\n"
            f"\tby {host} (smtpgw) with {proto} id {self.qid}{rcpt};\r\n"
            f"\t{_trace_date()}\r\n"
        ).encode("utf-8", "replace")

    def _feed_data(self) -> bool:
        """Feed buffered input to the DataReader; True when end-of-data was handled."""
        assert self.data is not None
        chunk = bytes(self.inbuf)
        self.inbuf.clear()
        try:
            consumed = self.data.feed(chunk)
        except OSError as exc:
            log.error("%s: write to queue failed: %s", self.qid, exc)
            self._discard_tmp()
            self.close_with(smtp.LOCAL_ERROR)
            return False
        if consumed < 0:
            return False
        self.inbuf[:0] = chunk[consumed:]
        self._end_of_data()
        return True

    def _end_of_data(self) -> None:
        reader = self.data
        assert reader is not None and self.mail is not None and self.qid is not None
        self.session_bytes += reader.size
        refusal: tuple[str, Reply] | None = None
        if reader.bare_newline:
            refusal = ("bare_newline", smtp.BARE_NEWLINE)
        elif reader.nul:
            refusal = ("nul_character", smtp.NUL_IN_DATA)
        elif reader.long_line:
            refusal = ("line_length", smtp.DATA_LINE_TOO_LONG)
        elif reader.too_big:
            over_session = reader.size <= self.max_message_bytes
            refusal = (
                ("session_size_limit", smtp.SESSION_SIZE_EXCEEDED)
                if over_session
                else ("message_size_limit", smtp.SIZE_EXCEEDED)
            )
        elif reader.hops > reader.max_hops:
            refusal = ("hops_limit", smtp.HOPS_EXCEEDED)
        elif (deferred := self.host.quota.refuse_message(self.cfg, reader.size, self.ip)) is not None:
            refusal = ("quota", deferred)
        if refusal is not None:
            self.host.stats.refuse(refusal[0])
            log.info("refused message from [%s] <%s>: %s", self.ip, self.sender, refusal[1].text)
            self.reset_transaction()
            self.set_timeout(self.cfg.timeouts.ReceivingCommandTimeout)
            self.reply(refusal[1])
            return
        env = Envelope(
            id=self.qid,
            sender=self.sender or "",
            recipients=self.rcpts,
            client_ip=self.ip,
            client_name=self.checks.client_name,
            dnsbl=list(self.checks.dnsbl_listed),
            helo=self.helo or "",
            received_at=time.time(),
            size=reader.size,
            body="8BITMIME" if (self.mail.body == "8BITMIME" or reader.has_8bit) else "7BIT",
            esmtp=self.esmtp,
            ret=self.mail.ret,
            envid=self.mail.envid,
            message_id=reader.message_id,
            tls=self.tls,
            dkim_signed=reader.dkim_signed,
        )
        try:
            reader.finish()
        except OSError as exc:
            log.error("%s: write to queue failed: %s", self.qid, exc)
            self.reset_transaction()
            self.reply(smtp.NO_STORAGE if exc.errno == errno.ENOSPC else smtp.LOCAL_ERROR)
            return
        tmp, self.tmp = self.tmp, None
        assert tmp is not None
        self.data = None
        self.qid = None
        self.reset_transaction()
        # Reply 250 only once the message is durable; meanwhile read nothing more
        # (replies must keep the order of the commands, RFC 2920 §3.1).
        self.committing = True
        self.host.committer.submit(env, tmp, lambda error: self._committed(env, error))

    def _committed(self, env: Envelope, error: BaseException | None) -> None:
        self.committing = False
        if error is not None:
            log.error("%s: cannot store message: %s", env.id, error)
            no_space = isinstance(error, OSError) and error.errno == errno.ENOSPC
            reply = smtp.NO_STORAGE if no_space else smtp.LOCAL_ERROR
        else:
            self.messages += 1
            flags = ("E" if env.esmtp else "") + ("D" if env.ret or env.envid or any(r.notify or r.orcpt for r in env.recipients) else "")
            event(
                env.id,
                "RECEIVED, from=<%s>, nrcpt=%d, size=%d, client=[%s], helo=<%s>, message_id=%s, flags=%s",
                env.sender, len(env.recipients), env.size, env.client_ip, env.helo, env.message_id or "", flags,
            )
            try:
                self.host.message_received(env)  # even if the client has gone meanwhile: it is ours now
            except Exception:  # the message is durable in WFC: recovery or a retry picks it up
                log.exception("%s: hand-off to the scanner failed", env.id)
            reply = smtp.QUEUED.format(env.id)
        if self.closed:
            return
        self.set_timeout(self.cfg.timeouts.ReceivingCommandTimeout)
        self.reply(reply)
        self.resume()

    def _take_up_later(self, verb: str, arg: str) -> None:
        """Put the command back in front of the pipelined input (as ``dispatch`` decoded it) and
        pause until ``_checks_ready`` resumes the session."""
        self.inbuf[:0] = f"{verb} {arg}\r\n".encode("latin-1")
        self.waiting_checks = True

    def _flow_admitted(self) -> None:
        self.flow_admitted = True
        self._checks_ready()

    def _checks_ready(self) -> None:
        self.waiting_checks = False
        if not self.closed:
            self.resume()

    def resume(self) -> None:
        """Go on with buffered (pipelined) input after a pause."""
        try:
            self.process()
        except Exception:
            log.exception("session with [%s] failed", self.ip)
            self.close_with(smtp.LOCAL_ERROR)
            return
        self.flush()

    def smtp_RSET(self, arg: str) -> None:
        if arg:  # RFC 5321 §4.1.1.5: "RSET" CRLF, no parameters (Postfix: 501 Syntax: RSET)
            self.reply(smtp.BAD_SYNTAX.format("RSET"))
            return
        self.reset_transaction()
        self.set_timeout(self.cfg.timeouts.ReceivingCommandTimeout)
        self.reply(smtp.RESET_OK)

    def smtp_NOOP(self, arg: str) -> None:
        self.reply(smtp.OK)

    def smtp_QUIT(self, arg: str) -> None:
        self.close_with(smtp.CLOSING)

    def smtp_VRFY(self, arg: str) -> None:
        self.reply(smtp.VRFY if arg else smtp.BAD_SYNTAX.format("VRFY address"))

    def smtp_EXPN(self, arg: str) -> None:
        # RFC 5321 §3.5.2: EXPN is optional; a relay does not disclose list members.
        self.reply(smtp.NOT_IMPLEMENTED)

    def smtp_HELP(self, arg: str) -> None:
        self.reply(smtp.HELP)

    def smtp_STARTTLS(self, arg: str) -> None:
        if self.host.ssl_context is None:
            self.reply(smtp.NOT_IMPLEMENTED)
            return
        if arg:
            self.reply(smtp.BAD_SYNTAX.format("STARTTLS"))
            return
        if self.tls:
            self.reply(smtp.ALREADY_TLS)
            return
        if self.inbuf:
            # CVE-2011-0411: commands pipelined after STARTTLS were sent in the
            # clear; they must not be executed inside the TLS session.
            log.warning("discarded %d bytes sent after STARTTLS by [%s]", len(self.inbuf), self.ip)
            self.inbuf.clear()
        self.reply(smtp.START_TLS)
        self.handshaking = True
        self.loop.remove_reader(self.sock)
        self.flush()  # starts the handshake once the 220 is out

    def _begin_tls(self) -> None:
        assert self.host.ssl_context is not None
        try:
            self.sock = tls.wrap(self.loop, self.host.ssl_context, self.sock, server_side=True)
        except OSError as exc:  # ssl.SSLError is one
            self.abort(f"TLS setup failed: {exc}")
            return
        self.handshake = tls.Handshake(self.loop, self.sock, self._tls_started, self._tls_failed)
        self.handshake.step()

    def _tls_failed(self, exc: OSError) -> None:
        log.info("TLS handshake with [%s] failed: %s", self.ip, exc)
        self.close()

    def _tls_started(self) -> None:
        self.handshaking = False
        self.tls = True
        # RFC 3207 §4.2: forget everything learnt before TLS; the client says EHLO again.
        self.helo = None
        self.esmtp = False
        self.reset_transaction()
        self.loop.add_reader(self.sock, self.on_readable)
        if self.sock.pending():
            self.on_readable()


VERBS: dict[str, Verb] = {
    "HELO": Verb(Session.smtp_HELO, pre_tls=True),
    "EHLO": Verb(Session.smtp_EHLO, pre_tls=True),
    "MAIL": Verb(Session.smtp_MAIL),
    "RCPT": Verb(Session.smtp_RCPT),
    "DATA": Verb(Session.smtp_DATA),
    "RSET": Verb(Session.smtp_RSET, pre_tls=True, junk=True),
    "NOOP": Verb(Session.smtp_NOOP, pre_tls=True, junk=True),
    "QUIT": Verb(Session.smtp_QUIT, pre_tls=True),
    "VRFY": Verb(Session.smtp_VRFY, junk=True),
    "EXPN": Verb(Session.smtp_EXPN, junk=True),
    "HELP": Verb(Session.smtp_HELP, pre_tls=True, junk=True),
    "STARTTLS": Verb(Session.smtp_STARTTLS, pre_tls=True),
}


class Listener:
    """One listening socket (``ListenOn``); hands accepted connections to ``on_connection``."""

    def __init__(self, loop: EventLoop, host: str, port: int,
                 on_connection: Callable[[socket.socket, tuple], None]) -> None:
        self.loop = loop
        self.on_connection = on_connection
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self.sock.bind((host, port))
            self.sock.listen(1024)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()  # a refused reload must not keep the socket open
            raise
        self.address = self.sock.getsockname()[:2]

    def start(self) -> None:
        self.loop.add_reader(self.sock, self.on_accept)

    def on_accept(self) -> None:
        for _ in range(64):  # bounded: other sockets get their turn
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("accept failed: %s", exc)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # replies are small writes
            self.on_connection(conn, peer)

    def close(self) -> None:
        self.loop.forget(self.sock)
        self.sock.close()


def client_address(peer: tuple) -> str:
    """The client's address as sessions, limits and logs name it (an IPv4-mapped one as IPv4)."""
    ip: str = peer[0]
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


class Sessions:
    """The open inbound sessions and their admission at connect: at most ``IncomingSessions`` in all
    and ``MaximalIncomingSessionsPerIP`` per client address (421 beyond, counted as connection
    errors), and 421 to every client while the gateway does not accept mail (receiving off, stopping).
    Sessions served by other processes (IncomingProcesses) count too: ``admit`` may hand an
    admitted connection ``elsewhere``, and ``closed_elsewhere`` says when such a session ended."""

    def __init__(self) -> None:
        self.open: set[Session] = set()
        self.per_ip: Counter[str] = Counter()
        self.elsewhere = 0  # sessions handed to other processes and not yet closed

    def admit(self, host: Inbound, conn: socket.socket, peer: tuple, accepting: bool,
              elsewhere: Callable[[socket.socket, tuple], bool] | None = None) -> Session | None:
        """Admit or refuse a connection; an admitted one is offered to ``elsewhere`` first, which
        returns True when it took it (None is returned then), else a session here serves it."""
        ip = client_address(peer)
        self.per_ip[ip] += 1
        host.stats.connection_opened()
        refusal = self._refusal(host, ip, accepting)
        if refusal is None and elsewhere is not None and elsewhere(conn, peer):
            self.elsewhere += 1
            return None
        session = Session(host, conn, peer)
        self.open.add(session)
        if refusal is None:
            session.start(greeting(host.cfg.network.Hostname))
            return session
        session.start(refusal)
        session.closing = True
        session.flush()
        return session

    def _refusal(self, host: Inbound, ip: str, accepting: bool) -> Reply | None:
        """The 421 a new connection from ``ip`` gets (RFC 5321 §3.8), or None when it is admitted."""
        name = host.cfg.network.Hostname
        limits = host.cfg.limits
        if not accepting:
            return smtp.SERVICE_UNAVAILABLE.format(name)
        if len(self.open) + self.elsewhere + 1 > limits.IncomingSessions:
            host.stats.inc("mta_incoming_connections_errors")
            return smtp.TOO_MANY_SESSIONS.format(name)
        if self.per_ip[ip] > limits.MaximalIncomingSessionsPerIP:
            host.stats.inc("mta_incoming_connections_errors")
            return smtp.TOO_MANY_FROM_IP.format(name)
        return None

    def closed(self, session: Session) -> None:
        self.open.discard(session)
        self._release(session.host, session.ip)

    def closed_elsewhere(self, host: Inbound, ip: str) -> None:
        """A session ``admit`` handed to another process has ended (or its process has)."""
        self.elsewhere -= 1
        self._release(host, ip)

    def _release(self, host: Inbound, ip: str) -> None:
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]
        host.stats.inc("mta_incoming_connections_current", -1)
