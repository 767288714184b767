"""Reading control requests: bounded, never blocking, never through a link."""

from __future__ import annotations

import os

import pytest

from smtpgw.app.control import RequestTooLarge, read_request


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
