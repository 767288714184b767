#!/usr/bin/env python3
"""A next hop to try smtpgw with: an SMTP server on loopback that prints what it receives.

    python3 tools/sink.py [PORT]      (default 2526, the sample configuration's ForwardRoute)
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.net import Sink  # noqa: E402


def main() -> int:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 2526
    sink = Sink(port=port)
    print(f"sink listening on 127.0.0.1:{port}; Ctrl-C stops it", flush=True)
    seen = 0
    try:
        while True:
            with sink.cond:
                sink.cond.wait_for(lambda: len(sink.messages) > seen, timeout=3600)
                new = sink.messages[seen:]
            for message in new:
                subject = next((line for line in message.data.split(b"\r\n") if line.lower().startswith(b"subject:")), b"")
                print(f"{time.strftime('%H:%M:%S')} from=<{message.sender}> to={message.recipients} "
                      f"size={len(message.data)} {subject.decode('utf-8', 'replace')}", flush=True)
            seen += len(new)
    except KeyboardInterrupt:
        return 0
    finally:
        sink.close()


if __name__ == "__main__":
    sys.exit(main())
