"""The policy as data (smtpgw.policy): message actions from the spam and anti-virus verdicts together."""

from __future__ import annotations

from types import SimpleNamespace

from smtpgw.policy import ERROR, INFECTED, combine, decide, spam_fired


def test_spam_actions_fire_message_actions_with_their_reason() -> None:
    assert spam_fired("Spam", "ActionSpam", "quarantine") == {
        "BlockMessage": "Spam, ActionSpam=quarantine", "SaveInQB": "Spam, ActionSpam=quarantine"}
    assert spam_fired("Probable Spam", "ActionProbableSpam", "block") == {
        "BlockMessage": "Probable Spam, ActionProbableSpam=block"}
    assert spam_fired("Spam", "ActionSpam", "tag") == {} == spam_fired("Not Detected", "", "pass")


def test_both_verdicts_combine_keeping_every_reason() -> None:
    group = SimpleNamespace(ActionInfected="remove", BlockMessage={INFECTED, ERROR}, NotifyAdmin={INFECTED})
    virus = SimpleNamespace(path="2:invoice.com", status=INFECTED, virus_names=("Eicar",))
    av = decide(group, [virus]).fired
    fired = combine(spam_fired("Spam", "ActionSpam", "quarantine"), av)
    assert fired == {
        "BlockMessage": "Spam, ActionSpam=quarantine; infected 2:invoice.com (Eicar)",
        "SaveInQB": "Spam, ActionSpam=quarantine",
        "NotifyAdmin": "infected 2:invoice.com (Eicar)",
    }
    assert combine({}, av) == av and combine() == {}
