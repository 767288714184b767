"""The policy as data (smtpgw.policy): message actions from the spam and anti-virus verdicts together."""

from __future__ import annotations

from types import SimpleNamespace

from smtpgw.rules.policy import ERROR, INFECTED, combine, decide, spam_fired, spam_notices


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


def test_spam_notices_only_for_a_stopped_spam_listed_by_the_group() -> None:
    group = SimpleNamespace(NotifyAdmin={INFECTED, "spam"}, NotifyRecipient={"probable_spam"})
    quarantined = spam_fired("Spam", "ActionSpam", "quarantine")
    assert spam_notices(group, "spam", quarantined) == {"NotifyAdmin": "Spam, ActionSpam=quarantine"}
    blocked = spam_fired("Probable Spam", "ActionProbableSpam", "block")
    assert spam_notices(group, "probable_spam", blocked) == {"NotifyRecipient": "Probable Spam, ActionProbableSpam=block"}
    assert spam_notices(group, "spam", spam_fired("Spam", "ActionSpam", "tag")) == {}  # delivered: no notice


def test_spam_actions_are_the_configuration_words() -> None:
    """SpamAction's values are exactly the words ActionSpam / ActionProbableSpam accept, so a
    configured value is one, and records and log lines keep the words."""
    from smtpgw.config import SCHEMA
    from smtpgw.rules.policy import SpamAction

    for key in ("ActionSpam", "ActionProbableSpam"):
        (param,) = [p for p in SCHEMA if p.section == "smtpgw.policy" and p.key == key]
        assert sorted(param.range.split("|")) == sorted(SpamAction) and SpamAction(param.default)
    assert spam_fired("Spam", "ActionSpam", SpamAction.QUARANTINE) == {
        "BlockMessage": "Spam, ActionSpam=quarantine", "SaveInQB": "Spam, ActionSpam=quarantine"}
    assert spam_fired("Spam", "ActionSpam", SpamAction("tag")) == {}
