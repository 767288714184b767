"""The quota counts: bounded recipient set, thresholds once per day, the period's end at
midnight, the state file across a restart, refusals only with QuotaAction=defer."""

from __future__ import annotations

import email
import json
from pathlib import Path

import pytest

from smtpgw.config import Config, load_config
from smtpgw.receive.quota import MB, Quota, notice
from tests.test_config import minimal_with


class Days:
    """A calendar the test turns (the period ends at local midnight)."""

    def __init__(self) -> None:
        self.day = "2026-12-07"

    def __call__(self) -> str:
        return self.day


def config(tmp_path: Path, **quota: object) -> Config:
    lines = "".join(f"{key}={value}\n" for key, value in quota.items())
    return load_config(minimal_with(tmp_path, "[smtpgw.quota]\n" + lines))


def addresses(first: int, last: int) -> list[str]:
    return [f"u{n}@example.test" for n in range(first, last + 1)]


def test_defaults_count_nothing_and_never_refuse(tmp_path):
    cfg = config(tmp_path)
    assert (cfg.quota.MaximalProtectedRecipients, cfg.quota.MaximalDailyTraffic) == (0, 0)
    assert (cfg.quota.WarningThreshold, cfg.quota.QuotaAction) == (80, "notify")
    quota = Quota(str(tmp_path))
    assert quota.count(cfg, addresses(1, 50), 10 * MB) == []
    assert quota.recipients == set() and quota.bytes == 10 * MB
    assert quota.refuse_recipient(cfg, "u99@example.test", "127.0.0.1") is None
    assert quota.refuse_message(cfg, 1, "127.0.0.1") is None


def test_thresholds_once_per_day_and_the_set_stays_bounded(tmp_path):
    cfg = config(tmp_path, MaximalProtectedRecipients=10, WarningThreshold=50)
    days = Days()
    quota = Quota(str(tmp_path), days)
    assert quota.count(cfg, addresses(1, 4) + ["x@other.test"], 0) == []
    [warning] = quota.count(cfg, addresses(5, 5), 0)
    assert (warning.quota, warning.threshold, warning.used, warning.limit) == ("recipients", 50, 5, 10)
    assert quota.count(cfg, addresses(1, 9), 0) == []
    [reached] = quota.count(cfg, addresses(10, 1000), 0)  # both thresholds at once: the highest
    assert (reached.threshold, reached.used) == (100, 11)
    assert len(quota.recipients) == 10 and quota.over
    assert quota.count(cfg, addresses(2000, 2001), 0) == []
    days.day = "2026-12-08"  # midnight: counting starts again, and so do the notices
    assert quota.count(cfg, addresses(1, 4), 0) == [] and len(quota.recipients) == 4
    assert [c.threshold for c in quota.count(cfg, addresses(5, 5), 0)] == [50]


def test_traffic_warning_and_defer(tmp_path):
    cfg = config(tmp_path, MaximalDailyTraffic=2, QuotaAction="defer", MaximalProtectedRecipients=1)
    quota = Quota(str(tmp_path))
    crossings = quota.count(cfg, ["u1@example.test"], int(1.7 * MB))
    assert [(c.quota, c.threshold) for c in crossings] == [("recipients", 100), ("traffic", 80)]
    assert quota.refuse_message(cfg, 100, "127.0.0.1") is None
    assert quota.refuse_recipient(cfg, "U1@example.test", "127.0.0.1") is None  # seen today
    assert quota.refuse_recipient(cfg, "x@other.test", "127.0.0.1") is None  # not protected
    assert quota.refuse_recipient(cfg, "Postmaster@example.test", "127.0.0.1") is None
    refusal = quota.refuse_recipient(cfg, "u2@example.test", "127.0.0.1")
    assert refusal is not None and (refusal.code, refusal.status) == (452, "4.5.3")
    assert [(c.quota, c.threshold) for c in quota.count(cfg, [], MB)] == [("traffic", 100)]
    refusal = quota.refuse_message(cfg, 100, "127.0.0.1")
    assert refusal is not None and (refusal.code, refusal.status) == (451, "4.7.1")


def test_defer_counts_the_new_recipients_of_the_transaction(tmp_path):
    cfg = config(tmp_path, MaximalProtectedRecipients=3, QuotaAction="defer")
    quota = Quota(str(tmp_path))
    quota.count(cfg, addresses(1, 1), 0)
    accepted = ["u1@example.test", "u2@example.test", "x@other.test", "U3@example.test"]
    assert quota.refuse_recipient(cfg, "u2@example.test", "127.0.0.1", accepted[:2]) is None  # the same again
    assert quota.refuse_recipient(cfg, "u3@example.test", "127.0.0.1", accepted[:3]) is None
    assert quota.refuse_recipient(cfg, "u4@example.test", "127.0.0.1", accepted) is not None
    assert quota.refuse_recipient(cfg, "u4@example.test", "127.0.0.1", accepted[:3]) is None


def test_the_counts_survive_a_restart_within_the_day(tmp_path):
    cfg = config(tmp_path, MaximalProtectedRecipients=3)
    days = Days()
    quota = Quota(str(tmp_path), days)
    quota.count(cfg, addresses(1, 3), 5000)
    quota.save()
    assert quota.snapshot() is None  # nothing changed since
    again = Quota(str(tmp_path), days)
    again.restore(3)
    assert (again.recipients, again.bytes, again.notified) == (set(addresses(1, 3)), 5000, {"recipients:80", "recipients:100"})
    smaller = Quota(str(tmp_path), days)
    smaller.restore(2)  # a lower limit after the restart: the set is cut, "over" remembered
    assert len(smaller.recipients) == 2 and smaller.over
    days.day = "2026-12-08"
    tomorrow = Quota(str(tmp_path), days)
    tomorrow.restore(3)
    assert tomorrow.recipients == set() and tomorrow.bytes == 0


def test_an_older_snapshot_never_overwrites_a_newer_one(tmp_path):
    cfg = config(tmp_path, MaximalProtectedRecipients=3)
    quota = Quota(str(tmp_path))
    quota.count(cfg, addresses(1, 1), 0)
    older = quota.snapshot()
    quota.count(cfg, addresses(2, 2), 0)
    newer = quota.snapshot()
    assert older is not None and newer is not None
    quota.write(newer)
    quota.write(older)
    assert json.loads(Path(quota.path).read_text())["recipients"] == addresses(1, 2)


@pytest.mark.parametrize("text", [b"{not json", b"[]", b'{"day": "2026-12-07", "bytes": "many"}'])
def test_an_unreadable_state_starts_from_zero(tmp_path, text):
    Path(tmp_path, "quota.state").write_bytes(text)
    quota = Quota(str(tmp_path), Days())
    quota.restore(10)
    assert (quota.recipients, quota.bytes) == (set(), 0)


def test_the_notice_is_a_well_formed_message(tmp_path):
    cfg = config(tmp_path, MaximalDailyTraffic=1)
    quota = Quota(str(tmp_path))
    [crossing] = quota.count(cfg, [], 2 * MB)
    parsed = email.message_from_bytes(notice(cfg, crossing, 0.0))
    assert (parsed["From"], parsed["To"]) == ("gateway@example.test", "admin@example.test")
    assert parsed["Subject"] == "Quota reached: mail traffic at 100% of the daily limit"
    assert "Used:       2.0 MB of 1.0 MB" in parsed.get_payload()
