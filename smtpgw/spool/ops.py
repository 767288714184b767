"""The queue operations of klmailq (kmg-spec §4.6, §4.7): list, remove, remove-all, release.

Owns: one implementation of each operation on the spool, used alike by the running
gateway (the control directory, the web console) and by the command line when no
gateway runs (under the queue's lock): which queue ID a request may name, which states
a message may be removed from, what a removal takes away with it, the record a released
message gets, the read-only listing, the free-space check of the spool's disk; and of the
store's release (``store release``, the console's release button) whether a released item is
learned as ham first (``LearnOnRelease``).

Must never: accept a path or a hidden name as a queue ID; remove a message being
processed (SPL, SND); change a record while listing (a record it cannot read is left
for the gateway to set aside).
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

from smtpgw.spool.queue import CHK, QUE, STAGED, STATES, WFC, WFS, Envelope, Queue, Recipient, new_id
from smtpgw.spool.store import SPAM_STATUSES, Item, StoreError, status_for_verdict

# klmailq / klmaila return codes (kmg-spec §4.7)
DONE, BAD_ARGS, UNREADABLE, SYSTEM_ERROR, NOT_PERFORMED = 0, 1, 2, 3, 4

# kmg-spec §4.6 allows WFC, WFS and QUE; this project adds CHK (``queue remove ID`` only): a
# message whose scan hangs can be taken out without stopping the gateway, and the result of
# its scan is discarded when it comes back. SPL and SND are short steps the gateway finishes.
REMOVABLE = (WFC, CHK, WFS, QUE)
REMOVED_BY_ALL = (WFC, WFS, QUE)  # ``queue remove-all``: what is not being processed

# (queue ID, state): takes one message out; or says why it could not (a record another process
# of the gateway moved on meanwhile: the delivery process took it out of QUE), and leaves it
Remove = Callable[[str, str], "str | None"]


def locate(queue: Queue, qid: object) -> tuple[str | None, int, str]:
    """(state, DONE, "") of the record ``qid``, or (None, code, why): ``qid`` must be a plain
    queue ID, never a path or a hidden name (``../msg``, ``.lock``), and name a record."""
    if not isinstance(qid, str) or not qid or "/" in qid or "\0" in qid or qid.startswith("."):
        return None, BAD_ARGS, "a queue ID is needed"
    state = queue.find(qid)
    if state is None:
        return None, NOT_PERFORMED, f"{qid}: no such message in the queue"
    return state, DONE, ""


def removal_refused(qid: str, state: str) -> str | None:
    """Why the record ``qid`` in ``state`` cannot be removed (kmg-spec §4.6), or None."""
    if state in REMOVABLE:
        return None
    return f"{qid}: is {state} (being processed); only {', '.join(REMOVABLE)} can be removed"


def remove_request(queue: Queue, op: str, qid: object, remove: Remove) -> tuple[int, str]:
    """``queue remove ID`` and ``queue remove-all``, the same for the running gateway (``remove``
    also withdraws the message from its stage) and with none running (``remove_record`` under
    the queue's lock)."""
    if op == "remove-all":
        removed = 0
        for state in REMOVED_BY_ALL:
            for item in queue.ids(state):
                if remove(item, state) is None:
                    removed += 1
        return DONE, f"{removed} message(s) removed"
    state, code, why = locate(queue, qid)
    if state is None:
        return code, why
    assert isinstance(qid, str)
    refused = removal_refused(qid, state)
    if refused:
        return NOT_PERFORMED, refused
    refused = remove(qid, state)
    if refused:
        return NOT_PERFORMED, refused
    return DONE, f"{qid}: removed"


def remove_record(queue: Queue, qid: str, state: str) -> None:
    """Take a message out of the spool: its record and message, and for one in CHK what a
    scan result cut short by a crash left of it (the staged rewrite, per-group copies in QUE
    that recovery would otherwise remove only while the message is still in CHK)."""
    queue.remove(qid, state)
    if state != CHK:
        return
    try:
        os.unlink(queue.msg_path(qid) + STAGED)
    except FileNotFoundError:
        pass
    for copy in queue.ids(QUE):
        if copy.rpartition("-")[0] == qid:
            env = queue.load(QUE, copy)
            if env is not None and env.srcid == qid:
                queue.remove(copy, QUE)


def release(queue: Queue, sender: str, recipients: list[str], check: bool, helo: str, *,
            data: bytes | None = None, link_from: str | None = None) -> Envelope:
    """Queue a released message (a store item): a new record in WFC to be scanned again, or in
    QUE without checks; its bytes are ``data`` or the file ``link_from``. The caller hands the
    record to the scanner or the sender (a gateway that starts later finds it in its state)."""
    size = len(data) if data is not None else os.path.getsize(str(link_from))
    env = Envelope(id=new_id(), sender=sender, recipients=[Recipient(addr=r) for r in recipients],
                   helo=helo, received_at=time.time(), size=size)
    queue.add_message(env, WFC if check else QUE, data=data, link_from=link_from)
    return env


def learns_on_release(item: Item, learn_on_release: bool) -> bool:
    """``[smtpgw.antispam] LearnOnRelease``: a released quarantined spam (status SPM or PSP, or a
    spam verdict of Spam or Probable Spam) is first learned as ham into the site spam database."""
    if not learn_on_release:
        return False
    if item.status in SPAM_STATUSES:
        return True
    try:
        return status_for_verdict(str(dict(item.verdicts).get("spam") or "")) in SPAM_STATUSES
    except StoreError:  # not a spam verdict
        return False


def entries(queue: Queue) -> list[tuple[str, Envelope]]:
    """``queue list``: every record as it is now, in state order, read without touching it (one
    that cannot be read is skipped; the gateway sets it aside in corrupt/ when it meets it)."""
    rows = []
    for state in STATES:
        for qid in queue.ids(state):
            try:
                with open(queue.record_path(state, qid), "rb") as f:
                    rows.append((state, Envelope.from_dict(json.load(f))))
            except (OSError, ValueError, TypeError, KeyError):
                continue
    return rows


def has_space(queue: Queue, needed: int) -> bool:
    """``MinimalQueueFreeSpaceSize``: whether the spool's disk has ``needed`` bytes free (0: no check)."""
    if not needed:
        return True
    st = os.statvfs(queue.root)
    return st.f_bavail * st.f_frsize >= needed
