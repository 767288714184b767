"""DataReader (receiver.py): end of data, transparency and line-end checks, fed in any piece sizes."""

from __future__ import annotations

import os

import pytest

from smtpgw.receive.receiver import DataReader

LF_MESSAGE = b"Subject: lf\n\n..dot\n.\r\nsmuggled\r\n\n.\nlast\r\n.\r\nafter"
LF_STORED = b"Subject: lf\r\n\r\n.dot\r\n\r\nsmuggled\r\n\r\n\r\nlast\r\n"


def read_through(tmp_path, data: bytes, piece: int, **options) -> tuple[DataReader, bytes, bytes]:
    """Feed ``data`` in pieces of ``piece`` bytes; returns the reader, what it stored, what followed."""
    path = tmp_path / "msg"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    reader = DataReader(fd, 1 << 20, 20, **options)
    try:
        for start in range(0, len(data), piece):
            chunk = data[start:start + piece]
            consumed = reader.feed(chunk)
            if consumed >= 0:
                reader.finish()
                return reader, path.read_bytes(), chunk[consumed:] + data[start + piece:]
    finally:
        os.close(fd)
    raise AssertionError("no end of data")


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 4096])
def test_bare_lf_is_normalized_and_only_crlf_dot_crlf_ends(tmp_path, piece):
    reader, stored, rest = read_through(tmp_path, LF_MESSAGE, piece, normalize_lf=True)
    assert (stored, rest, reader.failed) == (LF_STORED, b"after", False)


@pytest.mark.parametrize("piece", [1, 5, 4096])
def test_bare_lf_fails_the_message_unless_normalized(tmp_path, piece):
    reader, _, rest = read_through(tmp_path, LF_MESSAGE, piece)
    assert reader.bare_newline and rest == b"after"


@pytest.mark.parametrize("data", [b"a\rb\r\n.\r\n", b"a\r\r\n.\r\n"])
def test_bare_cr_fails_even_when_normalizing(tmp_path, data):
    assert read_through(tmp_path, data, 4096, normalize_lf=True)[0].bare_newline


@pytest.mark.parametrize("piece", [1, 4096])
def test_nul_fails_the_message(tmp_path, piece):
    reader, stored, _ = read_through(tmp_path, b"Subject: x\r\n\r\na\0b\r\n.\r\n", piece)
    assert reader.nul and reader.failed and b"\0" not in stored


def test_every_attribute_a_session_sets_has_its_slot() -> None:
    """Session has ``__slots__`` (a thousand idle sessions stay cheap) and no ``__dict__``: an
    attribute set on a path the other tests do not take would raise there, in production."""
    import ast
    import inspect

    from smtpgw.receive import receiver

    tree = ast.parse(inspect.getsource(receiver.Session))
    set_on_self = {target.attr for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign))
                   for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                   if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"}
    assert set_on_self - set(receiver.Session.__slots__) == set()
    assert "__dict__" not in receiver.Session.__slots__


@pytest.mark.parametrize("piece", [1, 7, 4096])
@pytest.mark.parametrize(("data", "signed"), [
    (b"DKIM-Signature: v=1; d=a.test\r\nSubject: s\r\n\r\nbody\r\n.\r\n", True),
    (b"Subject: s\r\ndkim-SIGNATURE:v=1\r\n\r\nbody\r\n.\r\n", True),
    (b"..DKIM-Signature: v=1\r\n\r\nbody\r\n.\r\n", True),  # stored ".DKIM-Signature": the reader's run is there too
    (b"Subject: s\r\n\r\nDKIM-Signature: v=1 (in the body)\r\n.\r\n", False),
    (b"Subject: s\r\nX-Note: no signature\r\n\r\nbody\r\n.\r\n", False),
    (b"\r\nDKIM-Signature: v=1\r\n.\r\n", False),  # no header at all
])
def test_the_reader_notes_a_dkim_signature_in_the_header_as_the_key_reader_would(tmp_path, piece, data, signed):
    """``dkim_signed`` is True exactly when the stored header block holds the run of bytes the DKIM
    key names' reader looks for (mail/dkim._may_be_signed): False lets the scanner skip reading it."""
    from smtpgw.mail import dkim
    reader, stored, _ = read_through(tmp_path, data, piece)
    assert reader.dkim_signed is signed
    assert dkim._may_be_signed(b"Received: by gw\r\n" + stored) is signed


def test_the_long_line_check_finds_what_measuring_every_line_finds() -> None:
    """``long_line`` (blocks of half the limit, lines measured only when a block has no LF) against
    the plain definition, on texts with lines around the limit in every place."""
    import random

    from smtpgw.receive.receiver import MAX_DATA_LINE, long_line
    rng = random.Random(5321)
    lengths = [0, 1, 70, 498, 499, 500, 501, 998, 999, 1000, 1001, 1500, 2100]
    for _ in range(3000):
        text = b"\n".join(b"x" * rng.choice(lengths) for _ in range(rng.randint(1, 6)))
        text += rng.choice([b"", b"\n"])
        assert long_line(text) is (max(map(len, text.split(b"\n"))) >= MAX_DATA_LINE), [len(t) for t in text.split(b"\n")]
