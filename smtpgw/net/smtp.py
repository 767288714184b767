"""SMTP grammar shared by the receiver and the sender.

Owns: every reply the gateway sends (code + enhanced status code + text, one
table), reply parsing for the client side, envelope address parsing (RFC 5321
§4.1.2), ESMTP parameter parsing (SIZE RFC 1870, BODY RFC 6152, DSN RFC 3461),
xtext (RFC 3461 §4), dot-stuffing (RFC 5321 §4.5.2), and telling a mailbox
whose local part carries sender-specified routing (``routed``).

Must never: accept an address or parameter that does not match the grammar
(a validation failure is a hard error path, cf. CVE-2020-7247), or build a
reply from client-supplied text without stripping CR/LF.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: basic code (RFC 5321 §4.2), enhanced code (RFC 3463), text."""

    code: int
    status: str
    text: str

    def __post_init__(self) -> None:
        # RFC 3463 §2: the class digit of the enhanced code matches the reply's first digit.
        if self.status and self.status[0] != str(self.code)[0]:
            raise ValueError(f"enhanced status {self.status} does not fit {self.code}")

    def format(self, *args: object) -> "Reply":
        return Reply(self.code, self.status, self.text.format(*args))

    def lines(self, extra: list[str] | None = None) -> bytes:
        """Wire form; ``extra`` lines become a multi-line reply (RFC 5321 §4.2.1)."""
        if not extra:
            return self.wire
        return self._wire(extra)

    @functools.cached_property
    def wire(self) -> bytes:
        """The one-line wire form, built once per reply (most replies are the table's constants)."""
        return self._wire([])

    def _wire(self, extra: list[str]) -> bytes:
        texts = extra + [self.text]
        out = []
        for index, text in enumerate(texts):
            text = text.replace("\r", " ").replace("\n", " ")
            sep = " " if index == len(texts) - 1 else "-"
            prefix = f"{self.status} " if self.status else ""
            out.append(f"{self.code}{sep}{prefix}{text}\r\n")
        return "".join(out).encode("utf-8", "replace")

    @property
    def is_error(self) -> bool:
        return self.code >= 400


R = Reply
# --- the gateway's replies, one table (cf. aiosmtpd testing/statuscodes.py) ---
GREETING = R(220, "", "{} ESMTP smtpgw")
CLOSING = R(221, "2.0.0", "Bye")
OK = R(250, "2.0.0", "Ok")
SENDER_OK = R(250, "2.1.0", "Ok")
RCPT_OK = R(250, "2.1.5", "Ok")
QUEUED = R(250, "2.0.0", "Ok: queued as {}")
RESET_OK = R(250, "2.0.0", "Ok")
HELP = R(214, "2.0.0", "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS")
VRFY = R(252, "2.5.0", "Cannot VRFY user; try RCPT to attempt delivery")  # RFC 5321 §3.5.3
START_DATA = R(354, "", "End data with <CR><LF>.<CR><LF>")
START_TLS = R(220, "2.0.0", "Ready to start TLS")
SERVICE_UNAVAILABLE = R(421, "4.3.2", "{} Service not available, closing transmission channel")
TOO_MANY_SESSIONS = R(421, "4.3.2", "{} Too many connections, try again later")
TOO_MANY_FROM_IP = R(421, "4.7.0", "{} Too many connections from your address")
TIMEOUT = R(421, "4.4.2", "{} Error: timeout exceeded")
TOO_MANY_ERRORS = R(421, "4.7.0", "{} Error: too many errors")
TOO_MANY_JUNK = R(421, "4.7.0", "{} Error: too many junk commands")
TOO_MANY_MESSAGES = R(421, "4.7.0", "{} Error: too many messages in one session")
SHUTTING_DOWN = R(421, "4.3.0", "{} Shutting down")
LOCAL_ERROR = R(451, "4.3.0", "Local error in processing; try again later")
NO_STORAGE = R(452, "4.3.1", "Insufficient system storage")
TOO_MANY_RCPTS = R(452, "4.5.3", "Too many recipients")  # RFC 5321 §4.5.3.1.10
TLS_REQUIRED = R(530, "5.7.0", "Must issue a STARTTLS command first")  # RFC 3207 §4
LINE_TOO_LONG = R(500, "5.5.2", "Line too long")  # RFC 5321 §4.5.3.1.4
DATA_LINE_TOO_LONG = R(500, "5.5.6", "Message line longer than 1000 octets")  # §4.5.3.1.6
UNKNOWN_COMMAND = R(500, "5.5.1", "Command unrecognized")
BAD_SYNTAX = R(501, "5.5.4", "Syntax: {}")
# RFC 5321 §4.1.2: no production of the command grammar admits NUL; RFC 3463 X.5.2 syntax error.
NUL_IN_COMMAND = R(501, "5.5.2", "NUL character in command is not allowed")
BAD_SENDER = R(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = R(501, "5.1.3", "Bad recipient address syntax")
BAD_PARAM = R(501, "5.5.4", "Invalid parameter: {}")
NOT_IMPLEMENTED = R(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = R(503, "5.5.1", "Bad sequence of commands: {}")
HELO_FIRST = R(503, "5.5.1", "Send HELO/EHLO first")
ALREADY_TLS = R(503, "5.5.1", "TLS already active")
NO_VALID_RCPTS = R(554, "5.5.1", "No valid recipients")  # RFC 5321 §3.3
RELAY_DENIED = R(550, "5.7.1", "<{}>: Relay access denied")
ACCESS_DENIED = R(554, "5.7.1", "Access denied: {}")
UNVERIFIED = R(450, "4.7.25", "Cannot verify {} now; try again later")  # a DNS check failed
BARE_NEWLINE = R(550, "5.6.2", "Bare <CR> or <LF> in message data is not allowed")
# RFC 2045 §2.7-2.8: neither 7bit nor 8bit data holds NUL; only BINARYMIME (RFC 3030 §3) carries
# it, and it is not offered. RFC 3463 X.6.0: a media error.
NUL_IN_DATA = R(550, "5.6.0", "NUL character in message data is not allowed (BINARYMIME is not offered)")
SIZE_EXCEEDED = R(552, "5.3.4", "Message size exceeds fixed limit")  # RFC 1870 §6
# The message would fit in a new session: a temporary refusal (RFC 5321 §4.2.1, RFC 1870 §6.2's 452),
# not 552, which makes the client bounce it.
SESSION_SIZE_EXCEEDED = R(452, "4.3.1", "Session size limit reached; send it in a new session")
HOPS_EXCEEDED = R(554, "5.4.6", "Too many hops: mail loop detected")  # RFC 5321 §6.3
UNKNOWN_PARAM = R(555, "5.5.4", "Unsupported parameter: {}")  # RFC 5321 §4.1.1.11
UTF8_ADDRESS = R(553, "5.6.7", "Non-ASCII address requires SMTPUTF8, which is not offered")

# --- addresses: RFC 5321 §4.1.2 -------------------------------------------------
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*\.?"
_LITERAL = r"\[(?:[0-9.]{7,15}|IPv6:[0-9A-Fa-f:.]{2,45})\]"
MAILBOX = re.compile(rf"^(?:{_DOT_STRING}|{_QUOTED})@(?:{_DOMAIN}|{_LITERAL})$")
_SOURCE_ROUTE = re.compile(rf"^@{_DOMAIN}(?:,@{_DOMAIN})*:")
# A path in angle brackets; a ">" in a quoted local part does not end it (RFC 5321 §4.1.2 qtextSMTP).
_BRACKETED = re.compile(r'<((?:[^">]|"(?:[^"\\]|\\.)*")*)>')
MAX_LOCAL_PART = 64  # RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255  # §4.5.3.1.2
MAX_PATH = 256  # §4.5.3.1.3


class SyntaxProblem(ValueError):
    """A command argument that does not fit the grammar; ``reply`` says how to answer."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


def _path_usage(keyword: str) -> Reply:
    """The reply to a MAIL FROM or RCPT TO argument that is not a path (built only when needed)."""
    return BAD_SYNTAX.format(f"{'MAIL FROM' if keyword == 'FROM' else 'RCPT TO'}:<address>")


def parse_path(arg: str, keyword: str, allow_null: bool, local_ok: tuple[str, ...] = ()) -> tuple[str, str]:
    """Split ``FROM:<addr> params`` into (address, parameter text).

    ``local_ok`` lists local parts accepted without a domain (``postmaster``).

    Tolerates a space after the colon and a missing pair of angle brackets,
    as Postfix does, but nothing else.
    """
    if not arg[: len(keyword) + 1].upper() == keyword + ":":
        raise SyntaxProblem(_path_usage(keyword))
    rest = arg[len(keyword) + 1 :].lstrip(" ")
    if rest.startswith("<"):
        bracketed = _BRACKETED.match(rest)
        if bracketed is None:
            raise SyntaxProblem(BAD_SYNTAX.format("missing '>'"))
        path, params = bracketed.group(1), rest[bracketed.end() :]
        if params and not params.startswith(" "):
            raise SyntaxProblem(BAD_SYNTAX.format("garbage after '>'"))
    else:
        path, _, params = rest.partition(" ")
        if not path:
            raise SyntaxProblem(_path_usage(keyword))  # RFC 5321 §4.1.2: the null reverse-path is "<>", not nothing
    # RFC 5321 §4.1.2 and Appendix C: a source route is accepted and ignored (as Postfix does); only
    # the mailbox after it is kept, so the route never reaches the next hop.
    path = _SOURCE_ROUTE.sub("", path)
    bad = BAD_SENDER if keyword == "FROM" else BAD_RECIPIENT
    if path == "":
        if allow_null:
            return "", params.strip()
        raise SyntaxProblem(bad)
    if not path.isascii():
        raise SyntaxProblem(UTF8_ADDRESS)
    if path.lower() in local_ok:
        return path, params.strip()
    if len(path) > MAX_PATH or not MAILBOX.match(path):
        raise SyntaxProblem(bad)
    local, _, domain = path.rpartition("@")
    if len(local) > MAX_LOCAL_PART or len(domain) > MAX_DOMAIN:
        raise SyntaxProblem(bad)
    return path, params.strip()


# Routing operators inside a local part: "@" (in a quoted local part), "%" (the percent hack) and
# "!" (UUCP bang paths). RFC 5321 §3.6.1 leaves relaying such mail to the server's policy; a next
# hop may honour them and send the mail on to the host they name.
ROUTING_OPERATORS = frozenset("@%!")


def routed(address: str) -> bool:
    """True when the local part of ``address`` (quotes and quoted-pairs undone) holds a routing operator.

    As Postfix's resolver flags a recipient as routed (RESOLVE_FLAG_ROUTED): ``user%other.test@d``,
    ``other.test!user@d`` and ``"user@other.test"@d`` are routed; ``user@d`` and ``postmaster`` are not.
    """
    local = address.rpartition("@")[0]
    if local.startswith('"') and local.endswith('"') and len(local) >= 2:
        local = re.sub(r"\\(.)", r"\1", local[1:-1])  # RFC 5321 §4.1.2 quoted-pairSMTP
    return not ROUTING_OPERATORS.isdisjoint(local)


def parse_params(text: str) -> dict[str, str | None]:
    """``KEY=VALUE KEY ...`` → dict with upper-case keys (RFC 5321 §4.1.2 esmtp-param)."""
    params: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", key) or (eq and not re.fullmatch(r"[\x21-\x3c\x3e-\x7e]+", value)):
            raise SyntaxProblem(BAD_PARAM.format(item[:40]))
        key = key.upper()
        if key in params:
            raise SyntaxProblem(BAD_PARAM.format(f"duplicate {key}"))
        params[key] = value if eq else None
    return params


# --- xtext: RFC 3461 §4 ---------------------------------------------------------
_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*$")


def xtext_decode(value: str) -> str:
    if not _XTEXT.match(value):
        raise ValueError("bad xtext")
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


def xtext_encode(value: str) -> str:
    return "".join(
        c if 0x21 <= ord(c) <= 0x7E and c not in "+=" else f"+{ord(c):02X}" for c in value
    )


@dataclass
class MailParams:
    size: int | None = None
    body: str = "7BIT"
    ret: str | None = None
    envid: str | None = None


@dataclass
class RcptParams:
    notify: list[str] | None = None
    orcpt: str | None = None


def mail_params(params: dict[str, str | None]) -> MailParams:
    """Validate MAIL FROM parameters; unknown ones are an error (RFC 5321 §4.1.1.11)."""
    out = MailParams()
    for key, value in params.items():
        if key == "SIZE":  # RFC 1870 §3
            if value is None or not value.isdigit() or len(value) > 20:
                raise SyntaxProblem(BAD_PARAM.format("SIZE"))
            out.size = int(value)
        elif key == "BODY":  # RFC 6152 §2
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise SyntaxProblem(BAD_PARAM.format("BODY"))
            out.body = value.upper()
        elif key == "RET":  # RFC 3461 §4.3
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise SyntaxProblem(BAD_PARAM.format("RET"))
            out.ret = value.upper()
        elif key == "ENVID":  # RFC 3461 §4.4: xtext, at most 100 characters
            if value is None or len(value) > 100:
                raise SyntaxProblem(BAD_PARAM.format("ENVID"))
            try:
                out.envid = xtext_decode(value)
            except ValueError:
                raise SyntaxProblem(BAD_PARAM.format("ENVID")) from None
            # §4.4: the decoded identifier is printable US-ASCII (as Postfix's allprint check)
            if not (out.envid.isascii() and out.envid.isprintable()):
                raise SyntaxProblem(BAD_PARAM.format("ENVID"))
        else:
            raise SyntaxProblem(UNKNOWN_PARAM.format(key[:40]))
    return out


def rcpt_params(params: dict[str, str | None]) -> RcptParams:
    """Validate RCPT TO parameters (RFC 3461 §4.1, §4.2)."""
    out = RcptParams()
    for key, value in params.items():
        if key == "NOTIFY":
            items = (value or "").upper().split(",")
            allowed = {"SUCCESS", "FAILURE", "DELAY"}
            if items == ["NEVER"]:
                out.notify = ["NEVER"]
            elif items and all(i in allowed for i in items) and len(set(items)) == len(items):
                out.notify = items
            else:
                raise SyntaxProblem(BAD_PARAM.format("NOTIFY"))
        elif key == "ORCPT":
            addr_type, semi, xtext = (value or "").partition(";")
            if not semi or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", addr_type) or len(value or "") > 500:
                raise SyntaxProblem(BAD_PARAM.format("ORCPT"))
            try:
                decoded = xtext_decode(xtext)
            except ValueError:
                raise SyntaxProblem(BAD_PARAM.format("ORCPT")) from None
            if any(c in decoded for c in "\r\n\0"):
                raise SyntaxProblem(BAD_PARAM.format("ORCPT"))
            out.orcpt = f"{addr_type.lower()};{decoded}"
        else:
            raise SyntaxProblem(UNKNOWN_PARAM.format(key[:40]))
    return out


# --- client side ------------------------------------------------------------------
@dataclass
class ServerReply:
    """A reply read from a peer: code and the joined text lines."""

    code: int
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    def __str__(self) -> str:
        return f"{self.code} {self.text}"[:500]


class ReplyParser:
    """Incremental parser of (multi-line) SMTP replies (RFC 5321 §4.2.1)."""

    MAX_LINE = 4096
    MAX_LINES = 200

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[str] = []

    @property
    def pending(self) -> bool:
        """Bytes or lines of a reply not yet complete."""
        return bool(self._buffer or self._lines)

    def feed(self, data: bytes) -> list[ServerReply]:
        self._buffer += data
        replies: list[ServerReply] = []
        while True:
            nl = self._buffer.find(b"\n")
            if nl < 0:
                if len(self._buffer) > self.MAX_LINE:
                    raise ValueError("reply line too long")
                return replies
            line = bytes(self._buffer[:nl]).rstrip(b"\r").decode("utf-8", "replace")
            del self._buffer[: nl + 1]
            if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
                raise ValueError(f"malformed reply line: {line[:80]!r}")
            self._lines.append(line[4:])
            if len(self._lines) > self.MAX_LINES:
                raise ValueError("too many reply lines")
            if len(line) == 3 or line[3] == " ":
                replies.append(ServerReply(int(line[:3]), self._lines))
                self._lines = []


def dot_stuff(chunk: bytes, at_line_start: bool) -> tuple[bytes, bool]:
    """Dot-stuff one chunk of CRLF text (RFC 5321 §4.5.2); returns (bytes, ends at line start)."""
    out = chunk.replace(b"\r\n.", b"\r\n..")
    if at_line_start and out.startswith(b"."):
        out = b"." + out
    # A chunk ending in CR, with LF first in the next chunk: the caller keeps
    # chunk boundaries on line ends (see sender), so "line start" is exact.
    return out, out.endswith(b"\r\n")
