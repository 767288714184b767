"""Notifications about scan events, the template language, and the disclaimer.

Owns:
* the template language of notify.tmpl, dsn.tmpl, disclaimer.tmpl and digest.tmpl (kmg-spec §5.2, §10),
  checked when a template is loaded (`load_template`, `load_templates`) and rendered here;
* the admin / sender / recipient notifications about anti-virus and anti-spam events
  (kmg-spec §1.3, §5.1): `build_notification`;
* the disclaimer (kmg-spec §5.4): `render_disclaimer` and `add_disclaimer`, which appends a
  text/plain part and keeps every byte of the parts already there.

Must never: put a value into a header field without removing CR, LF and NUL first (header
injection, CPython gh-121650); re-serialise the original message through ``email.generator``;
send anything (callers queue the bytes they get back); raise on a malformed message in
`add_disclaimer`.

Template language
-----------------
A template is UTF-8 text of at most 8 KB.

* ``%NAME%`` is replaced by the value of macro NAME; a name the template kind does not know
  is an error when the template is loaded.
* ``%%`` is a literal percent sign; any other ``%`` is an error.
* ``%BEGIN_X%`` ... ``%END_X%`` is a block. A *list* block (OBJECTS, RECIPIENTS) is repeated
  once per item, and the item macros (``%OBJECT_NAME%`` ...) are valid only inside it; list
  blocks do not nest. A *condition* block (FOR_ADMIN, BLOCKED, FAILURE ...) is kept or dropped.
  A block marker alone on its line takes that line with it, so blocks leave no blank lines.
* A line starting with ``%#`` is a comment.
* notify.tmpl and dsn.tmpl begin with header lines (``Subject:`` required, ``X-...:``
  allowed), then an empty line, then the body. A macro value is always one line: its control
  characters (CR and LF included) become spaces, wherever it is put.
"""

from __future__ import annotations

import binascii
import bisect
import email.utils
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from email.header import decode_header
from typing import Any, Mapping, Sequence, Union

from smtpgw import PRODUCT, __version__

from smtpgw.mail import fields, headers

__all__ = [
    "KINDS",
    "SCHEMAS",
    "Schema",
    "Template",
    "TemplateError",
    "add_disclaimer",
    "build_notification",
    "compose_text",
    "decode_subject",
    "encode_text",
    "event_context",
    "flag",
    "format_address",
    "get_template",
    "load_template",
    "load_templates",
    "local_time",
    "message_id",
    "new_boundary",
    "one_line",
    "render_disclaimer",
    "text_part_headers",
]

log = logging.getLogger("smtpgw.reports.notify")

KINDS = ("admin", "sender", "recipient")
MAX_TEMPLATE_BYTES = 8 * 1024  # kmg-spec §10
MAX_ITEMS = 1000  # items rendered per list block
MAX_VALUE_CHARS = 4096  # one macro value
MAX_OUTPUT_CHARS = 1 << 20  # one rendered template
MAX_DEPTH = 8  # nested blocks
MAX_LINE = 998  # RFC 5322 §2.1.1


class TemplateError(ValueError):
    """A template that cannot be used: missing, too big, not UTF-8, or with a syntax error."""


# --- template kinds --------------------------------------------------------------------


@dataclass(frozen=True)
class Schema:
    """What one kind of template may use."""

    name: str
    has_headers: bool
    macros: frozenset[str]
    lists: Mapping[str, frozenset[str]]  # list block -> the item macros valid inside it
    conditions: frozenset[str]


_EVENT_MACROS = frozenset(
    {
        "SENDER", "ALL_RECIPIENTS", "SUBJECT", "QUEUE_ID", "MESSAGE_ID", "GROUP", "STATUS",
        "VIRUSES", "ACTION", "CLIENT_IP", "CLIENT_NAME", "HELO", "SIZE", "DATE", "TIME",
        "RECEIVED_DATE", "RECEIVED_TIME", "PRODUCT", "SPAM_STATUS", "SPAM_METHOD",
        "OBJECT_COUNT",
    }
)
_EVENT_LISTS = {
    "OBJECTS": frozenset({"OBJECT_NAME", "OBJECT_STATUS", "OBJECT_VIRUSES", "OBJECT_ACTION"}),
    "RECIPIENTS": frozenset({"RECIPIENT"}),
}
_EVENT_CONDITIONS = frozenset({"BLOCKED", "DELIVERED", "SPAM"})

SCHEMAS: dict[str, Schema] = {
    "notify": Schema(
        "notify", True, _EVENT_MACROS, _EVENT_LISTS,
        _EVENT_CONDITIONS | {"FOR_ADMIN", "FOR_SENDER", "FOR_RECIPIENT"},
    ),
    "disclaimer": Schema("disclaimer", False, _EVENT_MACROS, _EVENT_LISTS, _EVENT_CONDITIONS),
    "dsn": Schema(
        "dsn", True,
        frozenset(
            {
                "SENDER", "REPORTING_MTA", "POSTMASTER", "QUEUE_ID", "ENVID", "ARRIVAL_DATE",
                "RETRY_UNTIL", "SUBJECT", "MESSAGE_ID", "DATE",
            }
        ),
        {
            "RECIPIENTS": frozenset(
                {"RCPT", "RCPT_ORCPT", "RCPT_ACTION", "RCPT_STATUS", "RCPT_DIAG", "RCPT_REMOTE_MTA"}
            )
        },
        frozenset({"FAILURE", "DELAY", "SUCCESS", "FULL_MESSAGE", "HEADERS_ONLY"}),
    ),
    # the quarantine digest (smtpgw.digest): optional, loaded only where it is used
    "digest": Schema(
        "digest", True,
        frozenset({"RECIPIENT", "ITEM_COUNT", "DATE", "TIME", "PRODUCT", "HOSTNAME", "CONSOLE_URL"}),
        {
            "ITEMS": frozenset(
                {"ITEM_ID", "ITEM_DATE", "ITEM_TIME", "ITEM_SENDER", "ITEM_SUBJECT", "ITEM_STATUS",
                 "ITEM_RELEASE", "ITEM_LINK"}
            )
        },
        frozenset({"CONSOLE"}),
    ),
}

# --- the compiled template ---------------------------------------------------------------


@dataclass(frozen=True)
class _Macro:
    name: str


@dataclass(frozen=True)
class _Block:
    name: str
    body: tuple["_Node", ...]


_Node = Union[str, _Macro, _Block]
Values = Mapping[str, str]
Lists = Mapping[str, Sequence[Mapping[str, str]]]


@dataclass(frozen=True)
class Template:
    """A checked template, ready to render."""

    path: str
    schema: Schema
    header: tuple[_Node, ...]
    body: tuple[_Node, ...]

    def render(self, values: Values, lists: Lists) -> tuple[list[tuple[str, str]], str]:
        """(header fields, body text with LF line endings) for these values.

        ``lists`` maps each list block to its items and each condition block to ``[{}]``
        (kept) or ``[]`` (dropped); a block missing from ``lists`` is dropped.
        """
        return _header_fields(_render(self.header, values, lists)), _render(self.body, values, lists)


def flag(on: bool) -> list[dict[str, str]]:
    """The ``lists`` entry for a condition block."""
    return [{}] if on else []


class _Budget:
    def __init__(self, chars: int) -> None:
        self.left = chars


def _render(nodes: tuple[_Node, ...], values: Values, lists: Lists) -> str:
    out: list[str] = []
    _render_into(nodes, values, lists, out, _Budget(MAX_OUTPUT_CHARS))
    return "".join(out)


def _render_into(nodes: tuple[_Node, ...], scope: Values, lists: Lists, out: list[str], budget: _Budget) -> None:
    for node in nodes:
        if budget.left <= 0:
            return
        if isinstance(node, _Block):
            for item in list(lists.get(node.name, ()))[:MAX_ITEMS]:
                _render_into(node.body, {**scope, **item} if item else scope, lists, out, budget)
            continue
        piece = node if isinstance(node, str) else one_line(scope.get(node.name, ""))
        out.append(piece[: budget.left])
        budget.left -= len(piece)


_UNSAFE = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


def one_line(value: Any) -> str:
    """A macro value as one line: control characters become spaces, runs of space collapse.

    This is what keeps a value from starting a header field (CPython gh-121650) or faking a
    line of a notification.
    """
    return " ".join(_UNSAFE.sub(" ", str(value)[:MAX_VALUE_CHARS]).split())


_HEADER_NAME = re.compile(r"(Subject|X-[A-Za-z0-9-]+)[ \t]*:", re.IGNORECASE)


def _header_fields(text: str) -> list[tuple[str, str]]:
    fields: list[tuple[str, str]] = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        if line[0] in " \t":
            if fields:
                name, value = fields[-1]
                fields[-1] = (name, f"{value} {line.strip()}".strip())
            continue
        match = _HEADER_NAME.match(line)
        if match is None:
            continue
        name = "Subject" if match.group(1).lower() == "subject" else match.group(1)
        fields.append((name, line[match.end() :].strip()))
    return fields


# --- loading and checking ------------------------------------------------------------------

_TOKEN = re.compile(r"%(?:(%)|([A-Z][A-Z0-9_]{0,63})%)?")
_MARKER = re.compile(r"%(?:BEGIN|END)_[A-Z][A-Z0-9_]*%")
_BAD_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CACHE: dict[tuple[str, str], tuple[tuple[int, int], Template]] = {}


def load_template(path: str | os.PathLike[str], kind: str | None = None) -> Template:
    """Load and check a template; ``kind`` (notify, dsn, disclaimer) defaults to the file name.

    Raises TemplateError naming the file (and line) for a missing, unreadable, oversized,
    non-UTF-8 template, an unknown macro or block, a stray ``%`` or an unclosed block.
    """
    path = os.fspath(path)
    schema = SCHEMAS.get(kind or os.path.basename(path).split(".")[0])
    if schema is None:
        raise TemplateError(f"{path}: unknown template kind {kind!r} (one of {', '.join(SCHEMAS)})")
    try:
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            key = (os.path.abspath(path), schema.name)
            cached = _CACHE.get(key)
            if cached and cached[0] == (stat.st_mtime_ns, stat.st_size):
                return cached[1]
            data = handle.read(MAX_TEMPLATE_BYTES + 1)
    except OSError as exc:
        raise TemplateError(f"{path}: cannot read template: {exc.strerror or exc}") from None
    if len(data) > MAX_TEMPLATE_BYTES:
        raise TemplateError(f"{path}: template larger than {MAX_TEMPLATE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TemplateError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    template = _compile(text, schema, path)
    if len(_CACHE) > 64:
        _CACHE.clear()
    _CACHE[key] = ((stat.st_mtime_ns, stat.st_size), template)
    return template


# What a group's own TemplatesPath holds: DSNs are the gateway's, from [path] TemplatesPath.
GROUP_KINDS = ("notify", "disclaimer")


# What every [path] TemplatesPath holds; digest.tmpl is optional (smtpgw.digest falls back to the shipped one).
BASE_KINDS = ("notify", "dsn", "disclaimer")


def load_templates(templates_path: str | os.PathLike[str], kinds: Sequence[str] = BASE_KINDS) -> dict[str, Template]:
    """Load ``kinds`` (notify.tmpl, dsn.tmpl and disclaimer.tmpl) from a folder, reporting every problem."""
    loaded: dict[str, Template] = {}
    problems: list[str] = []
    for kind in kinds:
        try:
            loaded[kind] = load_template(os.path.join(templates_path, f"{kind}.tmpl"), kind)
        except TemplateError as exc:
            problems.append(str(exc))
    if problems:
        raise TemplateError("\n".join(problems))
    return loaded


def get_template(source: str | os.PathLike[str] | Template, kind: str) -> Template:
    if isinstance(source, Template):
        if source.schema.name != kind:
            raise TemplateError(f"{source.path}: a {source.schema.name} template, not {kind}")
        return source
    return load_template(source, kind)


def _compile(text: str, schema: Schema, path: str) -> Template:
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    numbered = [(n, line) for n, line in enumerate(lines, 1) if not line.startswith("%#")]
    for number, line in numbered:
        if _BAD_CHARS.search(line):
            raise TemplateError(f"{path}:{number}: control character in template")
    head: list[tuple[int, str]] = []
    if schema.has_headers:
        split = next((i for i, (_, line) in enumerate(numbered) if not line.strip()), len(numbered))
        head, numbered = numbered[:split], numbered[split + 1 :]
        _check_header_lines(head, path)
    return Template(path, schema, _parse(head, schema, path), _parse(numbered, schema, path))


def _check_header_lines(lines: list[tuple[int, str]], path: str) -> None:
    subject = False
    for number, line in lines:
        bare = _MARKER.sub("", line)
        if not bare.strip() or bare[0] in " \t":
            continue
        match = _HEADER_NAME.match(bare)
        if match is None:
            raise TemplateError(
                f"{path}:{number}: header lines may be Subject: or X-...: only "
                "(end the header lines with an empty line)"
            )
        subject = subject or match.group(1).lower() == "subject"
    if not subject:
        first = lines[0][0] if lines else 1
        raise TemplateError(f"{path}:{first}: the template must begin with a Subject: line")


def _parse(lines: list[tuple[int, str]], schema: Schema, path: str) -> tuple[_Node, ...]:
    starts: list[int] = []
    pieces: list[str] = []
    offset = 0
    for _, line in lines:
        starts.append(offset)
        piece = line.strip() if _MARKER.fullmatch(line.strip()) else line + "\n"
        pieces.append(piece)
        offset += len(piece)
    text = "".join(pieces)

    def fail(pos: int, problem: str) -> TemplateError:
        number = lines[max(bisect.bisect_right(starts, pos) - 1, 0)][0] if lines else 0
        return TemplateError(f"{path}:{number}: {problem}")

    stack: list[tuple[str, list[_Node], int]] = [("", [], 0)]
    pos = 0
    for match in _TOKEN.finditer(text):
        if match.start() > pos:
            stack[-1][1].append(text[pos : match.start()])
        pos = match.end()
        if match.group(1):
            stack[-1][1].append("%")
            continue
        name = match.group(2)
        if name is None:
            raise fail(match.start(), "stray '%' (write %% for a literal percent sign)")
        if name.startswith("BEGIN_"):
            _open_block(name[6:], stack, schema, match.start(), fail)
        elif name.startswith("END_"):
            block, body, _ = stack.pop() if len(stack) > 1 else ("", [], 0)
            if block != name[4:]:
                expected = f"%END_{block}%" if block else "no block to close"
                raise fail(match.start(), f"%{name}% does not match ({expected})")
            stack[-1][1].append(_Block(block, tuple(body)))
        else:
            _check_macro(name, stack, schema, match.start(), fail)
            stack[-1][1].append(_Macro(name))
    if pos < len(text):
        stack[-1][1].append(text[pos:])
    if len(stack) > 1:
        raise fail(stack[-1][2], f"%BEGIN_{stack[-1][0]}% is never closed")
    return tuple(stack[0][1])


def _open_block(block: str, stack: list[tuple[str, list[_Node], int]], schema: Schema, pos: int, fail: Any) -> None:
    if block not in schema.lists and block not in schema.conditions:
        raise fail(pos, f"unknown block %BEGIN_{block}% in a {schema.name} template")
    open_names = [name for name, _, _ in stack[1:]]
    if block in open_names:
        raise fail(pos, f"%BEGIN_{block}% inside itself")
    if block in schema.lists and any(name in schema.lists for name in open_names):
        raise fail(pos, f"list block %BEGIN_{block}% inside another list block")
    if len(stack) > MAX_DEPTH:
        raise fail(pos, f"blocks nested deeper than {MAX_DEPTH}")
    stack.append((block, [], pos))


def _check_macro(name: str, stack: list[tuple[str, list[_Node], int]], schema: Schema, pos: int, fail: Any) -> None:
    if name in schema.macros:
        return
    for block, items in schema.lists.items():
        if name in items:
            if any(open_name == block for open_name, _, _ in stack):
                return
            raise fail(pos, f"%{name}% is valid only inside %BEGIN_{block}% ... %END_{block}%")
    raise fail(pos, f"unknown macro %{name}% in a {schema.name} template")


# --- values from an envelope and an event --------------------------------------------------


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return ""


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [_text(v) for v in value[:MAX_ITEMS] if _text(v)]
    return []


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e11:
        return float(value)
    return None


def _records(value: Any) -> list[Mapping[str, Any]]:
    if not isinstance(value, (list, tuple)):
        return []
    return [item for item in value[:MAX_ITEMS] if isinstance(item, Mapping)]


def local_time(fmt: str, when: float) -> str:
    """``when`` formatted with a [locale] strftime format, or RFC 5322 style if the format fails."""
    try:
        return time.strftime(fmt, time.localtime(when))
    except (ValueError, OverflowError, OSError, TypeError):
        return email.utils.formatdate(when, localtime=True)


def decode_subject(raw: str | bytes | None) -> str:
    """A Subject value as readable text: RFC 2047 words decoded, controls removed."""
    if raw is None:
        return ""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    text = text[:MAX_VALUE_CHARS]
    try:
        text = "".join(_decoded_word(data, charset) for data, charset in decode_header(text))
    except Exception:  # the email package raises assorted errors on hostile words (binascii.Error, ...)
        log.debug("undecodable Subject kept as it is: %r", text[:80])
    return one_line(text)


def _decoded_word(data: bytes | str, charset: str | None) -> str:
    """One piece from decode_header: RFC 2047 words in their charset, raw text as it came."""
    if isinstance(data, str):
        return data
    try:
        return data.decode(charset or "raw-unicode-escape", "replace")
    except LookupError:  # a charset Python does not know
        return data.decode("utf-8", "replace")


def event_context(
    envelope: Mapping[str, Any], event: Mapping[str, Any] | None, date_format: str, time_format: str, now: float
) -> tuple[dict[str, str], dict[str, list[dict[str, str]]]]:
    """Macro values and block lists for notify.tmpl and disclaimer.tmpl.

    ``event`` keys (all optional): status, objects (list of {name, status, viruses, action}),
    group, queue_id, blocked (bool), subject (raw header value), spam_status, spam_method.
    """
    env = envelope if isinstance(envelope, Mapping) else {}
    ev = event if isinstance(event, Mapping) else {}
    recipients = [_text(r.get("addr")) for r in _records(env.get("recipients"))]
    objects = _records(ev.get("objects"))
    viruses = list(dict.fromkeys(name for o in objects for name in _texts(o.get("viruses"))))
    blocked = bool(ev.get("blocked"))
    spam_status = _text(ev.get("spam_status"))
    received = _number(env.get("received_at"))
    values = {
        "SENDER": _text(env.get("sender")) or "<>",
        "ALL_RECIPIENTS": ", ".join(recipients),
        "SUBJECT": decode_subject(ev.get("subject")),
        "QUEUE_ID": _text(ev.get("queue_id")) or _text(env.get("id")),
        "MESSAGE_ID": _text(env.get("message_id")),
        "GROUP": _text(ev.get("group")),
        "STATUS": _text(ev.get("status")),
        "VIRUSES": ", ".join(viruses),
        "ACTION": "blocked" if blocked else "delivered",
        "CLIENT_IP": _text(env.get("client_ip")),
        "CLIENT_NAME": _text(env.get("client_name")),
        "HELO": _text(env.get("helo")),
        "SIZE": _text(env.get("size")),
        "DATE": local_time(date_format, now),
        "TIME": local_time(time_format, now),
        "RECEIVED_DATE": local_time(date_format, received) if received is not None else "",
        "RECEIVED_TIME": local_time(time_format, received) if received is not None else "",
        "PRODUCT": f"{PRODUCT} {__version__}",
        "SPAM_STATUS": spam_status,
        "SPAM_METHOD": _text(ev.get("spam_method")),
        "OBJECT_COUNT": str(len(objects)),
    }
    lists = {
        "OBJECTS": [
            {
                "OBJECT_NAME": _text(o.get("name")) or "(message body)",
                "OBJECT_STATUS": _text(o.get("status")),
                "OBJECT_VIRUSES": ", ".join(_texts(o.get("viruses"))),
                "OBJECT_ACTION": _text(o.get("action")),
            }
            for o in objects
        ],
        "RECIPIENTS": [{"RECIPIENT": r} for r in recipients],
        "BLOCKED": flag(blocked),
        "DELIVERED": flag(not blocked),
        "SPAM": flag(bool(spam_status)),
    }
    return values, lists


# --- composing messages ----------------------------------------------------------------------


def encode_text(text: str) -> tuple[str, str, bytes]:
    """(charset, Content-Transfer-Encoding, CRLF body) of a text part that stays 7-bit.

    ASCII with lines of at most 998 octets goes as 7bit; anything else as UTF-8 in
    quoted-printable (RFC 2045 §6.7), so the part never needs 8BITMIME.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if text.isascii() and all(len(line) <= MAX_LINE for line in lines):
        return "us-ascii", "7bit", "\r\n".join(lines).encode("ascii")
    encoded = binascii.b2a_qp("\n".join(lines).encode("utf-8"), istext=True)
    return "utf-8", "quoted-printable", encoded.replace(b"\n", b"\r\n")


def text_part_headers(charset: str, cte: str, eol: bytes = b"\r\n") -> bytes:
    return headers.render("Content-Type", f'text/plain; charset="{charset}"', eol) + headers.render(
        "Content-Transfer-Encoding", cte, eol
    )


def message_id(domain: str, now: float) -> str:
    """A new Message-ID (RFC 5322 §3.6.4) under ``domain``."""
    host = domain if re.fullmatch(r"[A-Za-z0-9.-]{1,253}", domain or "") else "localhost"
    return f"<{int(now)}.{secrets.token_hex(8)}@{host}>"


def format_address(value: str) -> str:
    """One address for From/To, with an RFC 2047 display name where needed.

    Raises ValueError for an address with control characters or outside ASCII.
    """
    name, addr = email.utils.parseaddr(value)
    if not addr or not addr.isascii() or _UNSAFE.search(value) or any(c in addr for c in " <>"):
        raise ValueError(f"address unfit for a header field: {value!r}")
    return email.utils.formataddr((name, addr))


def build_notification(
    kind: str,
    envelope: Mapping[str, Any],
    event: Mapping[str, Any],
    from_addr: str,
    to_addrs: Sequence[str],
    template_path: str | os.PathLike[str] | Template,
    date_format: str,
    time_format: str,
    now: float,
) -> bytes:
    """A notification (text/plain, CRLF line endings) for the admin, sender or recipients.

    Raises ValueError for an unknown kind, no recipient or an address unfit for a header,
    and TemplateError for a bad template.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown notification kind {kind!r}")
    if not to_addrs:
        raise ValueError("a notification needs at least one recipient")
    template = get_template(template_path, "notify")
    values, lists = event_context(envelope, event, date_format, time_format, now)
    for each in KINDS:
        lists[f"FOR_{each.upper()}"] = flag(each == kind)
    fields, body = template.render(values, lists)
    subject = next((v for n, v in fields if n == "Subject" and v), "Mail gateway notification")
    extra = [(n, v) for n, v in fields if n != "Subject" and v]
    return compose_text(from_addr, to_addrs, subject, body, now, extra)


def compose_text(from_addr: str, to_addrs: Sequence[str], subject: str, body: str, now: float,
                 extra: Sequence[tuple[str, str]] = ()) -> bytes:
    """A text/plain message from the gateway (CRLF line endings, 7-bit), auto-generated (RFC 3834).

    Raises ValueError for an address unfit for a header field."""
    sender_domain = email.utils.parseaddr(from_addr)[1].rpartition("@")[2]
    charset, cte, data = encode_text(body)
    top = [
        ("Date", email.utils.formatdate(now, localtime=True)),
        ("From", format_address(from_addr)),
        ("To", ", ".join(format_address(a) for a in to_addrs)),
        ("Subject", subject),
        ("Message-ID", message_id(sender_domain, now)),
        ("Auto-Submitted", "auto-generated"),  # RFC 3834 §5
        *extra,
        ("MIME-Version", "1.0"),
    ]
    head = b"".join(headers.render(name, value) for name, value in top)
    return head + text_part_headers(charset, cte) + b"\r\n" + _with_final_eol(data, b"\r\n")


def _with_final_eol(data: bytes, eol: bytes) -> bytes:
    return data if data.endswith(eol) else data + eol


# --- disclaimer -------------------------------------------------------------------------------


def render_disclaimer(
    template_path: str | os.PathLike[str] | Template,
    envelope: Mapping[str, Any],
    event: Mapping[str, Any] | None,
    date_format: str,
    time_format: str,
    now: float,
) -> str:
    """The disclaimer text for one message, from disclaimer.tmpl."""
    template = get_template(template_path, "disclaimer")
    values, lists = event_context(envelope, event, date_format, time_format, now)
    return template.render(values, lists)[1]


# RFC 2046 §5.1.1: boundary := 0*69<bchars> bcharsnospace
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


def add_disclaimer(raw: bytes, text: str) -> bytes:
    """``raw`` with ``text`` appended as a last text/plain part (kmg-spec §5.4).

    A multipart/mixed message gets the part just before its close-delimiter; anything else
    is wrapped in a new multipart/mixed whose first part is the original content. Bytes of
    the existing parts are kept as they were; the message's own line ending is used.
    """
    eol = headers.line_ending(raw)
    part = _disclaimer_part(text, eol)
    content_type, boundary = _content_type(raw)
    if content_type == "multipart/mixed" and boundary and _has_delimiter(raw, boundary.encode("latin-1")):
        return _insert_part(raw, boundary.encode("latin-1"), part, eol)
    # a multipart/mixed without a delimiter line is read as one body: a part added after it
    # would turn that body into a preamble, which readers hide (RFC 2046 §5.1.1)
    return _wrap_mixed(raw, part, eol)


def _has_delimiter(raw: bytes, boundary: bytes) -> bool:
    """Whether the body has a delimiter line of ``boundary`` (RFC 2046 §5.1.1): a part to follow.
    A close-delimiter alone opens no part; readers see the body before it as one text."""
    line = re.compile(rb"(?m)^--" + re.escape(boundary) + rb"[ \t]*\r?$")
    return line.search(raw, headers.header_end(raw)) is not None


def _disclaimer_part(text: str, eol: bytes) -> bytes:
    charset, cte, data = encode_text(text.rstrip("\n"))
    if eol != b"\r\n":
        data = data.replace(b"\r\n", eol)
    head = text_part_headers(charset, cte, eol)
    head += headers.render("Content-Disposition", "inline", eol)
    head += headers.render("Content-Description", "Disclaimer", eol)
    return head + eol + data


def _content_type(raw: bytes) -> tuple[str, str | None]:
    """(type, boundary) of the Content-Type in the header as the wrapper reads it
    (`smtpgw.mail.fields`: ended by the first line that is not a field), so insertion and
    wrapping never disagree on where it ends; a boundary that is not valid syntax is None."""
    declared = fields.content_type(fields.split(raw).get(raw, "content-type"))
    boundary = declared.boundary
    if boundary is not None and not _BOUNDARY.fullmatch(boundary):
        boundary = None
    return declared.type, boundary


def _insert_part(raw: bytes, boundary: bytes, part: bytes, eol: bytes) -> bytes:
    start = headers.header_end(raw)
    # RFC 2046 §5.1.1: the close-delimiter starts a line; the line ending before it is its own.
    close = re.compile(rb"(?m)^--" + re.escape(boundary) + rb"--[ \t]*(?=\r?\n|\Z)")
    match = close.search(raw, start)
    opener = b"--" + boundary + eol
    if match is None:  # truncated multipart: add the part and the missing close-delimiter
        # RFC 2046 §5.1.1: the line break before a delimiter is the delimiter's, so a new one is
        # written: the last part keeps its own final line break
        return raw + eol + opener + part + eol + b"--" + boundary + b"--" + eol
    at = match.start()
    if at > start and raw[at - 1 : at] == b"\n":
        at -= 2 if raw[at - 2 : at] == b"\r\n" else 1
        return raw[:at] + eol + opener + part + raw[at:]
    return raw[:at] + opener + part + eol + raw[at:]


def _wrap_mixed(raw: bytes, part: bytes, eol: bytes) -> bytes:
    fields, end = _field_chunks(raw, eol)
    body = raw[end:]
    content = [f for f in fields if f[:8].lower() == b"content-"]
    top = [f for f in fields if f[:8].lower() != b"content-"]
    if not any(f[:13].lower() == b"mime-version:" for f in top):
        top.append(headers.render("MIME-Version", "1.0", eol))
    boundary = new_boundary(raw)
    top.append(headers.render("Content-Type", f'multipart/mixed; boundary="{boundary}"', eol))
    inner_cte = next((f.partition(b":")[2].strip().lower() for f in content if f[:26].lower() == b"content-transfer-encoding:"), b"")
    if inner_cte in (b"8bit", b"binary"):
        top.append(headers.render("Content-Transfer-Encoding", inner_cte.decode(), eol))
    elif not body.isascii():
        top.append(headers.render("Content-Transfer-Encoding", "8bit", eol))  # RFC 2045 §6.4
    delimiter = b"--" + boundary.encode("ascii")
    return b"".join(
        [
            *top, eol,
            b"This is a multi-part message in MIME format.", eol,
            delimiter, eol, *content, eol, body, eol,
            delimiter, eol, part, eol,
            delimiter, b"--", eol,
        ]
    )


def _field_chunks(raw: bytes, eol: bytes) -> tuple[list[bytes], int]:
    """(the header fields, continuation lines included, each ending a line; where the body
    starts), as `smtpgw.mail.fields.split` reads the header."""
    head = fields.split(raw)
    chunks = [raw[f.start : f.end] for f in head.fields]
    return [c if c.endswith(b"\n") else c + eol for c in chunks], head.body


def new_boundary(content: bytes, prefix: str = "=_smtpgw_") -> str:
    """A multipart boundary that does not occur in ``content`` (RFC 2046 §5.1.1)."""
    while True:
        boundary = f"{prefix}{secrets.token_hex(12)}"
        if boundary.encode("ascii") not in content:
            return boundary
