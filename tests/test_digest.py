"""The quarantine digest's content: who gets one, what it lists, the release instruction and
console link, and digest.tmpl optional in a TemplatesPath (smtpgw/reports/digest.py)."""

from __future__ import annotations

import email
import os
from pathlib import Path

import pytest

from smtpgw.config import load_config
from smtpgw.console import auth as console_auth
from smtpgw.reports import digest
from smtpgw.reports.templates import BASE_KINDS, TemplateError, load_templates
from smtpgw.spool.store import Store

MINIMAL = Path(__file__).resolve().parent / "data" / "config" / "minimal.conf"
MESSAGE = b"From: a@example.test\r\nSubject: =?utf-8?q?held_caf=C3=A9?=\r\n\r\nbody\r\n"


def configured(folder: Path, templates: Path, console: bool):
    text = MINIMAL.read_text() + "SpamQuarantinePath=var/spam\n" + f"[path]\nTemplatesPath={templates}\n"
    if console:
        text += f"[smtpgw.console]\nListenOn=127.0.0.1:8443\nAdminPasswordHash={console_auth.hash_password('pw')}\n"
    path = folder / "smtpgw.conf"
    path.write_text(text)
    return load_config(path)


def put(folder: Path, qid: str, status: str, sender: str, recipients: list[str]) -> str:
    envelope = {"sender": sender, "recipients": [{"addr": r} for r in recipients], "received_at": 1.7e9}
    return Store(folder).put(qid, MESSAGE, envelope, status, "test")


def test_digest_lists_held_items_per_protected_recipient(tmp_path: Path) -> None:
    cfg = configured(tmp_path, tmp_path / "no-templates-here", console=True)
    spam_item = put(tmp_path / "var" / "spam", "Qspam", "SPM", "", ["Bob@example.test", "", "x@elsewhere.test"])
    virus_item = put(tmp_path / "var" / "quarantine", "Qvirus", "INF", "eve@evil.test", ["bob@example.test"])
    put(tmp_path / "var" / "quarantine", "Qbak", "BAK", "a@example.test", ["carol@example.test"])  # not held: a backup
    stores = {os.path.abspath(cfg.policy.QuarantinePath): "quarantine"}
    built = digest.collect(cfg, stores, 1.8e9)
    assert [(to, count) for to, count, _ in built] == [("bob@example.test", 2)]
    message = email.message_from_bytes(built[0][2])
    assert message["To"] == "bob@example.test" and message["From"] == "gateway@example.test"
    body = message.get_payload(decode=True).decode()
    assert "Subject:  held café" in body and "From:     <>" in body and "From:     eve@evil.test" in body
    assert f"Release:  smtpgw.py store release {virus_item}" in body
    assert f"Release:  smtpgw.py store --path {tmp_path / 'var' / 'spam'} release {spam_item}" in body
    assert f"Console:  http://gw.example.test:8443/store/item?name=quarantine&id={virus_item}" in body
    assert "Console:  http://gw.example.test:8443\n" in body.replace("\r\n", "\n")  # a store the console does not show


def test_no_console_no_link_and_nothing_held_no_digest(tmp_path: Path) -> None:
    cfg = configured(tmp_path, tmp_path, console=False)
    assert digest.collect(cfg, {}, 1.8e9) == []  # no store yet
    put(tmp_path / "var" / "quarantine", "Qout", "SPM", "a@example.test", ["x@elsewhere.test"])
    assert digest.collect(cfg, {}, 1.8e9) == []  # held for nobody protected
    item = put(tmp_path / "var" / "quarantine", "Qin", "PSP", "a@example.test", ["u@example.test"])
    (built,) = digest.collect(cfg, {}, 1.8e9)
    assert item.encode() in built[2] and b"Console:" not in built[2]


def test_digest_template_is_optional_and_checked(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    for kind in BASE_KINDS:  # a TemplatesPath made before digests existed still loads
        (templates / f"{kind}.tmpl").write_bytes((Path(digest.SHIPPED_TEMPLATE).parent / f"{kind}.tmpl").read_bytes())
    assert sorted(load_templates(templates)) == sorted(BASE_KINDS)
    cfg = configured(tmp_path, templates, console=False)
    assert digest.template_path(cfg) == digest.SHIPPED_TEMPLATE
    (templates / "digest.tmpl").write_text("Subject: held %SUBJECT%\n\n%BEGIN_ITEMS%%ITEM_ID%\n%END_ITEMS%\n")
    with pytest.raises(TemplateError, match=r"digest.tmpl:1: unknown macro %SUBJECT%"):
        digest.load(cfg)


def test_subject_is_read_as_every_part_reads_the_header(tmp_path: Path) -> None:
    """The digest reads a held message's Subject with the one header reader: an RFC 2047 word
    and a raw UTF-8 Subject (RFC 6532) are shown decoded; a Subject after a line that is not a
    field is body text (RFC 5322 §2.2), and a message without one shows none."""
    cases = {
        "word": (b"Subject: =?utf-8?q?held_caf=C3=A9?=\r\n\r\nx\r\n", "held café"),
        "raw": (b"From: a@example.test\r\nSubject: caf\xc3\xa9\r\n  folded\r\n\r\nx\r\n", "café folded"),
        "stray": (b"From: a@example.test\r\nnot a field\r\nSubject: hidden\r\n\r\nx\r\n", ""),
        "none": (b"From: a@example.test\r\n\r\nSubject: body\r\n", ""),
    }
    for name, (raw, shown) in cases.items():
        path = tmp_path / f"{name}.eml"
        path.write_bytes(raw)
        assert digest.subject_of(str(path)) == shown, name
    assert digest.subject_of(str(tmp_path / "missing.eml")) == ""
