"""The command line with no gateway running: ``queue`` acts on the spool itself, safely."""

from __future__ import annotations

import fcntl
import os

import pytest

from smtpgw.app import cli
from smtpgw.spool.queue import CHK, QUE, SND, SPL, STAGED, WFC, Envelope, Queue, Recipient, new_id
from tests.support.net import GatewayProcess


@pytest.fixture
def gw(tmp_path) -> GatewayProcess:
    """A configuration and its spool; the gateway itself is not started."""
    return GatewayProcess(str(tmp_path / "gw"), None)


def queued(gw: GatewayProcess, state: str) -> Envelope:
    queue = Queue(gw.queue)
    env = Envelope(id=new_id(), sender="a@b.test", recipients=[Recipient("x@example.test")])
    queue.add_message(env, state, data=b"Subject: s\r\n\r\nbody\r\n")
    return env


@pytest.mark.parametrize("qid", ["", ".", "..", "../.lock", "../msg", ".lock"])
def test_offline_remove_takes_only_a_queue_id(gw, qid):
    env = queued(gw, QUE)
    result = gw.cli("queue", "remove", qid)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "a queue ID is needed" in result.stderr
    assert os.path.exists(os.path.join(gw.queue, ".lock"))
    assert os.path.isdir(os.path.join(gw.queue, "msg"))
    assert Queue(gw.queue).find(env.id) == QUE


@pytest.mark.parametrize("state", [SPL, SND])
def test_offline_remove_refuses_the_states_the_gateway_refuses(gw, state):
    env = queued(gw, state)
    result = gw.cli("queue", "remove", env.id)
    assert result.returncode == 4, result.stdout + result.stderr
    assert f"is {state}" in result.stderr
    assert Queue(gw.queue).find(env.id) == state


def test_offline_remove_of_a_message_left_in_chk_takes_what_its_cut_short_scan_made(gw):
    """A crash left the record in CHK with a staged rewrite and a per-group copy in QUE: the
    removal takes them too, so that the next start delivers nothing of the removed message."""
    env = queued(gw, CHK)
    queue = Queue(gw.queue)
    copy = Envelope.from_dict(env.as_dict())
    copy.id, copy.srcid = f"{env.id}-1", env.id
    queue.add_message(copy, QUE, link_from=queue.msg_path(env.id))
    other = queued(gw, QUE)  # an unrelated message stays
    with open(queue.msg_path(env.id) + STAGED, "wb") as f:
        f.write(b"Subject: s\r\n\r\nrewritten\r\n")
    result = gw.cli("queue", "remove", env.id)
    assert result.returncode == 0, result.stdout + result.stderr
    assert queue.find(env.id) is None and queue.find(copy.id) is None
    assert sorted(os.listdir(os.path.join(gw.queue, "msg"))) == [other.id]
    assert queue.find(other.id) == QUE


def test_offline_remove_holds_the_queue_lock_while_it_acts(gw, monkeypatch, capsys):
    env = queued(gw, WFC)
    held: list[bool] = []
    remove = Queue.remove

    def probing_remove(queue: Queue, qid: str, state: str) -> None:
        # What a gateway starting now would try: the lock must still be taken.
        fd = os.open(os.path.join(queue.root, ".lock"), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        remove(queue, qid, state)

    monkeypatch.setattr(Queue, "remove", probing_remove)
    assert cli.main(["-c", gw.config, "queue", "remove", env.id]) == 0
    assert held == [True]
    assert Queue(gw.queue).find(env.id) is None


def test_a_queue_folder_that_cannot_be_made_stops_the_start_with_code_30(tmp_path):
    gw = GatewayProcess(str(tmp_path / "gw"), None, extra={"smtpgw.path": [("QueuePath", "not-a-folder/queue")]})
    (tmp_path / "gw" / "not-a-folder").write_text("a file where the queue's parent should be\n")
    result = gw.cli("-n", timeout=30)
    assert result.returncode == 30, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "not-a-folder/queue" in result.stderr


def test_a_request_not_taken_in_time_is_withdrawn(tmp_path, monkeypatch):
    # No gateway polls this folder: the request must not stay behind to be carried out
    # later, after the command reported that nothing was done.
    monkeypatch.setattr(cli, "REQUEST_DEADLINE", 0.1)
    code, output = cli.ask_gateway(str(tmp_path), "remove-all", None)
    assert code == 3 and "nothing was done" in output
    assert os.listdir(tmp_path) == []


def test_a_request_taken_at_the_deadline_waits_for_its_answer(tmp_path, monkeypatch):
    calls: list[float] = []

    def answer(path: str, timeout: float) -> tuple[int, str] | None:
        calls.append(timeout)
        if len(calls) == 1:  # the gateway takes the request just as the first wait ends
            [request] = [n for n in os.listdir(tmp_path) if n.startswith(".q_")]
            os.unlink(tmp_path / request)
            return None
        return 0, "3 message(s) removed"

    monkeypatch.setattr(cli, "_answer", answer)
    assert cli.ask_gateway(str(tmp_path), "remove-all", None, poll_interval=60) == (0, "3 message(s) removed")
    assert calls == [cli.REQUEST_DEADLINE + 60, cli.REQUEST_DEADLINE]
