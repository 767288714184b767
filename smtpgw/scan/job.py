"""What a scanner worker does with one message (``python3 -m smtpgw.scan.job CONFIG | --snapshot FILE``).

Owns: the per-message scan in a worker process: splitting recipients into
groups (first matching ``[smtpgw.group:NAME]``, else ``[smtpgw.policy]``),
and for each group the checks its policy asks for (the spam check with the
group's own SpamDetection, lists and prefixes, inherited from
[smtpgw.antispam] when omitted; one loaded database serves every group; the
message's DKIM signatures verified first, once, on the keys the gateway looked
up, ``smtpgw.mail.dkim``) — every verdict (spam,
anti-virus) made before any action is taken, the actions then combined
(``smtpgw.policy.combine``) — producing a result the main process applies to
the queue. Speaks one JSON line per job on stdin and
one JSON line per result on stdout (see smtpgw.scan.workers).

Must never: change queue states (the main process owns them), pass a message
as clean when a check could not run (the result says ``deferred`` instead),
act on one verdict before the others are made (a spam stopped unscanned was
stored as clean, and released with its virus),
or let one bad message stop the worker (an error becomes that job's result).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # A worker hashes (the spam index's SHA-256 when it opens it, DKIM, the IChecker cache's keys)
    # with the interpreter's own SHA code, as a Python built without OpenSSL does: hashlib's OpenSSL
    # module maps libcrypto, 3.4 MiB RSS in each worker, which speaks no TLS. Set before anything
    # imports hashlib (a worker is started with -S: no site module before this).
    sys.modules.setdefault("_hashlib", None)

import json
import logging
import os
import select
import time
from typing import Any, Iterator

from smtpgw import release_heap, stats
from smtpgw.config import GROUP_ANTISPAM_KEYS, Config, Section, load_config, load_snapshot
from smtpgw.mail import dkim, headers
from smtpgw.mail.disclaimer import add_disclaimer
from smtpgw.reports import notify, templates
from smtpgw.rules import policy
from smtpgw.scan import antivirus
from smtpgw.scan.clamd import ClamdPool, ScannerUnavailable
from smtpgw.scan.results import CopyResult, ScanResult, not_scanned, templates_path
from smtpgw.spam import BLACKLISTED, PROBABLE_SPAM, SPAM, SpamFilter, SpamVerdict, as_log_fields, mark
from smtpgw.spam.autolearn import AutoLearner
from smtpgw.spam.spamfilter import default_bases
from smtpgw.spam.database import DatabaseError
from smtpgw.spool.durable import write_durably
from smtpgw.spool.queue import Envelope, Queue
from smtpgw.spool.store import Store, status_for_verdict

log = logging.getLogger("smtpgw.scan.job")
IDLE_RELEASE = 1.0  # seconds without a job after which a worker gives its freed heap back
READ_CHUNK = 1 << 20  # bytes read from stdin at a time


def header_change(env: Envelope, raw: bytes, message: bytes) -> tuple[str, int] | None:
    """When ``message`` is ``raw`` (``env``'s message as read, ``Queue.open_message``) with only its
    header block changed: (the new header block as Latin-1 text, where the unchanged body starts in
    msg/ID); else None (the body changed too: the message is written anew)."""
    old_end, new_end = headers.header_end(raw), headers.header_end(message)
    # compared in place (no copy of a body: a worker's memory stays bounded by a few messages)
    if len(raw) - old_end != len(message) - new_end or not message.startswith(memoryview(raw)[old_end:], new_end):
        return None
    kept = len(env.head) if env.head is not None else 0  # raw = kept header + msg/ID[body_offset:]
    if old_end < kept:
        return None
    offset = (env.body_offset if env.head is not None else 0) + old_end - kept
    return message[:new_end].decode("latin-1"), offset


def group_antispam(antispam: Section, group: Any) -> Section:
    """[smtpgw.antispam] with the group's own anti-spam keys (inherited from it when omitted)."""
    values = {key: value for key, value in vars(antispam).items() if not key.startswith("_")}
    values.update({key: getattr(group, key) for key in GROUP_ANTISPAM_KEYS})
    return Section(f"smtpgw.antispam for {group.name}", values, {})


def spam_word(verdict: SpamVerdict) -> str:
    """The verdict's word in NotifyAdmin / NotifyRecipient: Blacklisted counts as spam."""
    return "probable_spam" if verdict.status == PROBABLE_SPAM else "spam"


def summary_status(av: Any, verdict: SpamVerdict | None) -> str:
    """The anti-virus status when it is not clean (what a release must know first), else Spam
    or Probable Spam when the spam filter said so (Blacklisted as Spam)."""
    if av.status in (policy.CLEAN, policy.NOT_SCANNED) and verdict is not None and verdict.status in (
            SPAM, BLACKLISTED, PROBABLE_SPAM):
        return PROBABLE_SPAM if verdict.status == PROBABLE_SPAM else SPAM
    return str(av.status)


def spam_action_for(group: Any, verdict: SpamVerdict) -> tuple[policy.SpamAction, str]:
    """(the group's action for a spam verdict, the parameter that set it): ActionSpam,
    ActionProbableSpam (kmg-spec §10), else pass. A blacklisted sender counts as Spam."""
    if verdict.status in (SPAM, BLACKLISTED):
        return policy.SpamAction(group.ActionSpam), "ActionSpam"
    if verdict.status == PROBABLE_SPAM:
        return policy.SpamAction(group.ActionProbableSpam), "ActionProbableSpam"
    return policy.SpamAction.PASS, ""


class Job:
    """One message's scan with a loaded configuration (one per worker process)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.queue = Queue(cfg.path.QueuePath)
        pool = ClamdPool.from_config(cfg.ave)
        self.clamd: Any = pool
        if cfg.ave.UseIChecker:  # here, not at the top: sqlite3 (1 MiB RSS) only in a worker that keeps the cache
            from smtpgw.scan.ichecker import IChecker

            self.clamd = IChecker(pool, cfg.options.ICheckerDBFilename, cfg.ave.ICheckerCacheSize)
        # Per group, its templates and its spam filter, each built once per distinct setting; every
        # filter reads the one database loaded per worker (spamfilter.load_shared): a group's level,
        # lists and prefixes cost no database copy.
        loaded: dict[str, dict[str, templates.Template]] = {}
        filters: dict[str, SpamFilter] = {}
        self.templates: dict[str, dict[str, templates.Template]] = {}
        self.spam: dict[str, SpamFilter] = {}
        for group in (cfg.policy, *cfg.groups):
            folder = templates_path(cfg, group)
            if folder not in loaded:
                loaded[folder] = templates.load_templates(folder, templates.GROUP_KINDS)
            self.templates[group.name] = loaded[folder]
            section = group_antispam(cfg.antispam, group)
            key = repr([getattr(section, k) for k in GROUP_ANTISPAM_KEYS])
            if key not in filters:
                filters[key] = SpamFilter(section, cfg.base.BasesPath)
            self.spam[group.name] = filters[key]
        self.autolearn = AutoLearner(cfg.antispam, cfg.base.BasesPath or default_bases())
        self.dkim_keys: dkim.KeyAnswers | None = None  # of the message being scanned
        self.dkim_results: list[dkim.Result] | None = None

    def run(self, env: Envelope, dkim_keys: dkim.KeyAnswers | None = None) -> ScanResult:
        """Scan ``env``'s message; ``dkim_keys``: the keys of its DKIM signatures as the gateway
        looked them up (None: none were, the signatures are then only read)."""
        raw = self.queue.read_message(env)
        self.dkim_keys, self.dkim_results = dkim_keys, None
        groups: dict[str, tuple[Any, list[str]]] = {}
        for rcpt in env.pending():
            group = self.cfg.group_for(env.sender, rcpt.addr, env.client_ip)
            groups.setdefault(group.name, (group, []))[1].append(rcpt.addr)
        result = ScanResult()
        verdicts: dict[tuple[int, tuple[str, ...]], SpamVerdict] = {}
        for index, (group, rcpts) in enumerate(groups.values(), start=1):
            verdict = self._classify(env, raw, group, rcpts, verdicts)
            try:
                result.copies.append(self._scan_group(env, raw, group, rcpts, index, verdict))
            except ScannerUnavailable as exc:
                return ScanResult(deferred=f"anti-virus unavailable: {exc}")
        learned = self.autolearn.consider(raw, list(verdicts.values()), list(env.dnsbl))
        if learned:
            log.info("%s: auto-learned as %s into %s", env.id, learned, self.autolearn.site)
        return result

    def _classify(self, env: Envelope, raw: bytes, group: Any, rcpts: list[str],
                  verdicts: dict[tuple[int, tuple[str, ...]], SpamVerdict]) -> SpamVerdict | None:
        """The group's spam verdict (before anti-virus), with its level and lists; groups sharing
        a filter share one classification unless recipient lists make their recipients count."""
        spam = self.spam[group.name]
        if not (group.Check and spam.enabled):
            return None
        lists = spam.lists
        key = (id(spam), tuple(rcpts) if lists.white_recipients or lists.black_recipients else ())
        if key not in verdicts:
            with dkim.verified(self._dkim_results(env, raw)):
                verdicts[key] = spam.classify(raw, env.client_ip or None, env.sender, rcpts, list(env.dnsbl))
        return verdicts[key]

    def _dkim_results(self, env: Envelope, raw: bytes) -> list[dkim.Result] | None:
        """The DKIM verification of the message (RFC 6376), made once, with the keys the gateway
        looked up; None when it looked none up."""
        if self.dkim_keys is not None and self.dkim_results is None:
            self.dkim_results = dkim.verify(raw, self.dkim_keys)
            log.debug("%s: DKIM %s", env.id, "; ".join(f"{r.describe()} s={r.selector} ({r.reason})"
                                                         for r in self.dkim_results))
        return self.dkim_results

    def _scan_group(self, env: Envelope, raw: bytes, group: Any, rcpts: list[str], index: int,
                    verdict: SpamVerdict | None) -> CopyResult:
        """Both verdicts first (spam, then anti-virus on every message, a spam that is stopped
        too), then the group's actions for them together."""
        if not group.Check:
            return not_scanned(group.name, rcpts)
        copy = CopyResult(group=group.name, recipients=rcpts)
        marked = raw
        spam: dict[str, str] = {}
        if verdict is not None:
            spam_action, key = spam_action_for(group, verdict)
            fields, values = as_log_fields(verdict)
            copy.events.append((f'AS-SCANNED, group=%s, nrcpt=%d, {fields}, action=%s, reasons="%s"',
                                [group.name, len(rcpts), *values, spam_action, "; ".join(verdict.reasons)[:300]]))
            spam = policy.spam_fired(verdict.status, key, spam_action)
            spam = policy.combine(spam, policy.spam_notices(group, spam_word(verdict), spam))
            if not spam:  # X-SpamTest-* fields, the Subject tagged with the group's prefix
                marked = mark(raw, verdict, self.spam[group.name].section, spam_action)
                if self.dkim_results is not None and self.cfg.network.Hostname:  # RFC 8601 §5
                    marked = dkim.stamp(marked, self.cfg.network.Hostname, self.dkim_results)
        av = antivirus.scan_message(marked, group, self.cfg.ave, self.clamd, templates_path(self.cfg, group))
        template, values = antivirus.av_log_event(av)
        copy.events.append((template + ", nrcpt=%d", [*values, len(rcpts)]))
        if av.spent:
            log.warning("%s: scan budget exceeded, status error: %s", env.id, av.spent)
        copy.notes = {"status": av.status, "virus_names": list(av.virus_names)}
        if verdict is not None:
            copy.notes["spam_status"] = verdict.status
        if self.cfg.options.AVStatistics:
            self._av_statistics(env, rcpts, av)
        standards: dict[str, str] = {}
        if self.cfg.options.StrictStandards and not spam and not av.blocked:
            problems = headers.violations(raw)
            if problems:  # kmg-spec §3.8: messages violating RFC format are not delivered (kept to release)
                why = "StrictStandards: " + "; ".join(problems)
                standards = {"BlockMessage": why, "SaveInQB": why}
        fired = policy.combine(spam, av.reasons, standards)
        av.blocked, av.block_reason = "BlockMessage" in fired, fired.get("BlockMessage", "")
        av.save_in_qb = "SaveInQB" in fired
        av.notify_admin, av.notify_recipient = "NotifyAdmin" in fired, "NotifyRecipient" in fired
        if av.save_in_qb:
            self._quarantine(env, raw, group, av, verdict, fired)
        if av.modified and not av.blocked and group.BackupPath:
            Store(group.BackupPath).put(env.id, raw, env.as_dict(spool=False), "BAK", "original before " + ", ".join(
                sorted({o.decision for o in av.objects if o.action != "pass"})))
        if av.blocked:
            copy.blocked = True
            copy.events.append(('BLOCKED, rcpt=%s, size=%d, reason="%s"', [rcpts, env.size, av.block_reason]))
        else:
            message = av.message
            if group.AddDisclaimer:  # kmg-spec §5.4: the group's disclaimer as a last text part
                text = notify.render_disclaimer(self.templates[group.name]["disclaimer"], env.as_dict(), {"group": group.name},
                                                self.cfg.locale.DateFormat, self.cfg.locale.TimeFormat, time.time())
                message = add_disclaimer(message, text)
            change = header_change(env, raw, message) if message != raw else None
            if change is not None:  # the record carries the new header: no new file, fewer fsyncs
                copy.head, copy.body_offset = change
            elif message != raw:
                copy.rewritten = os.path.join(self.queue.root, "tmp", f"{env.id}.scan{index}")
                # made durable by the main process, in an I/O thread (Queue.replace_and_move), so
                # that no worker waits for the disk
                with open(copy.rewritten, "wb") as f:
                    f.write(message)
        copy.notes["notifications"] = self._notifications(env, raw, group, rcpts, av, verdict, index)
        return copy

    def _quarantine(self, env: Envelope, raw: bytes, group: Any, av: Any, verdict: SpamVerdict | None,
                    fired: dict[str, str]) -> None:
        """The original in QuarantinePath (SpamQuarantinePath for spam, when set) with both verdicts:
        its status code is the anti-virus status when that is not clean (what a release must know
        first), else the spam verdict when spam put it there."""
        status = summary_status(av, verdict)
        names = f" ({', '.join(av.virus_names)})" if av.virus_names else ""
        verdicts = {"anti-virus": av.status + names}
        if verdict is not None:
            verdicts["spam"] = verdict.status
        reason = "; ".join(f"{k}: {v}" for k, v in fired.items())
        folder = group.QuarantinePath
        if status in (SPAM, PROBABLE_SPAM):  # spam kept apart from viruses when SpamQuarantinePath is set
            folder = group.SpamQuarantinePath or folder
        if folder:
            Store(folder).put(env.id, raw, env.as_dict(spool=False), status_for_verdict(status), reason, verdicts)

    def _av_statistics(self, env: Envelope, rcpts: list[str], av: Any) -> None:
        """Time, Size, Sender, Recipients, Status, VirusList, IP, Message-id (kmg-spec §7.3)."""
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        rows = [[when, o.size, env.sender, ",".join(rcpts), o.status, ",".join(o.virus_names),
                 env.client_ip, env.message_id or ""] for o in av.objects]
        stats.write_av_statistics(self.cfg.options.AVStatistics, rows)

    def _notifications(self, env: Envelope, raw: bytes, group: Any, rcpts: list[str], av: Any,
                       verdict: SpamVerdict | None, index: int) -> list[dict[str, Any]]:
        """Notification messages (kmg-spec §1.3, §5.1) about the anti-virus and spam verdicts,
        written where the main process picks them up."""
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
            "status": summary_status(av, verdict), "group": group.name, "queue_id": env.id, "blocked": av.blocked,
            "subject": headers.get_raw(raw, "Subject") or b"",
            "objects": [{"name": o.name or o.path, "status": o.status, "viruses": list(o.virus_names), "action": o.action}
                        for o in av.objects if o.status != "clean"],
        }
        if verdict is not None:
            event.update(spam_status=verdict.status, spam_method=verdict.method)
        out = []
        for n, (kind, to) in enumerate(wanted):
            try:
                data = notify.build_notification(kind, env.as_dict(), event, group.NotifyFromAddress, to,
                                                 self.templates[group.name]["notify"], self.cfg.locale.DateFormat,
                                                 self.cfg.locale.TimeFormat, time.time())
            except ValueError as exc:
                log.warning("%s: no %s notification: %s", env.id, kind, exc)
                continue
            path = os.path.join(self.queue.root, "tmp", f"{env.id}.notify{index}.{n}")
            write_durably(path, data)
            out.append({"kind": kind, "path": path, "from": group.NotifyFromAddress, "to": list(to), "size": len(data)})
        return out


def job_lines(fd: int, idle: float = IDLE_RELEASE) -> Iterator[bytes]:
    """The job lines the gateway writes to ``fd`` (the worker's stdin), as they come, until it
    closes it. A worker that has waited ``idle`` seconds without one gives its freed heap back
    (``smtpgw.release_heap``: about 1 MiB RSS after a few jobs), once, before it waits on."""
    buffer = bytearray()
    while True:
        end = buffer.find(b"\n")
        if end >= 0:
            line = bytes(buffer[:end + 1])
            del buffer[:end + 1]
            yield line
            continue
        if not select.select([fd], [], [], idle)[0]:
            release_heap()
        chunk = os.read(fd, READ_CHUNK)
        if not chunk:
            if buffer:
                yield bytes(buffer)
            return
        buffer += chunk


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[0] == "--snapshot":  # what the gateway accepted (gateway._publish_worker_config)
        cfg = load_snapshot(args[1])
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
    out.write(b'{"ready":true}\n')  # loaded: jobs may come (smtpgw.scan.workers)
    out.flush()
    for line in job_lines(sys.stdin.fileno()):
        qid = "?"
        try:
            request = json.loads(line)
            qid = request["qid"]
            result = job.run(Envelope.from_dict(request["env"]), request.get("dkim"))
            answer: dict[str, Any] = {"qid": qid, **result.as_dict()}
        except Exception as exc:  # one bad message must not stop the worker
            log.exception("%s: scan failed", qid)
            answer = {"qid": qid, "error": f"{type(exc).__name__}: {exc}"}
        try:
            out.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
            out.flush()
        except BrokenPipeError:
            break  # the gateway is gone (stopping): its recovery redoes this job
        logsetup.flush_all()
    job.clamd.close()  # clamd's sessions (scan.clamd); stdin closed: the gateway stops this worker
    return 0


if __name__ == "__main__":
    sys.exit(main())
