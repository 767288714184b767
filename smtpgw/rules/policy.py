"""The anti-virus policy as data: statuses, the per-status object actions, the
message-level actions, and the decision for one message in one group.

Owns: the status names and their severity order, the ``Action*`` table
(kmg-spec §1.2), the message-level status lists (BlockMessage, NotifyAdmin,
NotifyRecipient, NotifySender, SaveInQB; §1.3), the attachment name/MIME
filter (§3.13) and ``decide``, which records *why* each action fired.

Must never: scan, parse or modify a message, or talk to anything: it only maps
statuses to actions. Every decision carries a short reason for the log line
and the X-header.

A message's actions combine its verdicts (``combine``): the anti-virus
decision and the spam action (``spam_fired``, ``SPAM_MESSAGE_ACTIONS``) are
both computed for every scanned message before any is carried out, so a
stopped spam still has its anti-virus status and a stored copy carries both.

``cure``: clamd cannot disinfect, so no object ever becomes ``disinfected``.
``Cure=true`` and ``ActionDisinfected=cure`` are accepted and change nothing:
an infected object stays ``infected`` and gets ``ActionInfected`` (its reason
says so when Cure is on).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from smtpgw.rules.masks import wildcard_match

__all__ = [
    "CLEAN",
    "FILTERED",
    "DISINFECTED",
    "ERROR",
    "PROTECTED",
    "SUSPICIOUS",
    "INFECTED",
    "NOT_SCANNED",
    "STATUSES",
    "OBJECT_ACTION_KEYS",
    "MESSAGE_ACTION_KEYS",
    "PASS",
    "REMOVE",
    "PLACEHOLDER",
    "CURE",
    "severity",
    "most_severe",
    "filter_reason",
    "ObjectDecision",
    "Decision",
    "decide",
    "SPAM_MESSAGE_ACTIONS",
    "SpamAction",
    "spam_fired",
    "SPAM_NOTICE_KEYS",
    "spam_notices",
    "combine",
]

CLEAN = "clean"
FILTERED = "filtered"
DISINFECTED = "disinfected"
ERROR = "error"
PROTECTED = "protected"
SUSPICIOUS = "suspicious"
INFECTED = "infected"
NOT_SCANNED = "not scanned"  # the group has Check=false

# Ascending severity: the summary status of a message is its most severe object's.
STATUSES: tuple[str, ...] = (CLEAN, FILTERED, DISINFECTED, ERROR, PROTECTED, SUSPICIOUS, INFECTED)
_SEVERITY = {status: rank for rank, status in enumerate(STATUSES)}

PASS = "pass"
REMOVE = "remove"
PLACEHOLDER = "placeholder"
CURE = "cure"

OBJECT_ACTION_KEYS: dict[str, str] = {
    DISINFECTED: "ActionDisinfected",
    INFECTED: "ActionInfected",
    SUSPICIOUS: "ActionSuspicious",
    PROTECTED: "ActionProtected",
    ERROR: "ActionError",
    FILTERED: "ActionFiltered",
}

# Applied after all objects, in this order (kmg-spec §1.5 step 9).
MESSAGE_ACTION_KEYS: tuple[str, ...] = (
    "BlockMessage",
    "NotifyAdmin",
    "NotifyRecipient",
    "NotifySender",
    "SaveInQB",
)


class SpamAction(enum.StrEnum):
    """A group's ActionSpam / ActionProbableSpam (this project's extension, kmg-spec §2.5);
    the values are the configuration's words."""

    PASS = "pass"  # delivered as it is
    TAG = "tag"  # delivered with the Subject prefix
    QUARANTINE = "quarantine"  # kept in the spam quarantine, not delivered
    BLOCK = "block"  # not delivered


# The message actions a spam action fires: "tag" and "pass" deliver, so they fire none.
SPAM_MESSAGE_ACTIONS: dict[SpamAction, tuple[str, ...]] = {
    SpamAction.BLOCK: ("BlockMessage",),
    SpamAction.QUARANTINE: ("BlockMessage", "SaveInQB"),
}


class ObjectVerdict(Protocol):
    """What ``decide`` needs to know about one object."""

    path: str
    status: str
    virus_names: tuple[str, ...]


def severity(status: str) -> int:
    return _SEVERITY.get(status, 0)


def most_severe(statuses: Iterable[str]) -> str:
    return max(statuses, key=severity, default=CLEAN)


def _first_match(masks: Iterable[str], value: str) -> str | None:
    return next((mask for mask in masks if wildcard_match(mask, value)), None)


def filter_reason(group: Any, name: str | Sequence[str], mime_type: str) -> str | None:
    """Why an object is ``filtered``, or None (kmg-spec §3.13, B50 p.80).

    Filtered when its name matches an IncludeByName mask and no ExcludeByName
    mask, or its MIME type matches IncludeByMime and no ExcludeByMime. An
    object without a file name is judged by its MIME type alone. ``name`` may
    be every name the object declares (Content-Disposition filename= and
    Content-Type name=): any one of them filtered filters the object, since a
    mail reader may save it under either.
    """
    for each in (name,) if isinstance(name, str) else name:
        if not each:
            continue
        include = _first_match(getattr(group, "IncludeByName", ()), each)
        if include is not None and _first_match(getattr(group, "ExcludeByName", ()), each) is None:
            return f'name "{each}" matches IncludeByName "{include}"'
    include = _first_match(getattr(group, "IncludeByMime", ()), mime_type)
    if include is not None and _first_match(getattr(group, "ExcludeByMime", ()), mime_type) is None:
        return f'type "{mime_type}" matches IncludeByMime "{include}"'
    return None


@dataclass(frozen=True)
class ObjectDecision:
    path: str
    status: str
    action: str  # pass | remove | placeholder
    reason: str


@dataclass
class Decision:
    """The group's answer for one message: per-object actions and message actions.

    ``fired`` maps each message-level action that applies (BlockMessage,
    NotifyAdmin, …) to the reason it fired; an action that does not apply is absent.
    """

    objects: list[ObjectDecision] = field(default_factory=list)
    fired: dict[str, str] = field(default_factory=dict)


def _object_action(group: Any, status: str, cure: bool) -> tuple[str, str]:
    key = OBJECT_ACTION_KEYS.get(status)
    if key is None:  # clean: nothing to do
        return PASS, ""
    action = str(getattr(group, key, PASS))
    note = " (clamd cannot cure)" if status == INFECTED and cure else ""
    if action == CURE:
        # only meaningful for a disinfected object, which is then passed as is
        return PASS, f"{status}{note}, {key}=cure passes it"
    return action, f"{status}{note}, {key}={action}"


def _describe(item: ObjectVerdict) -> str:
    names = f" ({', '.join(item.virus_names)})" if item.virus_names else ""
    return f"{item.status} {item.path}{names}"


def decide(group: Any, object_results: Sequence[ObjectVerdict], cure: bool = False) -> Decision:
    """Object actions (§1.2) then message actions (§1.3) for one group."""
    decision = Decision()
    for item in object_results:
        action, reason = _object_action(group, item.status, cure)
        decision.objects.append(ObjectDecision(item.path, item.status, action, reason))
    for key in MESSAGE_ACTION_KEYS:
        listed = frozenset(getattr(group, key, frozenset()))
        hits = [item for item in object_results if item.status in listed]
        if not hits:
            continue
        worst = max(hits, key=lambda item: severity(item.status))
        more = f" and {len(hits) - 1} more" if len(hits) > 1 else ""
        decision.fired[key] = _describe(worst) + more
    return decision


def spam_fired(spam_status: str, key: str, action: SpamAction) -> dict[str, str]:
    """The message actions the group's spam action ``key=action`` fires, each with its reason."""
    why = f"{spam_status}, {key}={action}"
    return {name: why for name in SPAM_MESSAGE_ACTIONS.get(action, ())}


SPAM_NOTICE_KEYS: tuple[str, ...] = ("NotifyAdmin", "NotifyRecipient")


def spam_notices(group: Any, word: str, stopped: dict[str, str]) -> dict[str, str]:
    """The notices a spam verdict fires: ``word`` (``spam``, ``probable_spam``) listed in the
    group's NotifyAdmin / NotifyRecipient, for a message its spam action stopped (``stopped``,
    from ``spam_fired``). A tagged spam is delivered: noticing each would flood the admin, and
    never to the sender, whose address a spam forges (backscatter)."""
    if "BlockMessage" not in stopped:
        return {}
    why = stopped["BlockMessage"]
    return {key: why for key in SPAM_NOTICE_KEYS if word in getattr(group, key, ())}


def combine(*fired: dict[str, str]) -> dict[str, str]:
    """One message's actions from several verdicts (spam, anti-virus, standards): an action
    fires when any verdict fires it, and keeps every reason, in the order given."""
    out: dict[str, str] = {}
    for each in fired:
        for name, why in each.items():
            out[name] = f"{out[name]}; {why}" if name in out else why
    return out
