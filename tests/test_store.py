"""Quarantine, backup and archive stores, and the store command (smtpgw.store)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from smtpgw.app.storecli import format_listing
from smtpgw.app.storecli import store_main
from smtpgw.spool import store as store_module
from smtpgw.spool.store import Item, Store, StoreError, format_size, named_stores, status_for_verdict

MESSAGE = b"From: a@b.test\r\nTo: x@y.test\r\nSubject: hello\r\n\r\nbody\r\n"


def envelope(qid: str = "Q1abc", received_at: float = 1_700_000_000.0) -> dict[str, Any]:
    return {
        "id": qid,
        "sender": "a@b.test",
        "received_at": received_at,
        "recipients": [{"addr": "x@y.test", "state": "pending"}, {"addr": "z@y.test", "state": "pending"}],
    }


def config(tmp_path: Path, **paths: Any) -> SimpleNamespace:
    policy = SimpleNamespace(name="policy", QuarantinePath=str(tmp_path / "quarantine"), SpamQuarantinePath=None,
                             BackupPath=str(tmp_path / "backup"))
    staff = SimpleNamespace(name="staff", QuarantinePath=str(tmp_path / "staff-q"), SpamQuarantinePath=None, BackupPath=None)
    path = SimpleNamespace(IncomingArchivePath=str(tmp_path / "arch_in"), OutgoingArchivePath=None)
    for key, value in paths.items():
        setattr(path, key, value)
    return SimpleNamespace(policy=policy, groups=[staff], path=path, locale=SimpleNamespace(DateFormat="%y/%m/%d", TimeFormat="%H:%M:%S"))


@pytest.fixture
def quarantine(tmp_path: Path) -> Store:
    return Store(tmp_path / "quarantine")


def test_put_list_get(quarantine: Store) -> None:
    item_id = quarantine.put("Q1abc", MESSAGE, envelope(), "INF", "infected: Eicar-Test-Signature")
    assert item_id == "Q1abc"
    assert sorted(os.listdir(quarantine.path)) == ["Q1abc.eml", "Q1abc.json"]
    [item] = quarantine.list()
    assert item == Item(
        id="Q1abc",
        queue_id="Q1abc",
        status="INF",
        size=len(MESSAGE),
        time=1_700_000_000.0,
        stored_at=item.stored_at,
        sender="a@b.test",
        recipients=("x@y.test", "z@y.test"),
        reason="infected: Eicar-Test-Signature",
    )
    assert abs(item.stored_at - time.time()) < 600
    raw, same = quarantine.get("Q1abc")
    assert raw == MESSAGE and same == item
    assert quarantine.envelope("Q1abc")["recipients"][1]["addr"] == "z@y.test"
    assert Path(quarantine.message_path("Q1abc")).read_bytes() == MESSAGE


def test_put_from_a_file_keeps_bytes(quarantine: Store, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB, every octet value
    source = tmp_path / "spool-message"
    source.write_bytes(data)
    item_id = quarantine.put("Q2", source, envelope("Q2"), "BAK", "original before changes")
    assert quarantine.get(item_id)[0] == data
    assert quarantine.item(item_id).size == len(data)


def test_same_queue_id_gets_distinct_items(quarantine: Store) -> None:
    ids = [quarantine.put("Q1abc", MESSAGE + bytes([n]), envelope(), "SSP", "") for n in range(3)]
    assert ids == ["Q1abc", "Q1abc-2", "Q1abc-3"]
    assert [quarantine.get(i)[0][-1] for i in ids] == [0, 1, 2]


def test_concurrent_puts_never_overwrite(quarantine: Store) -> None:
    results: list[str] = []
    barrier = threading.Barrier(8)

    def put(n: int) -> None:
        barrier.wait(timeout=10)
        results.append(quarantine.put("Qsame", b"%d" % n, envelope("Qsame"), "INF", ""))

    threads = [threading.Thread(target=put, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(set(results)) == 8
    assert sorted(quarantine.get(i)[0] for i in results) == sorted(b"%d" % n for n in range(8))


def test_unsafe_queue_ids_are_made_safe(quarantine: Store) -> None:
    item_id = quarantine.put("../../etc/passwd", MESSAGE, envelope(), "INF", "")
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", item_id)
    assert os.path.dirname(quarantine.message_path(item_id)) == quarantine.path


@pytest.mark.parametrize("bad", ["../Q1abc", "Q1abc.json", "", "a/b", ".tmp-x"])
def test_bad_item_ids_are_refused(quarantine: Store, bad: str) -> None:
    quarantine.put("Q1abc", MESSAGE, envelope(), "INF", "")
    with pytest.raises(StoreError):
        quarantine.get(bad)
    with pytest.raises(StoreError):
        quarantine.remove(bad)


def test_unknown_status_is_refused(quarantine: Store) -> None:
    with pytest.raises(StoreError):
        quarantine.put("Q1", MESSAGE, envelope(), "VIR", "")


def test_remove_and_remove_all(quarantine: Store) -> None:
    for n in range(3):
        quarantine.put(f"Q{n}", MESSAGE, envelope(f"Q{n}"), "INF", "")
    quarantine.remove("Q1")
    with pytest.raises(KeyError):
        quarantine.get("Q1")
    with pytest.raises(KeyError):
        quarantine.remove("Q1")
    assert [i.id for i in quarantine.list()] == ["Q0", "Q2"]
    assert quarantine.remove_all() == 2
    assert os.listdir(quarantine.path) == []
    assert quarantine.remove_all() == 0


def test_crash_leftovers_are_ignored_and_cleaned(quarantine: Store) -> None:
    quarantine.put("Q1", MESSAGE, envelope("Q1"), "INF", "")
    folder = Path(quarantine.path)
    (folder / "Qhalf.eml").write_bytes(MESSAGE)  # message written, record never
    (folder / ".tmp-0123456789abcdef").write_bytes(b"partial")  # temp file never renamed
    (folder / "Qbroken.eml").write_bytes(MESSAGE)
    (folder / "Qbroken.json").write_bytes(b'{"status": "INF", "envel')  # torn record (not our write order)
    (folder / "Qorphan.json").write_bytes(b'{"status": "INF"}')  # record whose message is gone
    assert [i.id for i in quarantine.list()] == ["Q1"]
    with pytest.raises(KeyError):
        quarantine.get("Qhalf")
    assert quarantine.clean_incomplete() == 0  # recent: may be a write in progress
    old = time.time() - 2 * store_module.INCOMPLETE_GRACE
    for name in ("Qhalf.eml", ".tmp-0123456789abcdef", "Qorphan.json"):
        os.utime(folder / name, (old, old))
    assert quarantine.clean_incomplete() == 3
    assert sorted(os.listdir(folder)) == ["Q1.eml", "Q1.json", "Qbroken.eml", "Qbroken.json"]


def test_failed_record_write_leaves_no_item(quarantine: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    quarantine.put("Q0", MESSAGE, envelope("Q0"), "INF", "")

    def disk_full(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.os, "replace", disk_full)
    with pytest.raises(OSError):
        quarantine.put("Q1", MESSAGE, envelope("Q1"), "INF", "")
    monkeypatch.undo()
    assert sorted(os.listdir(quarantine.path)) == ["Q0.eml", "Q0.json"]


def test_envelope_for_release(quarantine: Store) -> None:
    quarantine.put("Q1", MESSAGE, envelope("Q1"), "SPM", "spam")
    assert quarantine.envelope_for_release("Q1") == (MESSAGE, "a@b.test", ["x@y.test", "z@y.test"])


@pytest.mark.parametrize(
    ("verdict", "code"),
    [
        ("clean", "CLN"), ("disinfected", "CRD"), ("suspicious", "SSP"), ("protected", "PRT"),
        ("error", "ERR"), ("filtered", "FLT"), ("infected", "INF"), ("spam", "SPM"), ("Probable Spam", "PSP"),
    ],
)
def test_status_for_verdict(verdict: str, code: str) -> None:
    assert status_for_verdict(verdict) == code


def test_status_for_unknown_verdict() -> None:
    with pytest.raises(StoreError):
        status_for_verdict("weird")


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0B"), (1023, "1023B"), (1024, "1.0K"), (1536, "1.5K"), (20 * 1024, "20K"), (3 * 1024 * 1024 + 1, "3.0M"), (50 * 1024 * 1024, "50M")],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


def test_listing_format(quarantine: Store) -> None:
    quarantine.put("Q1abc", MESSAGE, envelope("Q1abc", 1_700_000_000.0), "INF", "")
    quarantine.put("Q2longerid", MESSAGE * 100, envelope("Q2longerid", 1_700_000_100.0), "SPM", "")
    text = format_listing(quarantine.list(), "%Y-%m-%d", "%H:%M")
    lines = text.splitlines()
    assert re.fullmatch(r"QueueID +Status +Size +ArrivalTime +Sender/Recipient", lines[0])
    assert re.fullmatch(r"Q1abc +INF +54B +\d{4}-\d\d-\d\d \d\d:\d\d +<a@b.test> -> <x@y.test>, <z@y.test>", lines[1])
    assert re.fullmatch(r"Q2longerid +SPM +5\.3K +.*", lines[2])
    assert lines[0].index("Status") == lines[1].index("INF") == lines[2].index("SPM")
    assert lines[-1] == f"-- 2 message(s), {len(MESSAGE) * 101} bytes"
    assert format_listing([]).splitlines()[-1] == "-- 0 message(s), 0 bytes"


# --- the store command ----------------------------------------------------------------------


def test_cli_list_show_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path)
    Store(cfg.policy.QuarantinePath).put("Q1abc", MESSAGE, envelope(), "INF", "infected")
    assert store_main(["store", "--path", "quarantine", "list"], cfg) == 0
    out = capsys.readouterr().out
    assert out.startswith("QueueID")
    assert re.search(r"^Q1abc +INF +54B +\d\d/\d\d/\d\d \d\d:\d\d:\d\d ", out, re.M)
    assert store_main(["show", "Q1abc"], cfg) == 0
    out = capsys.readouterr().out
    assert "Status: INF (infected)" in out
    assert out.endswith(MESSAGE.decode())
    assert store_main(["remove", "Q1abc"], cfg) == 0
    assert store_main(["remove", "Q1abc"], cfg) == 4
    assert Store(cfg.policy.QuarantinePath).list() == []


def test_cli_named_stores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path)
    Store(cfg.path.IncomingArchivePath).put("Q1", MESSAGE, envelope("Q1"), "RCV", "")
    Store(cfg.groups[0].QuarantinePath).put("Q2", MESSAGE, envelope("Q2"), "SSP", "")
    Store(tmp_path / "elsewhere").put("Q3", MESSAGE, envelope("Q3"), "SNT", "")
    for argv, shown in (
        (["--path", "incoming", "list"], "Q1"),
        (["--path", "quarantine", "--group", "staff", "list"], "Q2"),
        (["--path", str(tmp_path / "elsewhere"), "list"], "Q3"),
    ):
        assert store_main(argv, cfg) == 0
        assert re.search(rf"^{shown} ", capsys.readouterr().out, re.M)


def test_cli_remove_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path)
    backup = Store(cfg.policy.BackupPath)
    for n in range(3):
        backup.put(f"Q{n}", MESSAGE, envelope(f"Q{n}"), "BAK", "")
    assert store_main(["--path", "backup", "remove-all"], cfg) == 0
    assert "3 message(s) removed" in capsys.readouterr().out
    assert backup.list() == []


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["show"],
        ["remove", "../etc/passwd"],
        ["--path", "outgoing", "list"],  # OutgoingArchivePath not configured
        ["--path", "quarantine", "--group", "nobody", "list"],
        ["--unknown-option", "list"],
    ],
)
def test_cli_bad_arguments_return_1(tmp_path: Path, argv: list[str]) -> None:
    cfg = config(tmp_path)
    Store(cfg.policy.QuarantinePath).put("Q1", MESSAGE, envelope("Q1"), "INF", "")
    assert store_main(argv, cfg) == 1


def test_cli_unreadable_directory_returns_2(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert store_main(["list"], cfg) == 2  # the quarantine folder does not exist yet
    (tmp_path / "a-file").write_bytes(b"")
    assert store_main(["--path", str(tmp_path / "a-file"), "list"], cfg) == 2


def test_cli_system_error_returns_3(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    quarantine = Store(cfg.policy.QuarantinePath)
    quarantine.put("Q1", MESSAGE, envelope("Q1"), "INF", "")
    os.unlink(quarantine.message_path("Q1"))
    os.mkdir(os.path.join(quarantine.path, "Q1.eml"))  # the message is not a readable file
    assert store_main(["show", "Q1"], cfg) == 3


def test_cli_release_hook(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path)
    quarantine = Store(cfg.policy.QuarantinePath)
    quarantine.put("Q1", MESSAGE, envelope("Q1"), "SPM", "spam")
    quarantine.put("Q2", MESSAGE, envelope("Q2"), "INF", "")
    released: list[tuple[bytes, str, list[str], bool]] = []

    def queue_again(raw: bytes, sender: str, recipients: list[str], check: bool) -> bool:
        released.append((raw, sender, recipients, check))
        return True

    assert store_main(["release", "Q1"], cfg) == 4  # no hook: not performed
    assert store_main(["release", "Q1"], cfg, queue_again) == 0
    assert released == [(MESSAGE, "a@b.test", ["x@y.test", "z@y.test"], True)]
    assert store_main(["release-all", "--without-check"], cfg, queue_again) == 0
    assert [r[3] for r in released[1:]] == [False, False]
    assert store_main(["release", "Q9"], cfg, queue_again) == 4
    assert store_main(["release", "Q1"], cfg, lambda *args: False) == 4
    assert len(quarantine.list()) == 2  # a release keeps the stored copy


# --- lifetimes and purge --------------------------------------------------------------------------


def aged(store: Store, qid: str, status: str, days: float) -> str:
    item_id = store.put(qid, MESSAGE, envelope(qid), status, "")
    path = os.path.join(store.path, item_id + ".json")
    record = json.loads(Path(path).read_text())
    record["stored_at"] -= days * 86400
    Path(path).write_text(json.dumps(record))
    os.utime(path, (record["stored_at"],) * 2)
    return item_id


def test_purge_removes_only_items_past_their_status_lifetime(quarantine: Store) -> None:
    old_inf, old_spm = aged(quarantine, "Q1", "INF", 10), aged(quarantine, "Q2", "SPM", 10)
    young = aged(quarantine, "Q3", "INF", 1)
    removed, more = quarantine.purge({"INF": 5 * 86400.0}, time.time(), 100)  # no lifetime for SPM
    assert [i.id for i in removed] == [old_inf] and not more
    assert sorted(i.id for i in quarantine.list()) == sorted([old_spm, young])


def test_purge_is_bounded_per_pass(quarantine: Store) -> None:
    for n in range(5):
        aged(quarantine, f"Q{n}", "INF", 10)
    removed, more = quarantine.purge({"INF": 86400.0}, time.time(), 3)
    assert len(removed) == 3 and more
    removed, more = quarantine.purge({"INF": 86400.0}, time.time(), 3)
    assert len(removed) == 2 and not more
    assert quarantine.list() == []


def test_purge_trusts_the_record_not_a_file_time(quarantine: Store) -> None:
    item_id = quarantine.put("Q1", MESSAGE, envelope("Q1"), "INF", "")
    os.utime(os.path.join(quarantine.path, item_id + ".json"), (0, 0))  # an old file time alone
    assert quarantine.purge({"INF": 86400.0}, time.time(), 10) == ([], False)


def test_lifetimes_per_folder_keep_the_longest(tmp_path: Path) -> None:
    def section(**keys: Any) -> SimpleNamespace:
        base = dict(QuarantinePath=None, SpamQuarantinePath=None, BackupPath=None, QuarantineLifetime=0, BackupLifetime=0)
        return SimpleNamespace(**{**base, **keys})
    shared = str(tmp_path / "shared")
    cfg = SimpleNamespace(
        policy=section(QuarantinePath=shared, BackupPath=shared, QuarantineLifetime=3, BackupLifetime=7,
                       SpamQuarantinePath=str(tmp_path / "spam")),
        groups=[section(QuarantinePath=shared, QuarantineLifetime=5), section(QuarantinePath=str(tmp_path / "q"))],
        path=SimpleNamespace(IncomingArchivePath=str(tmp_path / "in"), IncomingArchiveLifetime=30,
                             OutgoingArchivePath=None, OutgoingArchiveLifetime=9),
    )
    plan = store_module.lifetimes(cfg)
    assert plan[shared]["INF"] == 5 * 86400 and plan[shared]["SPM"] == 5 * 86400 and plan[shared]["BAK"] == 7 * 86400
    assert plan[str(tmp_path / "spam")] == {"SPM": 3 * 86400, "PSP": 3 * 86400}
    assert plan[str(tmp_path / "q")] == {}  # lifetime 0: kept for ever
    assert plan[str(tmp_path / "in")] == {"RCV": 30 * 86400}


# --- listing filters and formats ------------------------------------------------------------------


def test_cli_list_filters_and_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path)
    quarantine = Store(cfg.policy.QuarantinePath)
    quarantine.put("Q1", MESSAGE, envelope("Q1", received_at=time.mktime((2024, 3, 1, 12, 0, 0, 0, 0, -1))), "INF", "x\ty")
    quarantine.put("Q2", MESSAGE, {**envelope("Q2", time.mktime((2024, 3, 2, 12, 0, 0, 0, 0, -1))),
                                   "sender": "eve@evil.test"}, "SPM", "")

    def ids(*argv: str) -> list[str]:
        assert store_main(["list", "--format", "json", *argv], cfg) == 0
        return [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()]

    assert ids() == ["Q1", "Q2"]
    assert ids("--status", "spm") == ["Q2"]
    assert ids("--sender", "*@EVIL.test") == ["Q2"]
    assert ids("--recipient", "z@*") == ["Q1", "Q2"] and ids("--recipient", "nobody@*") == []
    assert ids("--since", "2024-03-02") == ["Q2"] and ids("--until", "2024-03-02") == ["Q1"]
    assert ids("--since", "2024-03-01 12:00", "--until", "2024-03-01 12:00:01") == ["Q1"]
    assert store_main(["list", "--format", "tsv", "--status", "INF"], cfg) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split("\t") == ["id", "queue_id", "status", "size", "arrival", "stored", "sender", "recipients", "reason"]
    assert row.split("\t")[:3] == ["Q1", "Q1", "INF"] and row.split("\t")[7:] == ["x@y.test,z@y.test", "x y"]
    for bad in (["--status", "XYZ"], ["--since", "yesterday"], ["--format", "xml"]):
        assert store_main(["list", *bad], cfg) == 1


def test_named_stores_include_a_separate_spam_quarantine(tmp_path: Path) -> None:
    """The console and the digests name SpamQuarantinePath too (as ``store --path spam`` does),
    for the policy and for a group, and a folder two settings share is named once."""
    cfg = config(tmp_path)
    assert named_stores(cfg) == {"quarantine": cfg.policy.QuarantinePath, "backup": cfg.policy.BackupPath,
                                 "quarantine:staff": cfg.groups[0].QuarantinePath}
    cfg.policy.SpamQuarantinePath = str(tmp_path / "spam")
    cfg.groups[0].SpamQuarantinePath = str(tmp_path / "staff-spam")
    cfg.groups[0].BackupPath = cfg.policy.BackupPath
    assert named_stores(cfg) == {"quarantine": cfg.policy.QuarantinePath, "spam": str(tmp_path / "spam"),
                                 "backup": cfg.policy.BackupPath, "quarantine:staff": cfg.groups[0].QuarantinePath,
                                 "spam:staff": str(tmp_path / "staff-spam")}
