"""Notifications about scan events, and the disclaimer text.

Owns:
* the admin / sender / recipient notifications about anti-virus and anti-spam events
  (kmg-spec §1.3, §5.1): `build_notification`, from notify.tmpl;
* the macro values of an envelope and a scan event (`event_context`), which notify.tmpl and
  disclaimer.tmpl share, and the disclaimer text (`render_disclaimer`; the part is added by
  `smtpgw.mail.disclaimer`);
* text/plain messages from the gateway (`compose_text`: notifications, quota notices, digests).

The template language is `smtpgw.reports.templates`.

Must never: put a value into a header field without removing CR, LF and NUL first (header
injection, CPython gh-121650); send anything (callers queue the bytes they get back).
"""

from __future__ import annotations

import email.utils
import logging
import os
import re
import secrets
import time
from email.header import decode_header
from typing import Any, Mapping, Sequence

from smtpgw import PRODUCT, __version__
from smtpgw.mail import headers
from smtpgw.mail.compose import encode_text, text_part_headers
from smtpgw.reports.templates import MAX_ITEMS, MAX_VALUE_CHARS, UNSAFE_CHARS, Template, flag, get_template, one_line

__all__ = [
    "KINDS",
    "build_notification",
    "compose_text",
    "decode_subject",
    "event_context",
    "format_address",
    "local_time",
    "message_id",
    "render_disclaimer",
]

log = logging.getLogger("smtpgw.reports.notify")

KINDS = ("admin", "sender", "recipient")


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


def message_id(domain: str, now: float) -> str:
    """A new Message-ID (RFC 5322 §3.6.4) under ``domain``."""
    host = domain if re.fullmatch(r"[A-Za-z0-9.-]{1,253}", domain or "") else "localhost"
    return f"<{int(now)}.{secrets.token_hex(8)}@{host}>"


def format_address(value: str) -> str:
    """One address for From/To, with an RFC 2047 display name where needed.

    Raises ValueError for an address with control characters or outside ASCII.
    """
    name, addr = email.utils.parseaddr(value)
    if not addr or not addr.isascii() or UNSAFE_CHARS.search(value) or any(c in addr for c in " <>"):
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
