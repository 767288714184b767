"""Templates, notifications and the disclaimer (smtpgw.notify)."""

from __future__ import annotations

import email
import email.errors
import email.policy
import email.utils
import re
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

import smtpgw
from smtpgw.mail import headers, mime
from smtpgw.mail.disclaimer import add_disclaimer
from smtpgw.reports import notify, templates
from smtpgw.reports.templates import TemplateError
from tests.support.components import missing

TEMPLATES = Path(smtpgw.__file__).parent / "templates"
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
NOW = 1_700_000_000.0
ENVELOPE = {
    "id": "Q1abc",
    "sender": "a@b.test",
    "client_ip": "127.0.0.1",
    "client_name": "client.b.test",
    "helo": "client.b.test",
    "received_at": NOW - 60,
    "size": 1234,
    "message_id": "<m1@b.test>",
    "recipients": [{"addr": "x@y.test"}, {"addr": "z@y.test"}],
}
EVENT = {
    "status": "infected",
    "objects": [
        {"name": "eicar.com", "status": "infected", "viruses": ["Eicar-Test-Signature"], "action": "remove"},
        {"name": "report.pdf", "status": "clean", "viruses": [], "action": "pass"},
    ],
    "group": "staff",
    "queue_id": "Q1abc",
    "blocked": True,
    "subject": "quarterly report",
}


def notification(kind: str = "admin", event: dict[str, Any] | None = None, **kw: Any) -> Message:
    options: dict[str, Any] = {
        "from_addr": "smtpgw@gw.test",
        "to_addrs": ["admin@gw.test"],
        "template_path": TEMPLATES / "notify.tmpl",
        "date_format": "%Y-%m-%d",
        "time_format": "%H:%M",
        "now": NOW,
    }
    options.update(kw)
    data = notify.build_notification(kind, ENVELOPE, event or EVENT, **options)
    assert data.isascii()
    assert data.count(b"\n") == data.count(b"\r\n")
    return email.message_from_bytes(data, policy=email.policy.default)


def write(tmp_path: Path, text: str | bytes, name: str = "notify.tmpl") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


# --- templates ----------------------------------------------------------------------------


def test_shipped_templates_load() -> None:
    loaded = templates.load_templates(TEMPLATES)
    assert sorted(loaded) == ["disclaimer", "dsn", "notify"]
    for path in TEMPLATES.glob("*.tmpl"):
        assert path.stat().st_size <= templates.MAX_TEMPLATE_BYTES


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("Subject: x\n\nHello %NOPE%\n", "notify.tmpl:3: unknown macro %NOPE%"),
        ("Subject: x\n\n100% sure\n", "notify.tmpl:3: stray '%'"),
        ("Subject: x\n\n%sender%\n", "stray '%'"),
        ("Subject: x\n\n%BEGIN_OBJECTS%\n%OBJECT_NAME%\n", "%BEGIN_OBJECTS% is never closed"),
        ("Subject: x\n\n%END_OBJECTS%\n", "does not match"),
        ("Subject: x\n\n%BEGIN_OBJECTS%%BEGIN_SPAM%%END_OBJECTS%%END_SPAM%\n", "does not match"),
        ("Subject: x\n\n%OBJECT_NAME%\n", "valid only inside %BEGIN_OBJECTS%"),
        ("Subject: x\n\n%BEGIN_OBJECTS%%BEGIN_RECIPIENTS%%END_RECIPIENTS%%END_OBJECTS%\n", "inside another list block"),
        ("Subject: x\n\n%BEGIN_WHATEVER%%END_WHATEVER%\n", "unknown block %BEGIN_WHATEVER%"),
        ("Subject: x\n\n%BEGIN_SPAM%%BEGIN_SPAM%%END_SPAM%%END_SPAM%\n", "inside itself"),
        ("Subject: x\nBcc: someone@c.test\n\nbody\n", "notify.tmpl:2: header lines may be Subject: or X-...: only"),
        ("X-Note: x\n\nbody\n", "must begin with a Subject: line"),
        ("\nbody only\n", "must begin with a Subject: line"),
        ("Subject: x\n\nbell \x07 here\n", "control character"),
        ("Subject: x\n\n%FAILURE%\n", "unknown macro %FAILURE%"),
    ],
)
def test_template_errors_are_clear(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(TemplateError) as caught:
        templates.load_template(write(tmp_path, text))
    assert problem in str(caught.value)
    assert str(tmp_path) in str(caught.value)


def test_missing_oversized_and_non_utf8_templates(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="cannot read template"):
        templates.load_template(tmp_path / "notify.tmpl")
    with pytest.raises(TemplateError, match="larger than 8192 bytes"):
        templates.load_template(write(tmp_path, "Subject: x\n\n" + "y" * 8200))
    with pytest.raises(TemplateError, match="not UTF-8"):
        templates.load_template(write(tmp_path, b"Subject: x\n\n\xff\xfe\n"))
    with pytest.raises(TemplateError, match="unknown template kind"):
        templates.load_template(write(tmp_path, "Subject: x\n\n", "other.tmpl"))


def test_load_templates_reports_every_problem(tmp_path: Path) -> None:
    write(tmp_path, "Subject: x\n\n%NOPE%\n")
    write(tmp_path, "x %\n", "disclaimer.tmpl")
    with pytest.raises(TemplateError) as caught:
        templates.load_templates(tmp_path)
    message = str(caught.value)
    assert "notify.tmpl:3: unknown macro" in message
    assert "disclaimer.tmpl:1: stray" in message
    assert "dsn.tmpl: cannot read template" in message


def test_macro_is_checked_against_the_template_kind(tmp_path: Path) -> None:
    path = write(tmp_path, "Subject: x\n\n%RCPT_DIAG%\n", "custom.tmpl")
    with pytest.raises(TemplateError, match="unknown macro %RCPT_DIAG% in a notify template"):
        templates.load_template(path, "notify")
    with pytest.raises(TemplateError, match="valid only inside %BEGIN_RECIPIENTS%"):
        templates.load_template(path, "dsn")


def test_syntax_escape_comments_blocks(tmp_path: Path) -> None:
    text = (
        "%# a comment line, dropped\n"
        "Subject: %QUEUE_ID% 100%% %BEGIN_SPAM%spam%END_SPAM%\n"
        "\n"
        "Objects:\n"
        "%BEGIN_OBJECTS%\n"
        "* %OBJECT_NAME% [%OBJECT_STATUS%]\n"
        "%END_OBJECTS%\n"
        "%BEGIN_BLOCKED%\n"
        "withheld\n"
        "%END_BLOCKED%\n"
        "%BEGIN_DELIVERED%delivered%END_DELIVERED%\n"
        "end %%SENDER%% %SENDER%\n"
    )
    template = templates.load_template(write(tmp_path, text))
    values, lists = notify.event_context(ENVELOPE, EVENT, "%Y", "%H", NOW)
    fields, body = template.render(values, lists)
    assert fields == [("Subject", "Q1abc 100%")]
    assert body == (
        "Objects:\n"
        "* eicar.com [infected]\n"
        "* report.pdf [clean]\n"
        "withheld\n"
        "\n"
        "end %SENDER% a@b.test\n"
    )


def test_list_blocks_are_bounded(tmp_path: Path) -> None:
    template = templates.load_template(write(tmp_path, "Subject: x\n\n%BEGIN_OBJECTS%o\n%END_OBJECTS%"))
    event = {"objects": [{"name": f"n{i}"} for i in range(5000)]}
    values, lists = notify.event_context(ENVELOPE, event, "%Y", "%H", NOW)
    assert template.render(values, lists)[1].count("o\n") == templates.MAX_ITEMS


def test_template_is_reloaded_when_it_changes(tmp_path: Path) -> None:
    path = write(tmp_path, "Subject: one\n\n")
    assert templates.load_template(path).render({}, {})[0] == [("Subject", "one")]
    path.write_text("Subject: second\n\n")
    assert templates.load_template(path).render({}, {})[0] == [("Subject", "second")]


# --- notifications ------------------------------------------------------------------------


def test_admin_notification_lists_objects() -> None:
    message = notification("admin")
    assert message["Subject"] == "[staff] Blocked message (infected): quarterly report"
    assert email.utils.parseaddr(message["From"])[1] == "smtpgw@gw.test"
    assert email.utils.parseaddr(message["To"])[1] == "admin@gw.test"
    assert message["Auto-Submitted"] == "auto-generated"
    assert email.utils.parsedate_to_datetime(message["Date"]).timestamp() == NOW
    body = message.get_content()
    assert "- eicar.com: infected Eicar-Test-Signature (action: remove)" in body
    assert "- report.pdf: clean" in body
    assert "Queue ID:     Q1abc" in body
    assert "Recipients:   x@y.test, z@y.test" in body
    assert "the message was blocked" in body


@pytest.mark.parametrize(
    ("kind", "present", "absent"),
    [
        ("admin", "needs your attention", "Your message"),
        ("sender", "message you sent to x@y.test, z@y.test", "needs your attention"),
        ("recipient", "sent to you by a@b.test", "message you sent"),
    ],
)
def test_each_kind_gets_its_own_text(kind: str, present: str, absent: str) -> None:
    body = notification(kind, to_addrs=["someone@b.test"]).get_content()
    assert present in body
    assert absent not in body


def test_delivered_and_spam_blocks() -> None:
    event = dict(EVENT, blocked=False, spam_status="Probable Spam", spam_method="content")
    message = notification("recipient", event)
    assert message["Subject"].startswith("Message checked (infected)")
    body = message.get_content()
    assert "delivered to you" in body
    assert "Spam filter verdict: Probable Spam (method: content)" in body


def test_locale_formats_are_used() -> None:
    body = notification(date_format="%d.%m.%Y", time_format="at %H h").get_content()
    assert re.search(r"\d\d\.\d\d\.2023 at \d\d h", body)


def test_object_names_cannot_fake_lines() -> None:
    event = dict(EVENT, objects=[{"name": "a.txt\n\nAll objects clean.\r\n", "status": "infected"}])
    body = notification("recipient", event).get_content()
    assert "- a.txt All objects clean.: infected" in body
    assert "\nAll objects clean." not in body


def test_subject_injection_stays_in_one_header() -> None:
    message = notification("admin", dict(EVENT, subject="hi\r\nBcc: victim@c.test\r\n\r\nbody"))
    assert message["Bcc"] is None
    assert message["Subject"].endswith("hi Bcc: victim@c.test body")


def test_a_long_unspaced_subject_keeps_lines_within_998() -> None:
    # folded encoded words decode to one 1,800-character word: RFC 5322 §2.1.1 still binds us
    subject = "\r\n ".join(f"=?utf-8?q?{'a' * 60}?=" for _ in range(30))
    data = notify.build_notification(
        "admin", ENVELOPE, dict(EVENT, subject=subject.encode()), "smtpgw@gw.test", ["admin@gw.test"],
        TEMPLATES / "notify.tmpl", "%Y-%m-%d", "%H:%M", NOW,
    )
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message["Subject"] == "[staff] Blocked message (infected): " + "a" * 1800


def test_non_ascii_values_are_encoded() -> None:
    message = notification("admin", dict(EVENT, subject="=?utf-8?q?Gr=C3=BC=C3=9Fe?= aus Köln", group="Düsseldorf"))
    assert message["Subject"] == "[Düsseldorf] Blocked message (infected): Grüße aus Köln"
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert "Group:        Düsseldorf" in message.get_content()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown notification kind"):
        notification("postmaster")
    with pytest.raises(ValueError, match="at least one recipient"):
        notification(to_addrs=[])
    with pytest.raises(ValueError, match="unfit for a header"):
        notification(to_addrs=["x@y.test\r\nBcc: victim@c.test"])


def test_template_object_can_be_passed() -> None:
    template = templates.load_template(TEMPLATES / "notify.tmpl")
    assert notification(template_path=template)["Subject"].startswith("[staff]")
    with pytest.raises(TemplateError, match="not notify"):
        notification(template_path=templates.load_template(TEMPLATES / "dsn.tmpl"))


# --- disclaimer ---------------------------------------------------------------------------

SINGLE = (
    b"Received: from client.b.test\r\n\tby gw.test; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: a@b.test\r\n"
    b"Subject: hello\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain;\r\n charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Gr=FC=DFe\r\n"
)
MIXED = (
    b"From: a@b.test\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="XYZ"\r\n'
    b"\r\n"
    b"preamble\r\n"
    b"--XYZ\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"first part\r\n"
    b"--XYZ\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"AAECAw==\r\n"
    b"--XYZ--\r\n"
    b"epilogue\r\n"
)


def parts(data: bytes) -> list[Message]:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message.get_content_type() == "multipart/mixed"
    assert not message.defects
    return list(message.iter_parts())


def test_disclaimer_wraps_a_single_part_message() -> None:
    result = add_disclaimer(SINGLE, "Scanned by smtpgw.")
    head = SINGLE[: SINGLE.index(b"MIME-Version")]
    assert result.startswith(head + b"MIME-Version: 1.0\r\n")  # message headers kept byte for byte
    original, added = parts(result)
    assert original.get_content_type() == "text/plain"
    assert original.get_content() == "Grüße\r\n" or original.get_content() == "Grüße\n"
    assert b"Content-Type: text/plain;\r\n charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nGr=FC=DFe\r\n" in result
    assert added.get_content_type() == "text/plain"
    assert added.get_content().strip() == "Scanned by smtpgw."


def test_disclaimer_goes_before_the_close_delimiter_of_multipart_mixed() -> None:
    result = add_disclaimer(MIXED, "Scanned by smtpgw.")
    cut = MIXED.index(b"\r\n--XYZ--")
    assert result.startswith(MIXED[:cut])
    assert result.endswith(MIXED[cut:])
    first, second, added = parts(result)
    assert first.get_content() == "first part"  # RFC 2046 §5.1.1: the CRLF before "--XYZ" is the delimiter's
    assert second.get_content() == b"\x00\x01\x02\x03"
    assert added.get_content().strip() == "Scanned by smtpgw."
    assert email.message_from_bytes(result).epilogue == "epilogue\r\n"


def test_disclaimer_wraps_other_multiparts() -> None:
    alternative = MIXED.replace(b"multipart/mixed", b"multipart/alternative")
    result = add_disclaimer(alternative, "Scanned.")
    inner, added = parts(result)
    assert inner.get_content_type() == "multipart/alternative"
    assert len(list(inner.iter_parts())) == 2
    assert alternative[alternative.index(b"\r\n\r\n") + 4 :] in result


def test_disclaimer_keeps_lf_line_endings_and_encodes_non_ascii() -> None:
    message = b"From: a@b.test\nSubject: plain\n\nline one\nline two\n"
    result = add_disclaimer(message, "Geprüft.\nZweite Zeile.")
    assert b"\r" not in result
    original, added = parts(result)
    assert original.get_content() == "line one\nline two\n"
    assert added["Content-Transfer-Encoding"] == "quoted-printable"
    assert added.get_content() == "Geprüft.\nZweite Zeile."
    assert result.isascii()


def test_disclaimer_closes_a_truncated_multipart() -> None:
    truncated = MIXED[: MIXED.index(b"--XYZ--")]
    first, second, added = parts(add_disclaimer(truncated, "Scanned."))
    assert added.get_content().strip() == "Scanned."
    # found by bench/fuzz.py: the last part lost its final line break to the new delimiter
    text = MIXED[: MIXED.index(b"--XYZ\r\nContent-Type: application")] + b"--XYZ\r\n\r\nlast line\r\n"
    before = [n.data for n in mime.decompose(text).walk() if not n.children]
    after = [n.data for n in mime.decompose(add_disclaimer(text, "Scanned.")).walk() if not n.children]
    assert before[-1] == b"last line\r\n" and after[:-1] == before


def test_disclaimer_wraps_a_multipart_mixed_without_delimiter_lines() -> None:
    # found by bench/fuzz.py: the body was left as the preamble of the added part, hidden by readers
    close_only = MIXED.replace(b"--XYZ\r\n", b"")  # the close-delimiter opens no part either
    for boundary in (b"NONE", b"XY", b"xyz", b"XYZ"):  # not in the body, a prefix, another case, close only
        message = (close_only if boundary == b"XYZ" else MIXED).replace(b'boundary="XYZ"', b'boundary="' + boundary + b'"')
        before = [n.data for n in mime.decompose(message).walk() if not n.children]
        result = add_disclaimer(message, "Scanned.")
        inner, added = parts(result)
        assert inner.get_content_type() == "multipart/mixed" and added.get_content().strip() == "Scanned."
        after = [n.data for n in mime.decompose(result).walk() if not n.children]
        assert after[: len(before)] == before and b"Scanned." in after[-1]


def test_disclaimer_wrapper_takes_content_fields_after_an_obsolete_field_name() -> None:
    # found by bench/fuzz.py on the torture set: "Message-Id : <...>" (obs-optional, RFC 5322 §4.5)
    # ended the header there, so the Content-Type after it went into the body of a text part
    # (read here as the anti-virus decomposition reads it: Python's email stops at such a field)
    alternative = MIXED.replace(b"multipart/mixed", b"multipart/alternative")
    message = alternative.replace(b"MIME-Version: 1.0", b"Message-Id : <m@b.test>\r\nMIME-Version: 1.0")
    result = add_disclaimer(message, "Scanned.")
    assert result.startswith(b"From: a@b.test\r\nMessage-Id : <m@b.test>\r\nMIME-Version: 1.0\r\n")
    tree = mime.decompose(result)
    assert [n.content_type for n in tree.walk()] == [
        "multipart/mixed", "multipart/alternative", "text/plain", "application/octet-stream", "text/plain"]
    assert not tree.defects


def test_disclaimer_reads_content_type_only_in_the_header_it_moves() -> None:
    # found by bench/fuzz.py: a line that is not a field ends the header (RFC 5322 §2.2), but the
    # Content-Type after it was still read, and a part was inserted into what readers see as text
    message = MIXED.replace(b"MIME-Version: 1.0", b"this line is not a field\r\nMIME-Version: 1.0")
    before = [n.data for n in mime.decompose(message).walk()]
    result = add_disclaimer(message, "Scanned.")
    tree = mime.decompose(result)
    assert [n.content_type for n in tree.walk()] == ["multipart/mixed", "text/plain", "text/plain"]
    assert [n.data for n in tree.walk()][1:2] == before and b"Scanned." in (tree.root.children[1].data or b"")


def test_disclaimer_on_8bit_body_marks_the_wrapper_8bit() -> None:
    message = b"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + "Grüße".encode() + b"\r\n"
    result = add_disclaimer(message, "Scanned.")
    assert re.search(rb"\r\nContent-Transfer-Encoding: 8bit\r\n", result[: result.index(b"\r\n\r\n") + 2])
    original, _ = parts(result)
    assert original.get_content().rstrip("\r\n") == "Grüße"


def corpus_messages() -> list[Path]:
    files = sorted((CORPUS / "mime-torture").rglob("*.eml"))
    files += sorted((CORPUS / "spamassassin").glob("*.eml"))[::40]
    return files


def test_disclaimer_survives_the_corpus() -> None:
    files = corpus_messages()
    if not files:
        missing(f"test corpus not found at {CORPUS}")
    for path in files:
        raw = path.read_bytes()
        if raw.startswith(b"From "):
            raw = raw[raw.index(b"\n") + 1 :]
        result = add_disclaimer(raw, "Scanned by smtpgw.")
        assert b"Scanned by smtpgw." in result, path.name
        if b'multipart/mixed; boundary="=_smtpgw_' in result:  # wrapped: the body moved whole
            body = raw[headers.header_end(raw) :]
            assert body in result or raw in result, path.name
            python_view = email.message_from_bytes(raw, policy=email.policy.compat32)
            if any(isinstance(d, email.errors.MissingHeaderBodySeparatorDefect) for d in python_view.defects):
                continue  # Python's parser ends the header early (at "Name :", obs syntax): it reads both as text
        else:  # one part inserted: everything else kept around it
            keep = next(i for i, (a, b) in enumerate(zip(raw + b"\0", result)) if a != b)
            assert result.endswith(raw[keep:]), path.name
            if not email.message_from_bytes(raw, policy=email.policy.compat32).is_multipart():
                continue  # a multipart only some readers see as one (e.g. a folded boundary)
        assert email.message_from_bytes(result, policy=email.policy.compat32).is_multipart(), path.name


def test_render_disclaimer() -> None:
    text = notify.render_disclaimer(TEMPLATES / "disclaimer.tmpl", ENVELOPE, EVENT, "%Y-%m-%d", "%H:%M", NOW)
    assert text.startswith("This message was checked for viruses by smtpgw ")
    assert "2023-11-1" in text
