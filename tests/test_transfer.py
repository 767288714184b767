"""Transfer-encoding decoders (smtpgw.transfer): results, and work and memory bounded by the input."""

from __future__ import annotations

import base64
import binascii
import random
import tracemalloc
from collections.abc import Callable

import pytest

from smtpgw.mail import transfer
from smtpgw.mail.transfer import decode_base64, decode_transfer, decode_uu

SIZE = 4 << 20  # encoded bytes fed to each bounded decoder


def peak_of(action: Callable[[], object]) -> int:
    """Bytes allocated at the peak while ``action`` runs (its input already exists)."""
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def garbage(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize(
    "cte, body",
    [
        # every byte value: most are outside the alphabet (this took ~100x its size)
        ("base64", garbage(SIZE)),
        ("base64", b"=A" * (SIZE // 2)),  # a segment after every padding
        ("base64", base64.encodebytes(garbage(SIZE * 3 // 4))),
        ("quoted-printable", b"=4=\r\n=ZZ" * (SIZE // 8)),
        ("quoted-printable", b"x" * SIZE),  # one line, no line break at all
        ("x-uuencode", b"begin 644 a\n" + b"\n" * SIZE),  # a line list held ~16x the input
        ("x-uuencode", b"begin 644 a\n" + b"\r#86)C" * (SIZE // 6)),  # bare CR line ends
    ],
    ids=["b64-garbage", "b64-paddings", "b64-valid", "qp-escapes", "qp-one-line", "uu-newlines", "uu-bare-cr"],
)
def test_decoders_use_memory_bounded_by_their_output(cte: str, body: bytes) -> None:
    result: list[tuple[bytes | None, str, str]] = []
    peak = peak_of(lambda: result.append(decode_transfer(cte, body)))
    data = result[0][0] or b""
    # the output (twice while a line longer than a piece is added to it), plus a few pieces
    # of work: never a copy per character or per line
    assert peak <= 2 * len(data) + 8 * transfer.CHUNK + (1 << 20), (peak, len(data))


def test_uuencoded_lines_that_claim_more_than_they_hold_stop_at_the_limit() -> None:
    # "_" claims 63 bytes, decoded as zeros: 2 input bytes become 63
    body = b"begin 644 a\n" + b"_\n" * (SIZE // 2)
    limit = 1 << 20
    result: list[tuple[bytes | None, str, str]] = []
    peak = peak_of(lambda: result.append(decode_transfer("x-uuencode", body, limit)))
    data, error, _ = result[0]
    assert data is None and error == "decoded content larger than 1048576 bytes"
    assert peak <= limit + 64 * transfer.CHUNK, peak


def test_the_limit_applies_to_every_encoding() -> None:
    data, error, _ = decode_transfer("base64", base64.b64encode(b"x" * 1000), limit=999)
    assert data is None and "larger than 999 bytes" in error
    assert decode_transfer("base64", base64.b64encode(b"x" * 1000), limit=1000)[0] == b"x" * 1000


@pytest.mark.parametrize("chunk", [3, 5, 64])
def test_piecewise_decoding_matches_whole_decoding(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Pieces end anywhere in base64 and after any line break in quoted-printable and uuencode:
    the result is the same as one decode of the whole body."""
    rnd = random.Random(chunk)
    content = rnd.randbytes(500)
    bodies = {
        "base64": base64.encodebytes(content) + b"=A=AB\r\n!!QUJD",
        "quoted-printable": binascii.b2a_qp(content) + b"=\r\nsoft =41=\nbad=Z",
        "x-uuencode": b"begin 644 f\r\n" + binascii.b2a_uu(content[:45]) + binascii.b2a_uu(content[45:80]) + b"end\r\n",
    }
    whole = {cte: decode_transfer(cte, body) for cte, body in bodies.items()}
    monkeypatch.setattr(transfer, "CHUNK", chunk)
    assert {cte: decode_transfer(cte, body) for cte, body in bodies.items()} == whole
    assert whole["base64"][0].startswith(content) and whole["x-uuencode"][0] == content[:80]


def test_base64_defects_and_truncation() -> None:
    assert decode_base64(b"QUJD") == (b"ABC", "")
    assert decode_base64(b"QUJDR") == (None, "truncated base64 (a final quantum of one character)")
    assert decode_base64(b"QU JD*R") == (b"ABC", "characters outside the base64 alphabet ignored")
    assert decode_base64(b"QQ==QkM=") == (b"ABC", "base64 data after padding")


def test_uuencoded_problems() -> None:
    assert decode_uu(b"#86)C\n") == (b"abc", "")
    assert decode_uu(b"#86)C\n\xff\xff\n") == (None, "undecodable uuencoded line")
