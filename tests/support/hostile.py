"""Hostile messages and clients for the gateway's end-to-end tests, and its processes' memory.

Owns: the poison an attacker sends (a tar whose pax header is 600,000 digits, a flood of tiny
uuencoded files, megabytes of base64 garbage, a spam carrying a virus, a HELO that tries to add
log fields, an oversized control request), the canary that must keep flowing past them, the
access rules that make 127.0.0.2 the only trusted client and the routed recipients it alone may
use, a gateway that scans with a private clamd, and the peak resident sizes of the gateway's
processes (main and scanner workers) read from /proc.

Must never: talk to anything but loopback, or write outside the gateway's own folder.
"""

from __future__ import annotations

import os
import random
import smtplib
from collections.abc import Callable

from smtpgw.spam.formalsigns import GTUBE
from tests.support.clamd import ClamdInstance, eicar, mime_message, tar_bytes
from tests.support.net import GatewayProcess, Sink
from tests.test_mime import attachment

CANARY = b"From: a@b.test\r\nTo: x@example.test\r\nSubject: canary\r\n\r\nstill flowing\r\n"
NO_NOTICES = [("NotifyAdmin", "none"), ("NotifyRecipient", "none")]

# 127.0.0.1 (every test client) may send only to the protected domain; 127.0.0.2 is a trusted network.
DOMAIN_ONLY = [
    ("RelayRule", "allow from 127.0.0.2 to *"),
    ("RelayRule", "allow from any to *@example.test"),
    ("RelayRule", "deny from any to *"),
]
# sender-specified routing (RFC 5321 Appendix C; Postfix's allow_untrusted_routing)
ROUTED = ("user%other.test@example.test", "other.test!user@example.test", '"user@other.test"@example.test')
SPOOF_HELO = "x>,message_id=<spoofed>,flags=X"  # would add fields to an unescaped RECEIVED line


def pax_digits_tar() -> bytes:
    """About 824 KB: a tar whose pax header is 600,000 digits, quadratic for the standard
    library's tarfile (CVE-2024-6232)."""
    return mime_message([("Content-Type: text/plain", b"logs"),
                         attachment("logs.tar", tar_bytes({"a.txt": b"a"}, b"1" * 600_000))])


def base64_garbage(size: int, seed: int = 3) -> bytes:
    """A message of ``size`` random bytes, mostly outside the base64 alphabet, labelled base64,
    in 76-byte lines; without NUL (refused at DATA, 550 5.6.0) and dot-stuffed for DATA."""
    body = random.Random(seed).randbytes(size).replace(b"\0", b"\x01")
    garbage = b"\r\n".join(body[i : i + 76].replace(b"\n", b" ").replace(b"\r", b" ") for i in range(0, len(body), 76))
    return mime_message([("Content-Type: application/octet-stream; name=\"g.bin\"\n"
                          "Content-Transfer-Encoding: base64", garbage.replace(b"\r\n.", b"\r\n.."))])


def spam_with_a_virus() -> bytes:
    """GTUBE in the text, EICAR attached: both verdicts must be made."""
    return mime_message([("Content-Type: text/plain", GTUBE.encode("ascii")),
                         attachment("invoice.com", eicar(), "application/octet-stream")])


def av_gateway(make_gateway: Callable[..., GatewayProcess], sink: Sink, clamd: ClamdInstance,
               policy: list[tuple[str, str]] = NO_NOTICES, replace: dict[str, list[tuple[str, str]]] | None = None,
               **sections: list[tuple[str, str]]) -> GatewayProcess:
    """A gateway that scans every message with ``clamd``; ``sections`` add to others by name
    (``smtpgw__antispam`` for [smtpgw.antispam]; ``ave`` adds to [smtpgw.ave]); ``replace``
    replaces whole sections (``{"smtpgw.access": DOMAIN_ONLY}``)."""
    extra = {"smtpgw.ave": [("ClamdAddress", clamd.unix_address), *sections.pop("ave", [])],
             "smtpgw.policy": [("Check", "true"), *policy]}
    extra.update({name.replace("__", "."): items for name, items in sections.items()})
    return make_gateway(sink.port, extra=extra, replace=replace)


def send(gw: GatewayProcess, data: bytes, sender: str = "a@b.test") -> None:
    with smtplib.SMTP("127.0.0.1", gw.port) as client:
        client.sendmail(sender, ["x@example.test"], data)


def oversized_request(gw: GatewayProcess, name: str, size: int = 400 << 20) -> str:
    """A control request file ``.q_NAME`` of ``size`` bytes (sparse: no disk used), made under
    another name first so that the poll never sees it half made; returns its path."""
    path = os.path.join(gw.control_path, f".q_{name}")
    os.makedirs(gw.control_path, exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.truncate(size)
    os.rename(path + ".tmp", path)
    return path


def gateway_pids(gw: GatewayProcess) -> list[int]:
    """The gateway's main process and its scanner workers (its children)."""
    assert gw.proc is not None
    pid = gw.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as handle:
        return [pid, *(int(child) for child in handle.read().split())]


def peak_rss(pid: int) -> int:
    """The peak resident size (VmHWM) of process ``pid`` so far, in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
