"""One message's anti-virus scan for one group (kmg-spec §1.5 steps 5–9).

Owns: the order decompose → filter → clamd → policy → rebuild, the result a
scanner worker gets back (``AVResult``), the placeholder text that replaces
an object (``placeholder.tmpl``), the informational ``X-Anti-Virus`` header
(§5.5) and the ``AV-SCANNED`` log line (§7.1).

Must never: call a message clean when clamd gave no verdict (``ScannerUnavailable``
propagates and the caller keeps the message queued), run on the event loop
(clamd calls block; this runs in scanner workers), or touch bytes of the
message outside the objects it removes or replaces.

What goes to clamd, and why:
* every leaf object's *decoded* content: body parts, attachments, archive
  members, uuencoded files. Our own decomposition reaches what clamd's mail
  scanner may not (a tar.gz inside a base64 message/rfc822 part, uuencoded
  blocks), and a verdict names the object it belongs to, so actions can
  remove just that object. Archives that opened cleanly are represented by
  their members and are not sent again (that would double the cost for
  nothing new); filtered objects are not scanned at all (§1.1).
* each distinct content once: objects with the same bytes share one verdict.
* objects the decomposition could not open (status ``error`` or ``protected``:
  truncated or encrypted archives, bombs) are still sent as they are, so a
  payload clamd can reach turns them ``infected``.
* the whole raw message only when the decomposition recorded defects or a
  multipart carries more than ``OUTSIDE_TEXT_LIMIT`` bytes of text outside its
  parts (preamble, epilogue): where the structure is malformed, mail readers
  may see it differently from us, and clamd's own parser is a second opinion.
  A detection there that no object explains becomes the object ``message``.
  Well-formed mail (about 95% of the test corpus) costs one pass.

The message's scan budget (``[smtpgw.ave]``): ``MaximalMessageObjects`` and
``MaximalDecodedSize`` bound what the decomposition makes (``smtpgw.mime``),
``MaximalClamdScans`` the clamd scans of its objects. An object left
unscanned by the budget is ``error`` (never clean: the group's policy for
error decides), and the whole message then goes to clamd once more, so that
clamd's own parser reads what we did not.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from smtpgw import PRODUCT, __version__
from smtpgw.log import Event, quoted
from smtpgw.mail import headers, mime
from smtpgw.reports.templates import Template
from smtpgw.scan.clamd import ClamdPool, ScannerUnavailable, Verdict
from smtpgw.scan.results import load_placeholder
from smtpgw.rules.policy import (
    CLEAN,
    ERROR,
    FILTERED,
    INFECTED,
    NOT_SCANNED,
    PASS,
    PLACEHOLDER,
    REMOVE,
    SUSPICIOUS,
    decide,
    filter_reason,
    most_severe,
    severity,
)

__all__ = [
    "ObjectResult",
    "AVResult",
    "scan_message",
    "av_log_event",
    "load_placeholder",
    "render_placeholder",
]

MAX_HEADER_OBJECTS = 10  # objects named in the X-Anti-Virus header
OUTSIDE_TEXT_LIMIT = 64  # bytes; the usual "This is a multi-part message" notice is less
X_HEADER = "X-Anti-Virus"  # kmg-spec §5.5, the sibling product's name




@dataclass
class ObjectResult:
    path: str  # "1/2:invoice.zip/readme.exe"
    name: str
    mime_type: str
    size: int  # decoded bytes
    status: str  # clean | infected | suspicious | protected | error | filtered
    virus_names: tuple[str, ...] = ()
    action: str = PASS  # pass | remove | placeholder
    reason: str = ""  # why the status when clamd's names do not say it (error, protected, filtered)
    decision: str = ""  # why the action: "infected, ActionInfected=remove"


@dataclass
class AVResult:
    group: str
    status: str  # most severe object status, or "not scanned"
    objects: list[ObjectResult] = field(default_factory=list)
    virus_names: tuple[str, ...] = ()
    blocked: bool = False
    block_reason: str = ""
    notify_admin: bool = False
    notify_recipient: bool = False
    notify_sender: bool = False
    save_in_qb: bool = False
    reasons: dict[str, str] = field(default_factory=dict)  # fired message action → why
    modified: bool = False  # an object was removed or replaced
    message: bytes = b""  # the message to deliver: rebuilt, with the X-header if enabled
    x_header: str = ""  # the X-Anti-Virus value
    defects: list[str] = field(default_factory=list)
    engine: str = ""  # clamd version and databases, as in the X-header
    scans: int = 0  # clamd scans made
    spent: str = ""  # why the message's scan budget ran out, or empty

    @property
    def checked(self) -> bool:
        return self.status != NOT_SCANNED


@dataclass
class _Found:
    node: mime.MimeObject
    result: ObjectResult


def _verdict_status(node: mime.MimeObject, verdict: Verdict | None) -> tuple[str, tuple[str, ...], str]:
    """Combine the decomposition's own status with clamd's verdict: the more severe wins."""
    own = node.status
    if verdict is None:
        return own or CLEAN, (), node.reason
    if own and severity(own) >= severity(verdict.status):
        return own, verdict.names, node.reason
    return verdict.status, verdict.names, verdict.detail if verdict.status == ERROR else ""


def _objects(root: mime.MimeObject, group: Any) -> Iterator[tuple[mime.MimeObject, str | None, bool]]:
    """(node, filter reason, send to clamd) for every object that gets a status."""
    stack = [root]
    while stack:
        node = stack.pop()
        if node.kind in ("multipart", "message"):
            if node.status:
                yield node, None, False
            stack.extend(reversed(node.children))
            continue
        reason = filter_reason(group, (node.name, *node.other_names), node.content_type)
        if reason:
            yield node, reason, False  # filtered objects are not scanned (§1.1), nor what they hold
            continue
        opened = bool(node.archive) and node.status is None
        if not opened:
            yield node, None, bool(node.data)
        stack.extend(reversed(node.children))


class _Scans:
    """The message's clamd scans: one per distinct content, at most ``limit`` of them."""

    def __init__(self, pool: ClamdPool, limit: int) -> None:
        self.pool = pool
        self.limit = limit
        # keyed by the content itself: the objects hold it for the whole scan anyway, and hashing
        # it for the dict costs a small part of a SHA-256 of it (13 µs for 4 KiB in a worker,
        # which has no OpenSSL)
        self.by_content: dict[bytes, Verdict] = {}
        self.verdicts: list[Verdict] = []  # one per scan made
        self.spent = ""  # why an object was left unscanned, once one was

    def scan(self, data: bytes) -> Verdict | None:
        """clamd's verdict on ``data``, or None when the budget allows no more scans."""
        key = data if type(data) is bytes else bytes(data)
        known = self.by_content.get(key)
        if known is not None:
            return known
        if len(self.verdicts) >= self.limit:
            self.spent = f"not scanned: more than MaximalClamdScans ({self.limit}) clamd scans for the message"
            return None
        verdict = self.pool.scan(data)
        self.verdicts.append(verdict)
        self.by_content[key] = verdict
        return verdict

    def whole(self, raw: bytes) -> Verdict:
        """The whole message: always scanned, the one scan past the budget."""
        verdict = self.pool.scan(raw)
        self.verdicts.append(verdict)
        return verdict


def _scan_objects(tree: mime.MimeTree, group: Any, scans: _Scans) -> list[_Found]:
    found: list[_Found] = []
    for node, filtered, send in _objects(tree.root, group):
        path = node.path or "message"
        if filtered:
            result = ObjectResult(path, node.name, node.content_type, node.size, FILTERED, (), PASS, filtered)
            found.append(_Found(node, result))
            continue
        verdict = scans.scan(node.data or b"") if send else None
        if send and verdict is None:
            status, names, reason = ERROR, (), scans.spent
        else:
            status, names, reason = _verdict_status(node, verdict)
        result = ObjectResult(path, node.name, node.content_type, node.size, status, names, PASS, reason)
        found.append(_Found(node, result))
    if tree.defects or tree.outside > OUTSIDE_TEXT_LIMIT or scans.spent:
        verdict = scans.whole(tree.raw)
        known = {name for item in found for name in item.result.virus_names}
        # only detections add to what the objects said (errors and encryption they report)
        if verdict.status in (INFECTED, SUSPICIOUS) and not set(verdict.names) <= known:
            root = tree.root
            found.append(
                _Found(
                    root,
                    ObjectResult(
                        "message", "", root.content_type, len(tree.raw), verdict.status,
                        verdict.names, PASS, "found by clamd in the whole message",
                    ),
                )
            )
    return found


def render_placeholder(template: Template, values: dict[str, str]) -> str:
    """The text of a checked placeholder template for these macro values."""
    return template.render(values, {})[1]


def _placeholder_text(template: Template, result: ObjectResult, now: float) -> str:
    values = {
        "OBJECT_NAME": result.name or result.path,
        "OBJECT_PATH": result.path,
        "OBJECT_TYPE": result.mime_type,
        "OBJECT_SIZE": str(result.size),
        "STATUS": result.status,
        "VIRUS_NAMES": ", ".join(result.virus_names),
        "ACTION": result.action,
        "REASON": result.reason,
        "PRODUCT": f"{PRODUCT} {__version__}",
        "DATE": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
    }
    return render_placeholder(template, values)


def _engine_text(pool: ClamdPool, verdicts: list[Verdict]) -> str:
    try:
        return str(pool.engine(verdicts[0].server if verdicts else None))
    except ScannerUnavailable:
        return ""  # nothing was sent to clamd and it is down: the header says less


def _x_header(engine: str, status: str, objects: list[ObjectResult], now: float) -> str:
    """The X-Anti-Virus value (kmg-spec §5.5), e.g. ``smtpgw 0.1.0, clamd 1.4.6/27500
    20241210, check: 20261128 infected; 1:a.exe infected, ActionInfected=remove``."""
    value = f"{PRODUCT} {__version__}"
    if engine:
        value += f", clamd {engine}"
    value += f", check: {time.strftime('%Y%m%d', time.localtime(now))} {status}"
    acted = [item for item in objects if item.action != PASS]
    notes = [f"{item.path} {item.decision}" for item in acted[:MAX_HEADER_OBJECTS]]
    if len(acted) > MAX_HEADER_OBJECTS:
        notes.append(f"and {len(acted) - MAX_HEADER_OBJECTS} more")
    if notes:
        value += "; " + "; ".join(notes)
    return quoted(value)


def _finish(result: AVResult, raw: bytes, group: Any, engine: str, now: float) -> AVResult:
    result.engine = engine
    result.x_header = _x_header(engine, result.status, result.objects, now)
    if getattr(group, "AddXHeaders", True):
        # Ours is the only X-Anti-Virus the recipient sees: fields that came with the message
        # are removed first, as spam.verdict.mark does for X-SpamTest-* (clients filter on
        # them, so a sender's forged "clean" must not sit next to our verdict, kmg-spec §5.5).
        raw = headers.prepend(headers.remove(raw, X_HEADER), [(X_HEADER, result.x_header)])
    result.message = raw
    return result


def scan_message(
    raw: bytes,
    group: Any,
    ave: Any,
    clamd_pool: ClamdPool,
    templates_path: str | None = None,
    now: float | None = None,
) -> AVResult:
    """Scan ``raw`` under ``group``'s policy (a config group or ``cfg.policy``).

    Raises ``ScannerUnavailable`` when clamd cannot be reached (keep the message
    queued) and ``TemplateError`` when a placeholder is needed and
    placeholder.tmpl is missing or invalid.
    """
    now = time.time() if now is None else now
    name = str(getattr(group, "name", "policy"))
    if not getattr(group, "Check", True):
        return _finish(AVResult(name, NOT_SCANNED), raw, group, "", now)
    limits = mime.Limits.from_ave(ave)
    tree = mime.decompose(raw, limits)
    scans = _Scans(clamd_pool, limits.max_clamd_scans)
    found = _scan_objects(tree, group, scans)
    decision = decide(group, [item.result for item in found], cure=bool(getattr(ave, "Cure", False)))
    template: Template | None = None
    edits: list[mime.Edit] = []
    for item, chosen in zip(found, decision.objects):
        item.result.action = chosen.action
        item.result.decision = chosen.reason
        if chosen.action == REMOVE:
            edits.append(mime.Edit(item.node))
        elif chosen.action == PLACEHOLDER:
            if template is None:
                template = load_placeholder(templates_path)
            edits.append(mime.Edit(item.node, _placeholder_text(template, item.result, now)))
    objects = [item.result for item in found]
    names = tuple(dict.fromkeys(n for item in objects for n in item.virus_names))
    result = AVResult(
        group=name,
        status=most_severe(item.status for item in objects),
        objects=objects,
        virus_names=names,
        blocked="BlockMessage" in decision.fired,
        block_reason=decision.fired.get("BlockMessage", ""),
        notify_admin="NotifyAdmin" in decision.fired,
        notify_recipient="NotifyRecipient" in decision.fired,
        notify_sender="NotifySender" in decision.fired,
        save_in_qb="SaveInQB" in decision.fired,
        reasons=dict(decision.fired),
        modified=bool(edits),
        defects=list(tree.defects),
        scans=len(scans.verdicts),
        spent=tree.spent or scans.spent,
    )
    rebuilt = mime.rebuild(raw, edits) if edits else raw
    return _finish(result, rebuilt, group, _engine_text(clamd_pool, scans.verdicts), now)


def av_log_event(result: AVResult) -> Event:
    """``AV-SCANNED, group=<name>, status="...", names="..."`` (kmg-spec §7.1),
    followed by ``reasons="..."`` when a message-level action fired (see ``log.line``)."""
    template = 'AV-SCANNED, group=%s, status="%s", names="%s"'
    values: list[object] = [result.group, result.status, ", ".join(result.virus_names)]
    if result.reasons:
        template += ', reasons="%s"'
        values.append("; ".join(f"{key}: {why}" for key, why in result.reasons.items()))
    return template, values
