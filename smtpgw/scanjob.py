"""What a scanner worker does with one message (``python3 -m smtpgw.scanjob CONFIG | --snapshot FILE``).

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
import os
import pickle
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from smtpgw import antivirus, headers, notify, stats
from smtpgw.av import ClamdPool, ScannerUnavailable
from smtpgw.config import Config, load_config
from smtpgw.ichecker import IChecker
from smtpgw.log import quoted
from smtpgw.queue import Envelope, Queue, write_durably
from smtpgw.spam import BLACKLISTED, PROBABLE_SPAM, SPAM, SpamFilter, SpamVerdict, as_log_fields, mark
from smtpgw.spam.database import DatabaseError
from smtpgw.store import Store, status_for_verdict

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


def not_scanned(group: str, rcpts: list[str]) -> CopyResult:
    """kmg-spec §3.13: a group with Check=false passes its mail through unchanged."""
    return CopyResult(group=group, recipients=rcpts, notes={"status": "not scanned"},
                      events=[f'AV-SCANNED, group={group}, status="not scanned", names="", nrcpt={len(rcpts)}'])


def spam_action_for(group: Any, verdict: SpamVerdict) -> str:
    """The group's action for a spam verdict: ActionSpam, ActionProbableSpam (kmg-spec §10), else pass.
    A blacklisted sender counts as Spam."""
    if verdict.status in (SPAM, BLACKLISTED):
        return str(group.ActionSpam)
    if verdict.status == PROBABLE_SPAM:
        return str(group.ActionProbableSpam)
    return "pass"


class Job:
    """One message's scan with a loaded configuration (one per worker process)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.queue = Queue(cfg.path.QueuePath)
        pool = ClamdPool.from_config(cfg.ave)
        self.clamd: Any = (IChecker(pool, cfg.options.ICheckerDBFilename, cfg.ave.ICheckerCacheSize)
                           if cfg.ave.UseIChecker else pool)
        self.templates = notify.load_templates(cfg.base.TemplatesPath)
        self.spam = SpamFilter(cfg.antispam, cfg.base.BasesPath)  # the database is loaded once per worker

    def run(self, env: Envelope) -> ScanResult:
        with open(self.queue.msg_path(env.id), "rb") as f:
            raw = f.read()
        groups: dict[str, tuple[Any, list[str]]] = {}
        for rcpt in env.pending():
            group = self.cfg.group_for(env.sender, rcpt.addr)
            groups.setdefault(group.name, (group, []))[1].append(rcpt.addr)
        result = ScanResult()
        verdict = None
        if self.spam.enabled and any(group.Check for group, _ in groups.values()):
            # the spam check runs once, before anti-virus, on the whole message
            verdict = self.spam.classify(raw, env.client_ip or None, env.sender, [r.addr for r in env.pending()],
                                         list(env.dnsbl))
        for index, (group, rcpts) in enumerate(groups.values(), start=1):
            try:
                result.copies.append(self._scan_group(env, raw, group, rcpts, index, verdict))
            except ScannerUnavailable as exc:
                return ScanResult(deferred=f"anti-virus unavailable: {exc}")
        return result

    def _scan_group(self, env: Envelope, raw: bytes, group: Any, rcpts: list[str], index: int,
                    verdict: SpamVerdict | None) -> CopyResult:
        if not group.Check:
            return not_scanned(group.name, rcpts)
        copy = CopyResult(group=group.name, recipients=rcpts)
        marked = raw
        spam_action = "pass"
        if verdict is not None:
            spam_action = spam_action_for(group, verdict)
            copy.events.append(f"AS-SCANNED, group={group.name}, nrcpt={len(rcpts)}, {as_log_fields(verdict)}, "
                               f'action={spam_action}, reasons="{quoted("; ".join(verdict.reasons)[:300])}"')
            if spam_action in ("block", "quarantine"):
                copy.blocked = True
                copy.notes = {"status": "clean", "spam_status": verdict.status}
                copy.events.append(f'BLOCKED, rcpt={",".join(rcpts)}, size={env.size}, reason="{verdict.status}, '
                                   f'ActionSpam={spam_action}"')
                if spam_action == "quarantine" and group.QuarantinePath:
                    Store(group.QuarantinePath).put(env.id, raw, env.as_dict(), status_for_verdict(verdict.status),
                                                    f"{verdict.status}, score {verdict.score:.4f}")
                return copy
            marked = mark(raw, verdict, self.cfg.antispam, spam_action)  # X-SpamTest-* fields, tagged Subject
        av = antivirus.scan_message(marked, group, self.cfg.ave, self.clamd, self.cfg.base.TemplatesPath)
        copy.events.append(antivirus.av_log_line(av) + f", nrcpt={len(rcpts)}")
        copy.notes = {"status": av.status, "virus_names": list(av.virus_names)}
        if verdict is not None:
            copy.notes["spam_status"] = verdict.status
        if self.cfg.options.AVStatistics:
            self._av_statistics(env, rcpts, av)
        if self.cfg.options.StrictStandards and not av.blocked:
            problems = headers.violations(raw)
            if problems:  # kmg-spec §3.8: messages violating RFC format are not delivered
                av.blocked, av.block_reason = True, "StrictStandards: " + "; ".join(problems)
                av.save_in_qb = True  # blocked mail is kept where the admin can release it
        if av.save_in_qb and group.QuarantinePath:
            reason = "; ".join(f"{k}: {v}" for k, v in av.reasons.items()) or av.status
            Store(group.QuarantinePath).put(env.id, raw, env.as_dict(), status_for_verdict(av.status), reason)
        if av.modified and not av.blocked and group.BackupPath:
            Store(group.BackupPath).put(env.id, raw, env.as_dict(), "BAK", "original before " + ", ".join(
                sorted({o.decision for o in av.objects if o.action != "pass"})))
        if av.blocked:
            copy.blocked = True
            copy.events.append(f'BLOCKED, rcpt={",".join(rcpts)}, size={env.size}, reason="{quoted(av.block_reason)}"')
        else:
            message = av.message
            if group.AddDisclaimer:  # kmg-spec §5.4: the group's disclaimer as a last text part
                text = notify.render_disclaimer(self.templates["disclaimer"], env.as_dict(), {"group": group.name},
                                                self.cfg.locale.DateFormat, self.cfg.locale.TimeFormat, time.time())
                message = notify.add_disclaimer(message, text)
            if message != raw:
                copy.rewritten = os.path.join(self.queue.root, "tmp", f"{env.id}.scan{index}")
                write_durably(copy.rewritten, message)
        copy.notes["notifications"] = self._notifications(env, raw, group, rcpts, av, index)
        return copy

    def _av_statistics(self, env: Envelope, rcpts: list[str], av: Any) -> None:
        """Time, Size, Sender, Recipients, Status, VirusList, IP, Message-id (kmg-spec §7.3)."""
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        lines = ["\t".join([when, str(o.size), env.sender, ",".join(rcpts), o.status, ",".join(o.virus_names),
                            env.client_ip, env.message_id or ""]) for o in av.objects]
        stats.write_av_statistics(self.cfg.options.AVStatistics, lines)

    def _notifications(self, env: Envelope, raw: bytes, group: Any, rcpts: list[str], av: Any, index: int) -> list[dict[str, Any]]:
        """Notification messages (kmg-spec §1.3, §5.1), written where the main process picks them up."""
        wanted = []
        if av.notify_admin and group.AdminNotifyAddress:
            wanted.append(("admin", [group.AdminNotifyAddress]))
        if av.notify_recipient:
            # one notice per recipient: a shared To: would show each one the others, Bcc included
            wanted.extend(("recipient", [rcpt]) for rcpt in rcpts)
        if av.notify_sender and env.sender:  # never to the null sender
            wanted.append(("sender", [env.sender]))
        if not wanted:
            return []
        event = {
            "status": av.status, "group": group.name, "queue_id": env.id, "blocked": av.blocked,
            "subject": headers.get_raw(raw, "Subject") or b"",
            "objects": [{"name": o.name or o.path, "status": o.status, "viruses": list(o.virus_names), "action": o.action}
                        for o in av.objects if o.status != "clean"],
        }
        out = []
        for n, (kind, to) in enumerate(wanted):
            try:
                data = notify.build_notification(kind, env.as_dict(), event, group.NotifyFromAddress, to,
                                                 self.templates["notify"], self.cfg.locale.DateFormat,
                                                 self.cfg.locale.TimeFormat, time.time())
            except ValueError as exc:
                log.warning("%s: no %s notification: %s", env.id, kind, exc)
                continue
            path = os.path.join(self.queue.root, "tmp", f"{env.id}.notify{index}.{n}")
            write_durably(path, data)
            out.append({"kind": kind, "path": path, "from": group.NotifyFromAddress, "to": list(to), "size": len(data)})
        return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[0] == "--snapshot":  # what the gateway accepted (gateway._publish_worker_config)
        with open(args[1], "rb") as f:
            cfg = pickle.load(f)
    else:
        cfg = load_config(args[0])
    from smtpgw import log as logsetup

    logsetup.setup(cfg.options.LogFile, cfg.options.LogLevel, cfg.locale.DateFormat, cfg.locale.TimeFormat)
    try:
        job = Job(cfg)
    except DatabaseError as exc:  # said in the log, not only in a traceback on the gateway's stderr
        log.error("scanner worker cannot start: %s", exc)
        logsetup.flush_all()
        return 1
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
        try:
            out.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
            out.flush()
        except BrokenPipeError:
            break  # the gateway is gone (stopping): its recovery redoes this job
        logsetup.flush_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
