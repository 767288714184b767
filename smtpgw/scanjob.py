"""What a scanner worker does with one message (run as ``python3 -m smtpgw.scanjob CONFIG``).

Owns: the per-message scan in a worker process: splitting recipients into
groups (first matching ``[smtpgw.group:NAME]``, else ``[smtpgw.policy]``),
and for each group the checks its policy asks for, producing a result the
main process applies to the queue. Speaks one JSON line per job on stdin and
one JSON line per result on stdout (see smtpgw.workers).

Must never: change queue states (the main process owns them), pass a message
as clean when a check could not run (the result says ``deferred`` instead),
or let one bad message stop the worker (an error becomes that job's result).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from smtpgw.config import Config, load_config
from smtpgw.queue import Envelope

log = logging.getLogger("smtpgw.scanjob")


@dataclass
class CopyResult:
    """What happens to the recipients of one group (one per-group copy)."""

    group: str
    recipients: list[str]
    blocked: bool = False
    rewritten: str | None = None  # a new message file written by the worker, or None: unchanged
    events: list[str] = field(default_factory=list)  # log lines (AV-SCANNED, AS-SCANNED, BLOCKED...)
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScanResult:
    copies: list[CopyResult] = field(default_factory=list)
    deferred: str | None = None  # a check could not run: retry later, never pass

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScanResult":
        return cls(copies=[CopyResult(**c) for c in data.get("copies", [])], deferred=data.get("deferred"))


class Job:
    """One message's scan with a loaded configuration."""

    def __init__(self, cfg: Config, queue_root: str) -> None:
        self.cfg = cfg
        self.queue_root = queue_root

    def run(self, env: Envelope) -> ScanResult:
        groups: dict[str, list[str]] = {}
        for rcpt in env.pending():
            groups.setdefault(self.cfg.group_for(env.sender, rcpt.addr).name, []).append(rcpt.addr)
        result = ScanResult()
        for name, rcpts in groups.items():
            group = self.cfg.group_for(env.sender, rcpts[0])
            copy = CopyResult(group=name, recipients=rcpts)
            status = "clean" if group.Check else "not checked"
            copy.events.append(f'SCANNED, group={name}, nrcpt={len(rcpts)}, status="{status}"')
            result.copies.append(copy)
        return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg = load_config(args[0])
    from smtpgw import log as logsetup

    logsetup.setup(cfg.options.LogFile, cfg.options.LogLevel, cfg.locale.DateFormat, cfg.locale.TimeFormat)
    job = Job(cfg, cfg.path.QueuePath)
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        qid = "?"
        try:
            request = json.loads(line)
            qid = request["qid"]
            answer: dict[str, Any] = {"qid": qid, **asdict(job.run(Envelope.from_dict(request["env"])))}
        except Exception as exc:  # one bad message must not stop the worker
            log.exception("%s: scan failed", qid)
            answer = {"qid": qid, "error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
        out.flush()
        logsetup.flush_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
