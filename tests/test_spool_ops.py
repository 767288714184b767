"""spool/ops.py: the queue operations the CLI, the control directory and the console share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smtpgw.app import cli
from smtpgw.config import load_config
from smtpgw.spool import ops
from smtpgw.spool.queue import CHK, QUE, SND, WFC, Envelope, Queue, Recipient, new_id
from smtpgw.spool.store import Item

MINIMAL = Path(__file__).parent / "data" / "config" / "minimal.conf"
RAW = b"Subject: released\r\n\r\nbody\r\n"


def queued(queue: Queue, state: str) -> str:
    env = Envelope(id=new_id(), sender="a@b.test", recipients=[Recipient("x@example.test")], size=len(RAW))
    queue.add_message(env, state, data=RAW)
    return env.id


def test_release_is_one_record_whoever_asks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command line with no gateway running writes the record the gateway writes (helo included)."""
    conf = tmp_path / "smtpgw.conf"
    conf.write_text(MINIMAL.read_text())
    cfg = load_config(conf)
    assert cli.release(cfg, RAW, "a@b.test", ["x@example.test"], True)
    queue = Queue(cfg.path.QueuePath)
    [offline] = [queue.load(WFC, qid) for qid in queue.ids(WFC)]
    source = tmp_path / "item.eml"
    source.write_bytes(RAW)
    online = ops.release(queue, "a@b.test", ["x@example.test"], False, cfg.network.Hostname, link_from=str(source))
    assert queue.find(online.id) == QUE and source.exists()
    assert offline is not None and capsys.readouterr().out == f"released as {offline.id}\n"
    keep = ("sender", "helo", "size", "client_ip", "srcid")
    assert {k: getattr(offline, k) for k in keep} == {k: getattr(online, k) for k in keep}
    assert offline.helo == "gw.example.test"


def test_listing_never_touches_a_record(tmp_path: Path) -> None:
    queue = Queue(str(tmp_path / "q"))
    good = queued(queue, QUE)
    broken = queued(queue, WFC)
    Path(queue.record_path(WFC, broken)).write_bytes(b"{not json")
    assert [(state, env.id) for state, env in ops.entries(queue)] == [(QUE, good)]
    assert os.path.exists(queue.record_path(WFC, broken))  # left for the gateway to set aside
    assert "1 message(s)" in cli.format_queue(queue)


@pytest.mark.parametrize(("state", "code"), [(WFC, ops.DONE), (CHK, ops.DONE), (QUE, ops.DONE), (SND, ops.NOT_PERFORMED)])
def test_remove_takes_only_what_is_not_being_processed(tmp_path: Path, state: str, code: int) -> None:
    queue = Queue(str(tmp_path / "q"))
    qid = queued(queue, state)
    removed: list[tuple[str, str]] = []
    assert ops.remove_request(queue, "remove", qid, lambda q, s: removed.append((q, s)))[0] == code
    assert removed == ([(qid, state)] if code == ops.DONE else [])


@pytest.mark.parametrize("qid", ["", "../msg", ".lock", "a/b", None, 7])
def test_a_queue_id_is_never_a_path(tmp_path: Path, qid: object) -> None:
    assert ops.locate(Queue(str(tmp_path / "q")), qid) == (None, ops.BAD_ARGS, "a queue ID is needed")


def test_offline_remove_uses_the_shared_rules(tmp_path: Path) -> None:
    queue = Queue(str(tmp_path / "q"))
    qid = queued(queue, SND)
    code, why = cli.offline_queue_command(queue, "remove", qid)
    assert code == ops.NOT_PERFORMED and "being processed" in why and queue.find(qid) == SND


def item(status: str, spam: str | None = None) -> Item:
    return Item(id="i", queue_id="q", status=status, sender="", recipients=(), size=0, time=0.0, reason="",
                verdicts=(("spam", spam),) if spam else (), stored_at=0.0)


@pytest.mark.parametrize(("stored", "learned"), [
    (item("SPM"), True), (item("PSP"), True), (item("FLT", "Spam"), True), (item("CLN", "Probable Spam"), True),
    (item("INF"), False), (item("CLN", "Not Spam"), False), (item("CLN", "Blacklisted"), False),
])
def test_learn_on_release_takes_only_a_spam(stored: Item, learned: bool) -> None:
    assert ops.learns_on_release(stored, True) is learned
    assert ops.learns_on_release(stored, False) is False


def test_a_removal_the_stage_refuses_is_answered_and_not_counted(tmp_path: Path) -> None:
    """The delivery process took the record into SND between the lookup and the removal."""
    queue = Queue(str(tmp_path / "q"))
    qid = queued(queue, QUE)
    refusal = ops.removal_refused(qid, SND)
    assert ops.remove_request(queue, "remove", qid, lambda q, s: refusal) == (ops.NOT_PERFORMED, refusal)
    assert ops.remove_request(queue, "remove-all", None, lambda q, s: refusal) == (ops.DONE, "0 message(s) removed")
