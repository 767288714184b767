"""Delivery status notifications the gateway generates (RFC 3461-3464, RFC 6522).

Owns: deciding which recipients a DSN is due for (RFC 3461 §4.1 NOTIFY), and building the
``multipart/report; report-type=delivery-status`` message: a human-readable part from
dsn.tmpl, the ``message/delivery-status`` part (RFC 3464 §2.2-2.3) and the original as the
sender asked with RET (RFC 3461 §4.3), as bytes with CRLF line endings.

Must never: bounce a bounce (null reverse-path, RFC 5321 §4.5.5 and RFC 3461 §6.1); copy an
envelope value (ENVID, ORCPT, a remote server's reply) into a field with its CR, LF or other
control characters; send anything itself (the caller queues the DSN from the null sender,
with BODY=8BITMIME when `dsn_body_type` says so).
"""

from __future__ import annotations

import email.utils
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from smtpgw.mail import downgrade, headers
from smtpgw.mail.compose import encode_text, new_boundary, text_part_headers
from smtpgw.reports.notify import decode_subject, message_id
from smtpgw.reports.templates import Template, flag, get_template

__all__ = ["KINDS", "DEFAULT_FULL_LIMIT", "build_dsn", "dsn_body_type", "wants_dsn"]

log = logging.getLogger("smtpgw.reports.dsn")

KINDS = ("failure", "delay", "success")
DEFAULT_FULL_LIMIT = 100 * 1024  # bytes of the original returned for RET=FULL; beyond: headers
MAX_HEADERS_RETURNED = 64 * 1024
MAX_FIELD_CHARS = 900  # keeps every delivery-status line under RFC 5322's 998 octets
MAX_LINE = 998
CRLF = b"\r\n"

_ACTIONS = {"failure": "failed", "delay": "delayed"}
_SUCCESS_ACTIONS = ("delivered", "relayed", "expanded")  # RFC 3464 §2.3.3
_STATUS = re.compile(r"([245])\.\d{1,3}\.\d{1,3}")  # RFC 3463 §2
_STATUS_CLASSES = {"failed": "45", "delayed": "4", "delivered": "2", "relayed": "2", "expanded": "2"}
_DEFAULT_STATUS = {"failed": "5.0.0", "delayed": "4.0.0"}
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*\.?|\[[0-9A-Fa-f:.Iv]{2,60}\]")
_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,31}")  # RFC 3464 §2.1.2 atom
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MESSAGE_ID = re.compile(r"<[!-;=?-~]{1,250}>")


def wants_dsn(recipient: Mapping[str, Any], kind: str) -> bool:
    """RFC 3461 §4.1: is a ``kind`` DSN due for this recipient?

    NEVER suppresses all; failure when NOTIFY was absent or names FAILURE; delay and
    success only when NOTIFY names them.
    """
    notify = recipient.get("notify")
    words = {str(w).upper() for w in notify} if isinstance(notify, (list, tuple)) else None
    if words is not None and "NEVER" in words:
        return False
    if kind == "failure":
        return words is None or "FAILURE" in words
    wanted = {"delay": "DELAY", "success": "SUCCESS"}.get(kind)
    return words is not None and wanted in words


def dsn_body_type(dsn: bytes) -> str:
    """The BODY= value (RFC 6152) to send a DSN with: ``8BITMIME`` or ``7BIT``."""
    return "7BIT" if dsn.isascii() else "8BITMIME"


def build_dsn(
    envelope: Mapping[str, Any],
    recipients: Sequence[Mapping[str, Any]],
    kind: str,
    original: bytes,
    reporting_mta: str,
    postmaster: str,
    template_path: str | os.PathLike[str] | Template,
    now: float,
    *,
    retry_until: float | None = None,
    full_limit: int = DEFAULT_FULL_LIMIT,
) -> bytes | None:
    """A DSN about ``recipients`` (records of ``envelope``), or None when none is due.

    None for a null sender (never bounce a bounce), a sender unfit for a header, or when no
    recipient asked for this kind. A success recipient with ``relayed: True`` (or
    ``action: "relayed"``) is reported as relayed: the next hop lacked DSN (RFC 3461 §5.2.2).
    ``retry_until`` (epoch) gives delay DSNs their Will-Retry-Until field.
    Raises ValueError for an unknown kind or a postmaster address unfit for a header.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown DSN kind {kind!r}")
    sender = _str(envelope.get("sender"))
    if sender in ("", "<>"):
        log.info("%s: no %s DSN: null sender", envelope.get("id"), kind)
        return None
    if _CONTROL.search(sender) or len(sender) > 512:
        log.warning("%s: no %s DSN: sender address unfit for a header", envelope.get("id"), kind)
        return None
    chosen = [r for r in recipients if isinstance(r, Mapping) and wants_dsn(r, kind)]
    if not chosen:
        return None
    host = _ascii(reporting_mta, 253) if _HOST.fullmatch(reporting_mta or "") else "localhost"
    from_addr = postmaster if "@" in postmaster else f"{postmaster}@{host}"
    if _CONTROL.search(from_addr) or not from_addr.isascii():
        raise ValueError(f"postmaster address unfit for a header: {postmaster!r}")

    report = _Report(envelope, kind, [_recipient_report(r, kind) for r in chosen], host, from_addr, retry_until, now)
    returned, full = _returned_part(original, envelope.get("ret"), full_limit)
    human, subject = _human_part(report, get_template(template_path, "dsn"), original, full)
    status = _delivery_status(report)
    boundary = new_boundary(original, "=_dsn_")

    top = [
        ("From", f"Mail Delivery System <{from_addr}>"),
        ("To", f"<{sender}>" if sender.isascii() else "undisclosed-recipients:;"),
        ("Subject", subject),
        ("Date", email.utils.formatdate(now, localtime=True)),
        ("Message-ID", message_id(host, now)),
    ]
    original_id = _ascii(envelope.get("message_id"), 250)
    if _MESSAGE_ID.fullmatch(original_id):
        top += [("In-Reply-To", original_id), ("References", original_id)]
    top += [
        ("Auto-Submitted", "auto-replied"),  # RFC 3834 §5
        ("MIME-Version", "1.0"),
        ("Content-Type", f'multipart/report; report-type=delivery-status; boundary="{boundary}"'),
    ]
    if not returned.isascii():
        top.append(("Content-Transfer-Encoding", "8bit"))  # RFC 2045 §6.4: a multipart is 8bit if a part is
    delimiter = b"--" + boundary.encode("ascii")
    out = [b"".join(headers.render(n, v) for n, v in top), CRLF, b"This is a MIME-encapsulated message.", CRLF]
    for part in (human, status, returned):
        out += [CRLF, delimiter, CRLF, part]
    out += [CRLF, delimiter, b"--", CRLF]
    return b"".join(out)


# --- the facts reported ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Report:
    """What one DSN reports: the envelope, the kind, and one sanitised group a recipient."""

    envelope: Mapping[str, Any]
    kind: str
    recipients: list[dict[str, str]]
    host: str  # the reporting MTA
    postmaster: str
    retry_until: float | None
    now: float



def _recipient_report(record: Mapping[str, Any], kind: str) -> dict[str, str]:
    """Sanitised values of one recipient's delivery-status group (RFC 3464 §2.3)."""
    if kind == "success":
        wanted = "relayed" if record.get("relayed") is True else str(record.get("action") or "delivered").lower()
        action = wanted if wanted in _SUCCESS_ACTIONS else "delivered"
    else:
        action = _ACTIONS[kind]
    status = str(record.get("status") or "")
    if not (_STATUS.fullmatch(status) and status[0] in _STATUS_CLASSES[action]):
        status = _DEFAULT_STATUS.get(action, "2.0.0")
    addr = _str(record.get("addr"))
    remote = _str(record.get("remote_mta"))
    last = record.get("last_attempt")
    return {
        "addr": _ascii(addr, MAX_FIELD_CHARS),
        "final": _final_recipient(addr),
        "orcpt": _original_recipient(record.get("orcpt")),
        "action": action,
        "status": status,
        "remote": remote if _HOST.fullmatch(remote) else "",
        "diag": _diagnostic(record.get("diag")),
        "last": _date(last),
    }


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _ascii(value: Any, limit: int) -> str:
    """Printable ASCII only: controls become spaces, other characters '?'; runs of space collapse."""
    if not isinstance(value, str):
        return ""
    text = _CONTROL.sub(" ", value[: limit * 2]).encode("ascii", "replace").decode("ascii")
    return " ".join(text.split())[:limit]


def _xtext_unsafe(value: str, limit: int) -> str:
    """A decoded ENVID/ORCPT value with every octet outside printable ASCII shown as +HH.

    RFC 3461 §4 allows only printable ASCII once xtext is decoded; a value that decodes to
    CR, LF or 8-bit octets is shown encoded instead of being copied into the report.
    """
    out = []
    for char in value[:limit]:
        if " " <= char <= "~":
            out.append(char)
        else:
            out.extend(f"+{octet:02X}" for octet in char.encode("utf-8"))
    return "".join(out)[: limit * 3]


def _final_recipient(addr: str) -> str:
    """RFC 3464 §2.3.2; a non-ASCII address goes as utf-8-addr-xtext (RFC 6533 §3)."""
    if addr.isascii() and not _CONTROL.search(addr) and " " not in addr:
        return f"rfc822; {addr[:MAX_FIELD_CHARS]}"
    encoded = []
    for char in addr[:MAX_FIELD_CHARS]:
        # QCHAR = %x21-2a / %x2c-3c / %x3e-5b / %x5d-7e; other characters \x{HEX}
        encoded.append(char if "!" <= char <= "~" and char not in "+=\\" else f"\\x{{{ord(char):02X}}}")
    return "utf-8; " + "".join(encoded)


def _original_recipient(orcpt: Any) -> str:
    """RFC 3464 §2.3.1 from the decoded ORCPT ``type;address``, or "" when there is none."""
    if not isinstance(orcpt, str) or ";" not in orcpt:
        return ""
    addr_type, _, address = orcpt.partition(";")
    addr_type = addr_type.strip()
    if not _TYPE.fullmatch(addr_type) or not address.strip():
        return ""
    return f"{addr_type}; {_xtext_unsafe(address.strip(), MAX_FIELD_CHARS // 3)}"


def _diagnostic(diag: Any) -> str:
    """RFC 3464 §2.3.6 ``type; text`` from a remote reply, sanitised to one ASCII line."""
    text = _ascii(diag, MAX_FIELD_CHARS)
    if not text:
        return ""
    diag_type, sep, rest = text.partition(";")
    if sep and _TYPE.fullmatch(diag_type.strip()):
        return f"{diag_type.strip()}; {rest.strip()}"
    return f"smtp; {text}"


def _date(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e11:
        return email.utils.formatdate(value, localtime=True)
    return ""


# --- the three parts --------------------------------------------------------------------------


def _delivery_status(report: _Report) -> bytes:
    """The message/delivery-status part (RFC 3464 §2.1): per-message fields, then one group a recipient."""
    envelope = report.envelope
    message = [("Reporting-MTA", f"dns; {report.host}")]
    queue_id = _ascii(envelope.get("id"), 64)
    if queue_id:
        message.append(("X-Smtpgw-Queue-ID", queue_id))
    envid = envelope.get("envid")
    if isinstance(envid, str) and envid:
        message.append(("Original-Envelope-Id", _xtext_unsafe(envid, 100)))  # RFC 3464 §2.2.1
    helo = _str(envelope.get("helo"))
    if _HOST.fullmatch(helo):
        client = _ascii(envelope.get("client_ip"), 64)
        message.append(("Received-From-MTA", f"dns; {helo}" + (f" ([{client}])" if client else "")))
    arrival = _date(envelope.get("received_at"))
    if arrival:
        message.append(("Arrival-Date", arrival))
    groups = [message]
    for rcpt in report.recipients:
        fields = [("Original-Recipient", rcpt["orcpt"])] if rcpt["orcpt"] else []
        fields += [("Final-Recipient", rcpt["final"]), ("Action", rcpt["action"]), ("Status", rcpt["status"])]
        if rcpt["remote"]:
            fields.append(("Remote-MTA", f"dns; {rcpt['remote']}"))
        if rcpt["diag"]:
            fields.append(("Diagnostic-Code", rcpt["diag"]))
        if rcpt["last"]:
            fields.append(("Last-Attempt-Date", rcpt["last"]))
        if report.kind == "delay" and _date(report.retry_until):
            fields.append(("Will-Retry-Until", _date(report.retry_until)))
        groups.append(fields)
    body = CRLF.join(b"".join(headers.render(n, v) for n, v in group) for group in groups)
    head = headers.render("Content-Type", "message/delivery-status") + headers.render(
        "Content-Description", "Delivery report"
    )
    return head + CRLF + body


def _human_part(report: _Report, template: Template, original: bytes, full: bool) -> tuple[bytes, str]:
    """(the text/plain part from dsn.tmpl, the Subject it gives)."""
    envelope, kind = report.envelope, report.kind
    head = original[: headers.header_end(original)]
    values = {
        "SENDER": envelope.get("sender") or "<>",
        "REPORTING_MTA": report.host,
        "POSTMASTER": report.postmaster,
        "QUEUE_ID": _ascii(envelope.get("id"), 64),
        "ENVID": _xtext_unsafe(envelope.get("envid") or "", 100),
        "ARRIVAL_DATE": _date(envelope.get("received_at")),
        "RETRY_UNTIL": _date(report.retry_until),
        "SUBJECT": decode_subject(headers.get_raw(head, "subject")),
        "MESSAGE_ID": _ascii(envelope.get("message_id"), 250),
        "DATE": email.utils.formatdate(report.now, localtime=True),
    }
    lists = {
        "RECIPIENTS": [
            {
                "RCPT": r["addr"],
                "RCPT_ORCPT": r["orcpt"],
                "RCPT_ACTION": r["action"],
                "RCPT_STATUS": r["status"],
                "RCPT_DIAG": r["diag"],
                "RCPT_REMOTE_MTA": r["remote"],
            }
            for r in report.recipients
        ],
        "FAILURE": flag(kind == "failure"),
        "DELAY": flag(kind == "delay"),
        "SUCCESS": flag(kind == "success"),
        "FULL_MESSAGE": flag(full),
        "HEADERS_ONLY": flag(not full),
    }
    fields, body = template.render(values, lists)
    default = {"failure": "Undelivered Mail Returned to Sender", "delay": "Delayed Mail", "success": "Delivery Report"}
    subject = next((v for n, v in fields if n == "Subject" and v), default[kind])
    charset, cte, data = encode_text(body)
    part = text_part_headers(charset, cte) + headers.render("Content-Description", "Notification")
    return part + CRLF + data, subject


def _canonical(data: bytes) -> bytes:
    """CRLF line endings throughout (RFC 5322 §2.1), so the DSN never carries a bare CR or LF."""
    return re.sub(rb"\r\n|\r|\n", CRLF, data)


def _returned_part(original: bytes, ret: Any, full_limit: int) -> tuple[bytes, bool]:
    """(the part carrying the original, whether it is the whole message) per RET (RFC 3461 §4.3)."""
    if ret == "FULL" and len(original) <= full_limit:
        message = _canonical(original)
        lines = message.split(CRLF)
        if b"\0" not in message and all(len(line) <= MAX_LINE for line in lines):
            head = headers.render("Content-Type", "message/rfc822")
            head += headers.render("Content-Description", "Undelivered Message")
            if not message.isascii():
                # RFC 2046 §5.2.1: message/rfc822 may be 8bit, never quoted-printable.
                head += headers.render("Content-Transfer-Encoding", "8bit")
            return head + CRLF + message, True
        log.info("original not returned whole: NUL or line over %d octets", MAX_LINE)
    block = _canonical(original[: headers.header_end(original)]).rstrip(CRLF)
    if len(block) > MAX_HEADERS_RETURNED:
        cut = block.rfind(CRLF, 0, MAX_HEADERS_RETURNED)
        block = block[: max(cut, 0)]
    head = headers.render("Content-Type", "text/rfc822-headers")  # RFC 6522 §4
    head += headers.render("Content-Description", "Undelivered Message Headers")
    if block.isascii() and b"\0" not in block:
        return head + CRLF + block + CRLF, False
    # 8-bit header octets: quoted-printable keeps the DSN 7-bit (text/* may use it, RFC 2045 §6.1).
    encoded = downgrade.qp_encode(block)
    head += headers.render("Content-Transfer-Encoding", "quoted-printable")
    return head + CRLF + encoded + CRLF, False
