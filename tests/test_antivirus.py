"""One message's anti-virus scan (smtpgw.antivirus) with a real private clamd."""

from __future__ import annotations

import base64
import email
import email.policy
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from smtpgw.scan.antivirus import (
    AVResult,
    av_log_event,
    load_placeholder,
    render_placeholder,
    scan_message,
)
from smtpgw.config import load_config
from smtpgw.log import line
from smtpgw.mail.fields import message_start
from smtpgw.mail.mime import decompose
from smtpgw.reports.templates import TemplateError
from smtpgw.scan.clamd import ClamdPool, ScannerUnavailable
from tests.support.clamd import (
    EICAR_NAME,
    SUSPECT_NAME,
    ClamdInstance,
    eicar,
    encrypted_zip,
    mime_message,
    suspect_marker,
    tar_gz,
    uu_flood,
    zip_bytes,
)
from tests.test_mime import B64, attachment, b64, corpus_files, zeros_zip

MINIMAL = Path(__file__).parent / "data" / "config" / "minimal.conf"
TEXT = ("Content-Type: text/plain; charset=us-ascii", b"Hello, the report is attached.")
NOW = 1_699_963_200.0  # 2023-11-14 12:00 UTC: the same date in every time zone


def config(folder: Path, clamd: ClamdInstance, *policy: str, ave: tuple[str, ...] = ()) -> Any:
    """A real configuration: the minimal test file plus these policy and ave lines."""
    overridden = {line.split("=", 1)[0] + "=" for line in policy}
    base = [line for line in MINIMAL.read_text().splitlines() if not line.startswith(tuple(overridden))]
    text = "\n".join(base + list(policy)) + "\n[smtpgw.ave]\n"
    text += f"ClamdAddress={clamd.unix_address}\n" + "\n".join(ave) + "\n"
    path = folder / "smtpgw.conf"
    path.write_text(text)
    return load_config(path)


def scan(cfg: Any, raw: bytes, pool: ClamdPool | None = None) -> AVResult:
    pool = pool or ClamdPool.from_config(cfg.ave)
    return scan_message(raw, cfg.policy, cfg.ave, pool, cfg.base.TemplatesPath, NOW)


def statuses(result: AVResult) -> dict[str, str]:
    return {item.path: item.status for item in result.objects}


@pytest.fixture
def cfg(tmp_path: Path, clamd: ClamdInstance) -> Any:
    """The shipped default policy: infected objects removed, such messages blocked."""
    return config(tmp_path, clamd)


def message_with(name: str, data: bytes, ctype: str = "application/octet-stream") -> bytes:
    return mime_message([TEXT, attachment(name, data, ctype)])


# region where the virus hides


def test_eicar_as_plain_8bit_attachment(cfg: Any) -> None:
    raw = mime_message([TEXT, ('Content-Type: application/octet-stream; name="eicar.com"', eicar())])
    result = scan(cfg, raw)
    assert statuses(result) == {"1": "clean", "2:eicar.com": "infected"}
    assert result.status == "infected" and result.virus_names == (EICAR_NAME,)
    assert result.blocked and result.block_reason == f"infected 2:eicar.com ({EICAR_NAME})"
    assert result.notify_admin and result.notify_recipient and not result.notify_sender
    assert result.save_in_qb
    template, values = av_log_event(result)
    assert line(template, *values) == (
        f'AV-SCANNED, group=policy, status="infected", names="{EICAR_NAME}", '
        f'reasons="BlockMessage: infected 2:eicar.com ({EICAR_NAME}); '
        f"NotifyAdmin: infected 2:eicar.com ({EICAR_NAME}); "
        f"NotifyRecipient: infected 2:eicar.com ({EICAR_NAME}); "
        f'SaveInQB: infected 2:eicar.com ({EICAR_NAME})"'
    )


@pytest.mark.parametrize(
    "name, payload, path",
    [
        ("eicar.com", eicar(), "2:eicar.com"),
        ("docs.zip", zip_bytes({"a.txt": b"fine", "dir/eicar.com": eicar()}), "2:docs.zip/dir/eicar.com"),
        ("logs.tar.gz", tar_gz({"x/eicar.com": eicar()}), "2:logs.tar.gz/logs.tar/x/eicar.com"),
    ],
)
def test_eicar_in_base64_zip_and_tar_gz(cfg: Any, name: str, payload: bytes, path: str) -> None:
    result = scan(cfg, message_with(name, payload))
    assert statuses(result)[path] == "infected"
    found = next(item for item in result.objects if item.path == path)
    assert found.virus_names == (EICAR_NAME,) and found.action == "remove"
    assert found.decision == "infected, ActionInfected=remove"


def test_eicar_in_a_zip_inside_a_forwarded_message(cfg: Any) -> None:
    inner = mime_message([TEXT, attachment("inner.zip", zip_bytes({"eicar.com": eicar()}))], boundary="inner")
    raw = mime_message([TEXT, ('Content-Type: message/rfc822; name="fwd.eml"', inner)])
    result = scan(cfg, raw)
    assert statuses(result) == {"1": "clean", "2/1": "clean", "2/2:inner.zip/eicar.com": "infected"}
    # the clean inner text stays, the zip goes
    kept = [(n.path, n.data) for n in decompose(result.message).walk() if n.data is not None]
    assert kept == [("1", TEXT[1]), ("2/1", TEXT[1])]


def test_tar_gz_inside_a_base64_forwarded_message(cfg: Any) -> None:
    packed = attachment("pack.tgz", tar_gz({"run.com": eicar()}), "application/gzip")
    inner = mime_message([packed], boundary="in")
    encoded = ("Content-Type: message/rfc822\nContent-Transfer-Encoding: base64", base64.encodebytes(inner))
    raw = mime_message([TEXT, encoded])
    result = scan(cfg, raw)
    assert statuses(result)["2/1:pack.tgz/pack.tar/run.com"] == "infected"
    assert any("message/rfc822 with base64" in d for d in result.defects)


def test_suspicious_detection(cfg: Any) -> None:
    result = scan(cfg, message_with("tool.bin", b"prefix " + suspect_marker()))
    assert statuses(result)["2:tool.bin"] == "suspicious" and result.virus_names == (SUSPECT_NAME,)


# endregion
# region what cannot be scanned


def test_password_protected_zip(cfg: Any) -> None:
    result = scan(cfg, message_with("secret.zip", encrypted_zip("plan.doc", b"text", b"pw")))
    assert statuses(result)["2:secret.zip/plan.doc"] == "protected"
    assert result.status == "protected" and result.blocked


def test_zip_bomb_is_an_error(cfg: Any) -> None:
    result = scan(cfg, message_with("bomb.zip", zeros_zip("zeros.bin", 128 << 20)))
    bomb = next(item for item in result.objects if item.path == "2:bomb.zip/zeros.bin")
    assert bomb.status == "error" and "MaximalCompressionRatio" in bomb.reason
    assert result.status == "error" and result.blocked


def test_truncated_zip_and_broken_base64_are_errors(cfg: Any) -> None:
    truncated = zip_bytes({"a.txt": os.urandom(2000)})[:-40]
    result = scan(cfg, message_with("cut.zip", truncated))
    assert statuses(result)["2:cut.zip"] == "error"
    cut_short = ("Content-Type: application/octet-stream; name=x.bin\n" + B64, b"QUJDREVGR0hJS")
    raw = mime_message([TEXT, cut_short])
    result = scan(cfg, raw)
    assert statuses(result)["2:x.bin"] == "error" and "truncated base64" in result.objects[1].reason


@pytest.mark.parametrize(
    "name, truncated",
    [
        # zipfile needs the central directory; clamd reads the local headers
        ("cut.zip", zip_bytes({"eicar.com": eicar()}, method=0)[:-30]),
        # the gzip stream ends early: what did inflate is scanned
        ("cut.tgz", tar_gz({"eicar.com": eicar() + os.urandom(4000)})[:-30]),
    ],
    ids=["zip", "tar.gz"],
)
def test_a_truncated_archive_still_goes_to_clamd(cfg: Any, name: str, truncated: bytes) -> None:
    result = scan(cfg, message_with(name, truncated))
    assert result.status == "infected" and result.virus_names == (EICAR_NAME,)


# endregion
# region policy: filter, actions, rebuild


def test_filtered_names_and_types_are_not_scanned(tmp_path: Path, clamd: ClamdInstance) -> None:
    cfg = config(
        tmp_path, clamd,
        "IncludeByName=*.exe", "IncludeByName=*.scr", "ExcludeByName=safe*.exe",
        "IncludeByMime=application/x-msdownload", "ActionFiltered=remove", "BlockMessage=infected",
    )
    raw = mime_message(
        [
            TEXT,
            attachment("run.EXE", eicar()),  # filtered before scanning: EICAR is never seen
            attachment("safe-setup.exe", b"MZ"),
            attachment("plain.bin", b"MZ", "application/x-msdownload"),
            attachment("pack.zip", zip_bytes({"inner.scr": b"MZ", "ok.txt": b"ok"})),
        ]
    )
    result = scan(cfg, raw)
    assert statuses(result) == {
        "1": "clean",
        "2:run.EXE": "filtered",
        "3:safe-setup.exe": "clean",
        "4:plain.bin": "filtered",
        "5:pack.zip/inner.scr": "filtered",
        "5:pack.zip/ok.txt": "clean",
    }
    assert result.virus_names == () and not result.blocked
    reasons = {item.path: item.reason for item in result.objects}
    assert reasons["2:run.EXE"] == 'name "run.EXE" matches IncludeByName "*.exe"'
    mask = "application/x-msdownload"
    assert reasons["4:plain.bin"] == f'type "{mask}" matches IncludeByMime "{mask}"'
    rebuilt = decompose(result.message)
    # a member cannot be cut out of a zip: the archive holding a filtered member goes
    assert sorted(n.name for n in rebuilt.walk() if n.name) == ["safe-setup.exe"]


def test_filter_sees_content_type_name_and_disposition_filename(tmp_path: Path, clamd: ClamdInstance) -> None:
    # a reader may save the part under either name: a harmless filename= must not hide name="x.exe"
    cfg = config(tmp_path, clamd, "IncludeByName=*.exe", "ActionFiltered=remove", "BlockMessage=filtered")
    b64_header = "Content-Transfer-Encoding: base64"
    parts = [
        ('Content-Type: application/octet-stream; name="run.EXE"\n'
         f'Content-Disposition: attachment; filename="readme.txt"\n{b64_header}', b64(b"MZ")),
        ("Content-Type: application/octet-stream; name*=utf-8''setup%2Eexe\n"
         f'Content-Disposition: attachment; filename="notes.txt"\n{b64_header}', b64(b"MZ")),
        ('Content-Type: application/octet-stream; name="same.txt"\n'
         f'Content-Disposition: attachment; filename="same.txt"\n{b64_header}', b64(b"ok")),
    ]
    result = scan(cfg, mime_message([TEXT, *parts]))
    assert statuses(result) == {"1": "clean", "2:readme.txt": "filtered", "3:notes.txt": "filtered",
                                "4:same.txt": "clean"}
    reasons = {item.path: item.reason for item in result.objects}
    assert reasons["2:readme.txt"] == 'name "run.EXE" matches IncludeByName "*.exe"'
    assert reasons["3:notes.txt"] == 'name "setup.exe" matches IncludeByName "*.exe"'
    assert result.blocked


def test_removing_every_part_leaves_valid_mime(tmp_path: Path, clamd: ClamdInstance) -> None:
    # RFC 2046 §5.1.1: a multipart keeps at least one body part, here an empty text part
    cfg = config(tmp_path, clamd, "ActionInfected=remove", "BlockMessage=none", "AddXHeaders=false")
    raw = mime_message([attachment("eicar.com", eicar()), attachment("eicar2.com", eicar())])
    result = scan(cfg, raw)
    assert result.modified and not result.blocked
    parsed = email.message_from_bytes(result.message, policy=email.policy.default)
    assert [part.defects for part in parsed.walk()] == [[], []]
    assert [part.get_content_type() for part in parsed.walk()] == ["multipart/mixed", "text/plain"]
    assert parsed.get_payload()[0].get_content() == ""
    assert b"eicar" not in result.message
    tree = decompose(result.message)
    assert not tree.defects and [n.path for n in tree.walk()] == ["", "1"]


def test_remove_keeps_every_other_byte(tmp_path: Path, clamd: ClamdInstance) -> None:
    cfg = config(tmp_path, clamd, "ActionInfected=remove", "BlockMessage=none", "AddXHeaders=false")
    html = ("Content-Type: text/html", b"<p>last</p>")
    raw = mime_message([TEXT, attachment("eicar.com", eicar()), html], eol=b"\n")
    result = scan(cfg, raw)
    cut = decompose(raw).root.children[1].cut
    assert result.modified and not result.blocked
    assert result.message == raw[: cut[0]] + raw[cut[1] :]


def test_placeholder_replaces_the_object_only(tmp_path: Path, clamd: ClamdInstance) -> None:
    cfg = config(tmp_path, clamd, "ActionInfected=placeholder", "BlockMessage=none")
    raw = mime_message([TEXT, attachment("pack.zip", zip_bytes({"eicar.com": eicar()})), TEXT])
    result = scan(cfg, raw)
    part = decompose(raw).root.children[1]
    header, _, body = result.message.partition(b"\r\n")
    assert header.startswith(b"X-Anti-Virus: smtpgw ")
    message = result.message[result.message.index(b"From: ") :]
    assert message.startswith(raw[: part.start]) and message.endswith(raw[part.end :])
    replacement = message[part.start : len(message) - (len(raw) - part.end)]
    assert b"Content-Type: text/plain" in replacement
    assert b"Object:      eicar.com" in replacement and EICAR_NAME.encode() in replacement
    assert b"Status:      infected" in replacement and b"Action:      placeholder" in replacement


def test_placeholder_template_checks(tmp_path: Path) -> None:
    (tmp_path / "placeholder.tmpl").write_text("%# note\n%OBJECT_NAME% is 100%% gone (%STATUS%)\n")
    template = load_placeholder(str(tmp_path))
    rendered = render_placeholder(template, {"OBJECT_NAME": "a.exe", "STATUS": "infected"})
    assert rendered == "a.exe is 100% gone (infected)\n"
    for text, problem in (("50% off\n", ":1: stray '%'"), ("\n%OBJECT%\n", ":2: unknown macro %OBJECT%")):
        (tmp_path / "placeholder.tmpl").write_text(text)
        with pytest.raises(TemplateError, match=problem):
            load_placeholder(str(tmp_path))
    with pytest.raises(TemplateError, match="cannot read"):
        load_placeholder(str(tmp_path / "missing"))


def test_x_header_value(tmp_path: Path, clamd: ClamdInstance) -> None:
    cfg = config(tmp_path, clamd, "ActionInfected=remove", "BlockMessage=none")
    result = scan(cfg, message_with("eicar.com", eicar()))
    engine = ClamdPool([clamd.unix_address]).engine()
    assert result.engine == str(engine)
    assert result.x_header == (
        f"smtpgw 0.1.0, clamd {engine}, check: 20231114 infected; "
        "2:eicar.com infected, ActionInfected=remove"
    )
    assert result.message.startswith(b"X-Anti-Virus: smtpgw 0.1.0, clamd ")


def test_x_header_replaces_the_senders_own(tmp_path: Path, clamd: ClamdInstance) -> None:
    # a sender's forged "clean" verdict (folded, in any case) must not reach the recipient next to ours
    cfg = config(tmp_path, clamd, "ActionInfected=remove", "BlockMessage=none")
    forged = b"x-anti-virus: smtpgw 0.1.0,\r\n check: 20231114 clean\r\nX-Anti-Virus: clean\r\n"
    result = scan(cfg, forged + message_with("eicar.com", eicar()))
    assert result.message.lower().count(b"x-anti-virus:") == 1
    assert result.message.startswith(b"X-Anti-Virus: " + result.x_header.encode()[:40])
    assert b"clean" not in result.message[: result.message.index(b"From: ")]


def test_cure_cannot_disinfect(tmp_path: Path, clamd: ClamdInstance) -> None:
    cfg = config(tmp_path, clamd, "ActionDisinfected=cure", "ActionInfected=placeholder", ave=("Cure=true",))
    result = scan(cfg, message_with("eicar.com", eicar()))
    found = result.objects[1]
    assert (found.status, found.action) == ("infected", "placeholder")
    assert found.decision == "infected (clamd cannot cure), ActionInfected=placeholder"


def test_check_false_passes_unscanned(tmp_path: Path, clamd: ClamdInstance) -> None:
    cfg = config(tmp_path, clamd, "Check=false")
    raw = message_with("eicar.com", eicar())
    result = scan(cfg, raw, ClamdPool([f"unix:{tmp_path}/no-clamd.sock"]))  # clamd is not even asked
    assert result.status == "not scanned" and not result.checked and result.objects == []
    assert result.message == b"X-Anti-Virus: smtpgw 0.1.0, check: 20231114 not scanned\r\n" + raw


def test_defects_bring_a_whole_message_pass(cfg: Any) -> None:
    # EICAR in the preamble of a multipart that is never closed: no part holds it
    raw = b'Subject: p\nContent-Type: multipart/mixed; boundary="b"\n\n' + eicar() + b"\n--b\n\nhi\n"
    result = scan(cfg, raw)
    assert statuses(result) == {"1": "clean", "message": "infected"}
    assert result.blocked


# endregion
# region the message's scan budget


class CountingPool(ClamdPool):
    """The real pool, counting the scans it is asked for and the bytes sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.sent = 0

    def scan(self, data: bytes) -> Any:
        self.calls += 1
        self.sent += len(data)
        return super().scan(data)


def budget_scan(tmp_path: Path, clamd: ClamdInstance, raw: bytes, *ave: str) -> tuple[AVResult, CountingPool]:
    cfg = config(tmp_path, clamd, ave=ave)
    pool = CountingPool([clamd.unix_address])
    return scan(cfg, raw, pool), pool


def test_one_message_cannot_become_thousands_of_clamd_scans(tmp_path: Path, clamd: ClamdInstance) -> None:
    # 40 text parts x 100 uuencoded files: 4,040 objects, each its own clamd scan before
    result, pool = budget_scan(tmp_path, clamd, uu_flood(40, 100), "MaximalClamdScans=100")
    assert pool.calls == 101 == result.scans  # the budget, and the whole message once more
    assert result.spent == "not scanned: more than MaximalClamdScans (100) clamd scans for the message"
    assert result.status == "error" and result.blocked
    unscanned = [o for o in result.objects if "MaximalClamdScans (100)" in o.reason]
    assert unscanned and all(o.status == "error" for o in unscanned)


def test_a_virus_past_the_budget_is_found_in_the_whole_message(tmp_path: Path, clamd: ClamdInstance) -> None:
    result, pool = budget_scan(tmp_path, clamd, uu_flood(3, 20, tail=eicar()), "MaximalClamdScans=10")
    assert pool.calls == 11
    assert statuses(result)["message"] == "infected" and EICAR_NAME in result.virus_names


def test_objects_with_the_same_content_share_one_scan(tmp_path: Path, clamd: ClamdInstance) -> None:
    same = b"begin 644 a.bin\r\n" + b"#86)C\r\n`\r\nend\r\n"
    raw = mime_message([("Content-Type: text/plain", same * 100)] * 3)
    result, pool = budget_scan(tmp_path, clamd, raw, "MaximalClamdScans=10")
    assert result.status == "clean" and len(result.objects) == 303
    assert pool.calls == 2  # the text of the parts (the same three times) and the file


def test_objects_share_a_verdict_only_when_their_bytes_are_the_same(tmp_path: Path, clamd: ClamdInstance) -> None:
    virus = eicar()
    near = virus[:-1] + b"?"  # the same length, one byte off: clean, and scanned on its own
    raw = mime_message([TEXT, attachment("a.com", virus), attachment("b.com", near), attachment("c.com", virus)])
    result, pool = budget_scan(tmp_path, clamd, raw, "MaximalClamdScans=10")
    assert pool.calls == 3  # the text, the virus (once for a.com and c.com), the near copy
    found = statuses(result)
    assert found["2:a.com"] == found["4:c.com"] == "infected" and found["3:b.com"] == "clean"


def test_the_object_and_content_budgets_end_decomposition(tmp_path: Path, clamd: ClamdInstance) -> None:
    result, pool = budget_scan(tmp_path, clamd, uu_flood(40, 100), "MaximalMessageObjects=50")
    assert result.status == "error" and len(result.objects) <= 51  # the one that crossed the budget too
    assert any("MaximalMessageObjects (50)" in o.reason for o in result.objects)
    assert pool.calls <= 51
    big = os.urandom(700 * 1024)
    raw = mime_message([TEXT, attachment("a.bin", big), attachment("b.bin", big[::-1])])
    result, pool = budget_scan(tmp_path, clamd, raw, "MaximalDecodedSize=1024")
    assert statuses(result)["3:b.bin"] == "error" and result.status == "error"
    assert pool.sent < 2 * len(raw) + 1024 * 1024  # the text, a.bin and the whole message


# region clamd availability


def test_clamd_down_keeps_the_message_then_works_again(
    cfg: Any, clamd_factory: Callable[..., ClamdInstance]
) -> None:
    instance = clamd_factory()
    pool = ClamdPool([instance.unix_address])
    raw = message_with("eicar.com", eicar())
    assert scan(cfg, raw, pool).status == "infected"
    instance.kill()
    with pytest.raises(ScannerUnavailable):
        scan(cfg, raw, pool)
    instance.start()
    assert scan(cfg, raw, pool).status == "infected"


def test_failover_between_two_addresses(tmp_path: Path, clamd: ClamdInstance) -> None:
    cfg = config(tmp_path, clamd)
    pool = ClamdPool([f"unix:{tmp_path}/dead.sock", clamd.tcp_address])
    result = scan(cfg, message_with("eicar.com", eicar()), pool)
    assert result.status == "infected" and pool.servers[0].down_until > 0


# endregion


def test_corpus_scans_without_exception(cfg: Any) -> None:
    files = corpus_files()

    def one(path: Path) -> tuple[Path, AVResult]:
        return path, scan(cfg, path.read_bytes(), pool)

    pool = ClamdPool.from_config(cfg.ave)
    with ThreadPoolExecutor(4) as workers:
        results = list(workers.map(one, files))
    for path, result in results:
        # the test databases know only EICAR and two markers: nothing here matches
        assert result.status in ("clean", "error"), (path, result.objects)
        # the first header field, after a leading mbox From line (which readers skip, RFC 4155)
        start = message_start(result.message)
        first_line = result.message[start : result.message.index(b"\n", start) + 1]
        assert re.fullmatch(rb"X-Anti-Virus: [^\r\n]+\r?\n", first_line)
    assert sum(r.status == "clean" for _, r in results) > len(files) * 0.99
