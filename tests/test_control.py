"""Reading control requests: bounded, never blocking, never through a link; and each command file
or request calls the operation it names on the ``Operations`` the control directory is given."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from smtpgw.app.control import Control, Operations, RequestTooLarge, read_request
from smtpgw.config import load_config
from smtpgw.net.loop import EventLoop
from smtpgw.spool.queue import QUE, Envelope, Queue, Recipient, new_id
from smtpgw.stats import Stats

MINIMAL = Path(__file__).parent / "data" / "config" / "minimal.conf"


def test_a_request_is_read_whole_up_to_the_limit(tmp_path) -> None:
    path = tmp_path / ".q_1"
    path.write_bytes(b'{"op": "send-all"}')
    assert read_request(str(path), limit=18) == b'{"op": "send-all"}'


def test_a_larger_request_is_refused_before_it_is_read(tmp_path) -> None:
    path = tmp_path / ".q_1"
    with open(path, "wb") as f:
        f.truncate(1 << 40)  # sparse; reading it would take hours
    with pytest.raises(RequestTooLarge, match="1099511627776 bytes, more than 1048576"):
        read_request(str(path))


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path) -> None:
    path = tmp_path / ".q_fifo"
    os.mkfifo(path)
    with pytest.raises(OSError, match="not a regular file"):
        read_request(str(path))


def test_a_symlink_is_not_followed(tmp_path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b'{"op": "remove-all"}')
    os.symlink(target, tmp_path / ".q_link")
    with pytest.raises(OSError):
        read_request(str(tmp_path / ".q_link"))


class Ops:
    """``Operations``: what the control directory is given; every call recorded."""

    def __init__(self, root: Path) -> None:
        conf = root / "smtpgw.conf"
        conf.write_text(MINIMAL.read_text())
        self.cfg = load_config(conf)
        self.loop = EventLoop()
        self.queue = Queue(self.cfg.path.QueuePath)
        self.stats = Stats()
        self.committer: Any = None  # no learning file in these tests
        self.calls: list[tuple[Any, ...]] = []

    def switch(self, what: str, on: bool) -> None:
        self.calls.append(("switch", what, on))

    def reload_databases(self) -> None:
        self.calls.append(("reload_databases",))

    def send_digest_now(self) -> None:
        self.calls.append(("send_digest_now",))

    def dump_memory(self) -> None:
        self.calls.append(("dump_memory",))

    def remove_queued(self, qid: str, state: str) -> None:
        self.calls.append(("remove_queued", qid, state))

    def send_all(self) -> int:
        self.calls.append(("send_all",))
        return 3

    def send_now(self, qid: str, state: str) -> None:
        self.calls.append(("send_now", qid, state))

    def release(self, path: str, sender: str, recipients: list[str], check: bool) -> str:
        self.calls.append(("release", os.path.basename(path), sender, recipients, check))
        return "NEWID"


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[Ops]:
    made = Ops(tmp_path)
    yield made
    made.loop.close()


def polled(ops: Ops, *files: tuple[str, bytes]) -> Control:
    given: Operations = ops
    control = Control(given)
    os.makedirs(control.folder, exist_ok=True)
    for name, data in files:
        (Path(control.folder) / name).write_bytes(data)
    control.poll()
    control.stop()
    return control


@pytest.mark.parametrize(("name", "call"), [
    (".c_recv_off", ("switch", "receiving", False)), (".c_send_on", ("switch", "sending", True)),
    (".c_avir_off", ("switch", "scanning", False)), (".c_db_reload", ("reload_databases",)),
    (".c_digest", ("send_digest_now",)), (".c_memory", ("dump_memory",)),
])
def test_a_command_file_calls_the_operation_it_names_once(ops: Ops, name: str, call: tuple[Any, ...]) -> None:
    control = polled(ops, (name, b""))
    assert ops.calls == [call] and not os.path.exists(os.path.join(control.folder, name))


def answer(control: Control, nonce: str) -> dict[str, Any]:
    with open(os.path.join(control.folder, f".a_{nonce}"), "rb") as f:
        return json.load(f)


def test_queue_requests_go_to_the_shared_operations(ops: Ops) -> None:
    env = Envelope(id=new_id(), sender="a@b.test", recipients=[Recipient("x@example.test")], size=2)
    ops.queue.add_message(env, QUE, data=b"x\r\n")
    control = polled(ops, (".q_1", json.dumps({"op": "remove", "id": env.id}).encode()),
                     (".q_2", json.dumps({"op": "send", "id": env.id}).encode()),
                     (".q_3", b'{"op": "send-all"}'), (".q_4", b'{"op": "remove", "id": "../msg"}'))
    assert ops.calls == [("remove_queued", env.id, QUE), ("send_now", env.id, QUE), ("send_all",)]
    assert [answer(control, n) for n in "1234"] == [
        {"code": 0, "output": f"{env.id}: removed"}, {"code": 0, "output": f"{env.id}: scheduled ahead of the queue"},
        {"code": 0, "output": "3 message(s) scheduled for immediate delivery"},
        {"code": 1, "output": "a queue ID is needed"}]


def test_a_release_request_names_only_a_file_in_the_control_folder(ops: Ops) -> None:
    request = {"op": "release", "message": "../../etc/.m_1", "sender": "a@b.test", "recipients": ["x@example.test"]}
    control = polled(ops, (".m_1", b"Subject: r\r\n\r\nbody\r\n"), (".q_1", json.dumps(request).encode()))
    assert ops.calls == [("release", ".m_1", "a@b.test", ["x@example.test"], True)]
    assert answer(control, "1") == {"code": 0, "output": "released as NEWID"}
    assert not os.path.exists(os.path.join(control.folder, ".m_1"))
