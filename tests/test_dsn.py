"""Delivery status notifications (smtpgw.dsn): RFC 3464 fields, RET, NOTIFY, 8-bit, injection."""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

import smtpgw
from smtpgw.reports import dsn

TEMPLATE = Path(smtpgw.__file__).parent / "templates" / "dsn.tmpl"
NOW = 1_700_000_000.0
ORIGINAL = (
    b"From: Alice <a@b.test>\r\n"
    b"To: x@y.test\r\n"
    b"Subject: quarterly report\r\n"
    b"Message-ID: <m1@b.test>\r\n"
    b"\r\n"
    b"secret body text\r\n"
)
POLICIES = [pytest.param(email.policy.default, id="default"), pytest.param(email.policy.compat32, id="compat32")]


def recipient(addr: str = "x@y.test", **changes: Any) -> dict[str, Any]:
    record = {
        "addr": addr,
        "orcpt": f"rfc822;{addr}",
        "notify": None,
        "state": "failed",
        "status": "5.1.1",
        "diag": "smtp; 550 5.1.1 no such user",
        "remote_mta": "mx.y.test",
        "attempts": 1,
        "last_attempt": NOW - 60,
    }
    record.update(changes)
    return record


def envelope(*recipients: dict[str, Any], **changes: Any) -> dict[str, Any]:
    record = {
        "id": "Q1abc",
        "sender": "a@b.test",
        "envid": "ENV-42",
        "ret": "FULL",
        "client_ip": "127.0.0.1",
        "client_name": "client.b.test",
        "helo": "client.b.test",
        "received_at": NOW - 3600,
        "size": len(ORIGINAL),
        "body": "7BIT",
        "esmtp": True,
        "message_id": "<m1@b.test>",
        "recipients": list(recipients) or [recipient()],
    }
    record.update(changes)
    return record


def build(env: dict[str, Any] | None = None, kind: str = "failure", original: bytes = ORIGINAL, **kw: Any) -> bytes | None:
    env = env or envelope()
    return dsn.build_dsn(env, env["recipients"], kind, original, "gw.test", "postmaster", str(TEMPLATE), NOW, **kw)


def parse(data: bytes, policy: Any = email.policy.default) -> Message:
    return email.message_from_bytes(data, policy=policy)


def report_groups(message: Message) -> list[Message]:
    """The blocks of the message/delivery-status part: per-message first, then per recipient."""
    part = message.get_payload()[1]
    assert part.get_content_type() == "message/delivery-status"
    return part.get_payload()


@pytest.mark.parametrize("policy", POLICIES)
def test_dsn_is_a_multipart_report_that_parses(policy: Any) -> None:
    data = build()
    assert data is not None
    message = parse(data, policy)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    types = [part.get_content_type() for part in message.get_payload()]
    assert types == ["text/plain", "message/delivery-status", "message/rfc822"]
    assert not message.defects
    assert all(not part.defects for part in message.walk())


def test_top_level_headers() -> None:
    message = parse(build())
    assert email.utils.parseaddr(message["From"])[1] == "postmaster@gw.test"
    assert email.utils.parseaddr(message["To"])[1] == "a@b.test"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["In-Reply-To"] == "<m1@b.test>"
    assert email.utils.parsedate_to_datetime(message["Date"]).timestamp() == NOW
    assert message["Message-ID"].endswith("@gw.test>")


def test_rfc3464_fields() -> None:
    per_message, per_recipient = report_groups(parse(build()))
    assert per_message["Reporting-MTA"] == "dns; gw.test"
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    assert per_message["Received-From-MTA"].startswith("dns; client.b.test")
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == NOW - 3600
    assert per_recipient["Original-Recipient"] == "rfc822; x@y.test"
    assert per_recipient["Final-Recipient"] == "rfc822; x@y.test"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx.y.test"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert email.utils.parsedate_to_datetime(per_recipient["Last-Attempt-Date"]).timestamp() == NOW - 60
    assert per_recipient["Will-Retry-Until"] is None


def test_optional_fields_left_out_when_unknown() -> None:
    env = envelope(recipient(orcpt=None, remote_mta=None, diag=None, last_attempt=None), envid=None)
    per_message, per_recipient = report_groups(parse(build(env)))
    assert per_message["Original-Envelope-Id"] is None
    for name in ("Original-Recipient", "Remote-MTA", "Diagnostic-Code", "Last-Attempt-Date"):
        assert per_recipient[name] is None


def test_one_group_per_recipient_and_human_part_lists_them() -> None:
    env = envelope(recipient("x@y.test"), recipient("z@y.test", status="5.2.2", diag="smtp; 552 5.2.2 mailbox full"))
    message = parse(build(env))
    groups = report_groups(message)
    assert [g["Final-Recipient"] for g in groups[1:]] == ["rfc822; x@y.test", "rfc822; z@y.test"]
    text = message.get_payload()[0].get_content()
    assert "<z@y.test>: failed, status 5.2.2" in text
    assert "552 5.2.2 mailbox full" in text
    assert "queue ID Q1abc" in text


def test_ret_full_returns_the_whole_message() -> None:
    data = build()
    message = parse(data)
    returned = message.get_payload()[2]
    assert returned.get_content_type() == "message/rfc822"
    assert ORIGINAL in data
    assert returned.get_payload()[0]["Subject"] == "quarterly report"


@pytest.mark.parametrize("ret", ["HDRS", None])
def test_ret_hdrs_or_unset_returns_headers_only(ret: str | None) -> None:
    data = build(envelope(ret=ret))
    assert b"secret body text" not in data
    returned = parse(data).get_payload()[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Subject: quarterly report" in returned.get_content()
    assert "header of your message follows" in parse(data).get_payload()[0].get_content()


def test_ret_full_too_big_is_capped_to_headers() -> None:
    data = build(full_limit=len(ORIGINAL) - 1)
    assert b"secret body text" not in data
    assert parse(data).get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_ret_full_with_overlong_line_returns_headers() -> None:
    original = ORIGINAL + b"x" * 1200 + b"\r\n"
    data = build(original=original)
    assert parse(data).get_payload()[2].get_content_type() == "text/rfc822-headers"


# RFC 3461 §4.1: (NOTIFY, kind, DSN due?)
NOTIFY_MATRIX = [
    (None, "failure", True),
    (None, "delay", False),
    (None, "success", False),
    (["NEVER"], "failure", False),
    (["NEVER"], "delay", False),
    (["NEVER"], "success", False),
    (["FAILURE"], "failure", True),
    (["FAILURE"], "delay", False),
    (["FAILURE"], "success", False),
    (["DELAY"], "failure", False),
    (["DELAY"], "delay", True),
    (["SUCCESS"], "success", True),
    (["SUCCESS"], "failure", False),
    (["SUCCESS", "FAILURE", "DELAY"], "failure", True),
    (["SUCCESS", "FAILURE", "DELAY"], "delay", True),
    (["SUCCESS", "FAILURE", "DELAY"], "success", True),
]


@pytest.mark.parametrize(("notify", "kind", "due"), NOTIFY_MATRIX)
def test_notify_matrix(notify: list[str] | None, kind: str, due: bool) -> None:
    status = {"failure": "5.1.1", "delay": "4.4.1", "success": "2.0.0"}[kind]
    env = envelope(recipient(notify=notify, status=status))
    assert dsn.wants_dsn(env["recipients"][0], kind) is due
    assert (build(env, kind) is not None) is due


def test_only_recipients_that_asked_are_reported() -> None:
    env = envelope(recipient("x@y.test", notify=["NEVER"]), recipient("z@y.test", notify=["FAILURE"]), recipient("w@y.test"))
    groups = report_groups(parse(build(env)))
    assert [g["Final-Recipient"] for g in groups[1:]] == ["rfc822; z@y.test", "rfc822; w@y.test"]


@pytest.mark.parametrize("kind", dsn.KINDS)
@pytest.mark.parametrize("sender", ["", "<>"])
def test_null_sender_never_gets_a_dsn(kind: str, sender: str) -> None:
    env = envelope(recipient(notify=["SUCCESS", "FAILURE", "DELAY"]), sender=sender)
    assert build(env, kind) is None


def test_delay_dsn() -> None:
    env = envelope(recipient(notify=["DELAY"], status="4.4.1", diag="smtp; 421 4.4.1 try later", state="deferred"))
    message = parse(build(env, "delay", retry_until=NOW + 86400))
    assert message["Subject"].startswith("Delayed Mail")
    per_recipient = report_groups(message)[1]
    assert per_recipient["Action"] == "delayed"
    assert per_recipient["Status"] == "4.4.1"
    assert email.utils.parsedate_to_datetime(per_recipient["Will-Retry-Until"]).timestamp() == NOW + 86400


def test_status_of_the_wrong_class_is_replaced() -> None:
    env = envelope(recipient(notify=["DELAY"], status="5.1.1"))
    assert report_groups(parse(build(env, "delay")))[1]["Status"] == "4.0.0"
    env = envelope(recipient(status="2.0.0"))
    assert report_groups(parse(build(env, "failure")))[1]["Status"] == "5.0.0"
    env = envelope(recipient(status="garbage\r\nX-Evil: 1"))
    assert report_groups(parse(build(env, "failure")))[1]["Status"] == "5.0.0"


@pytest.mark.parametrize(("changes", "action"), [({}, "delivered"), ({"relayed": True}, "relayed"), ({"action": "relayed"}, "relayed")])
def test_success_dsn_delivered_or_relayed(changes: dict[str, Any], action: str) -> None:
    env = envelope(recipient(notify=["SUCCESS"], status="2.0.0", state="sent", diag="smtp; 250 2.0.0 ok", **changes))
    message = parse(build(env, "success"))
    assert message["Subject"] == "Successful Mail Delivery Report"
    per_recipient = report_groups(message)[1]
    assert per_recipient["Action"] == action
    assert per_recipient["Status"] == "2.0.0"


def test_ascii_original_gives_a_7bit_dsn_with_crlf_lines() -> None:
    data = build()
    assert data.isascii()
    assert dsn.dsn_body_type(data) == "7BIT"
    assert data.count(b"\n") == data.count(b"\r\n")
    assert data.count(b"\r") == data.count(b"\r\n")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def test_lf_original_is_returned_with_crlf() -> None:
    data = build(original=ORIGINAL.replace(b"\r\n", b"\n"))
    assert ORIGINAL in data
    assert data.count(b"\n") == data.count(b"\r\n")


def test_8bit_original_full_is_sent_8bitmime() -> None:
    original = ORIGINAL.replace(b"secret body text", "Grüße aus Köln".encode("utf-8"))
    data = build(envelope(body="8BITMIME"), original=original)
    assert dsn.dsn_body_type(data) == "8BITMIME"
    assert original in data
    message = parse(data)
    assert message["Content-Transfer-Encoding"] == "8bit"
    returned = message.get_payload()[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    # Only the returned message is 8-bit: the first two parts stay 7-bit.
    assert data[: data.index(b"Content-Type: message/rfc822")].isascii()


def test_8bit_headers_returned_as_headers_keep_the_dsn_7bit() -> None:
    original = b"Subject: " + "Grüße".encode("utf-8") + b"\r\nFrom: a@b.test\r\n\r\nbody\r\n"
    data = build(envelope(ret="HDRS"), original=original)
    assert dsn.dsn_body_type(data) == "7BIT"
    returned = parse(data, email.policy.compat32).get_payload()[2]
    assert returned["Content-Transfer-Encoding"] == "quoted-printable"
    assert returned.get_payload(decode=True) == original[: original.index(b"\r\n\r\n") + 2]


def test_injection_in_envid_orcpt_and_diagnostic_is_neutralised() -> None:
    env = envelope(
        recipient(
            orcpt="rfc822;x@y.test\r\nX-Evil-Orcpt: 1",
            diag="smtp; 550 no\r\nX-Evil-Diag: 1\r\n\r\nBcc: victim@c.test",
            remote_mta="mx.y.test\r\nX-Evil-Mta: 1",
        ),
        envid="ENV\r\nBcc: victim@c.test\r\n",
        message_id="<m1@b.test>\r\nBcc: victim@c.test",
    )
    data = build(env)
    message = parse(data)
    assert message["Bcc"] is None
    assert message["In-Reply-To"] is None
    per_message, per_recipient = report_groups(message)
    assert per_message["Original-Envelope-Id"] == "ENV+0D+0ABcc: victim@c.test+0D+0A"
    assert per_recipient["Original-Recipient"] == "rfc822; x@y.test+0D+0AX-Evil-Orcpt: 1"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 no X-Evil-Diag: 1 Bcc: victim@c.test"
    assert per_recipient["Remote-MTA"] is None
    for group in report_groups(message):
        assert not [name for name in group.keys() if name.lower().startswith(("x-evil", "bcc"))]
    assert not re.search(rb"\r\n(X-Evil|Bcc)", data)


def test_sender_with_control_characters_gets_no_dsn() -> None:
    assert build(envelope(sender="a@b.test\r\nBcc: victim@c.test")) is None


def test_non_ascii_recipient_uses_utf8_address_type() -> None:
    env = envelope(recipient("jörg@y.test", orcpt=None))
    per_recipient = report_groups(parse(build(env)))[1]
    assert per_recipient["Final-Recipient"] == "utf-8; j\\x{F6}rg@y.test"


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError):
        build(kind="bounce")
