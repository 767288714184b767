"""Log line figures: what escaping every value costs per line.

Prints: microseconds per RECEIVED event line built by ``log.line`` (every value escaped)
against the same line made by plain ``%`` formatting (what the log did before), for plain
values and for hostile ones (control bytes, separators, non-ASCII), and per free-text line
through the formatter.
Run: python3 bench/log.py [N]   (N calls per run, best of five runs)
"""

from __future__ import annotations

import logging
import os
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from smtpgw.log import LineFormatter, line  # noqa: E402

RECEIVED = "RECEIVED, from=<%s>, nrcpt=%d, size=%d, client=[%s], helo=<%s>, message_id=%s, flags=%s"
PLAIN = ("alice@example.test", 3, 48213, "192.0.2.10", "mail.example.test", "<m1.2024@example.test>", "E")
HOSTILE = ("a\x1b]0;x\x07@b.test", 3, 48213, "192.0.2.10", "x>,message_id=<spoofed>,flags=X",
           "<m\x1b[2J\x00ü\u202e@b.test>", "E")


def per_line(make, count: int) -> float:
    """Microseconds per call, the best of five runs (the machine is shared)."""
    return min(timeit.repeat(make, number=count, repeat=5)) / count * 1e6


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    for name, values in (("plain", PLAIN), ("hostile", HOSTILE)):
        escaped = per_line(lambda: line(RECEIVED, *values), count)
        raw = per_line(lambda: RECEIVED % values, count)
        print(f"RECEIVED line, {name} values: {escaped:.2f} us escaped, {raw:.2f} us unescaped %-format")
    formatter = LineFormatter()
    record = logging.LogRecord("smtpgw.deliver.client", logging.INFO, __file__, 0, "greeting from %s[%s]: %s",
                               ("mx.example.test", "192.0.2.20", "421 4.3.2 busy\x1b[2J try later"), None)
    print(f"free-text line through the formatter: {per_line(lambda: formatter.format(record), count):.2f} us")


if __name__ == "__main__":
    main()
