"""The console's traffic history: per-minute and per-hour rings, their file."""

from __future__ import annotations

from smtpgw.console.history import HOURS, MINUTES, History

T0 = 1_800_000_000.0  # a minute boundary


def test_counts_are_what_the_counters_grew_by_in_each_minute_and_hour():
    history = History()
    history.sample({"mta_received_messages": 3, "antispam_status_spam": 1, "antispam_status_probable_spam": 1}, T0)
    history.sample({"mta_received_messages": 5, "antispam_status_spam": 1, "antispam_status_probable_spam": 1}, T0 + 60)
    minutes = history.series(False, T0 + 60)
    assert minutes["received"][-2:] == [3, 2] and minutes["spam"][-2:] == [2, 0] and len(minutes["received"]) == MINUTES
    hours = history.series(True, T0 + 60)
    assert sum(hours["received"]) == 5 and len(hours["received"]) == HOURS


def test_a_counter_that_starts_again_at_zero_never_counts_negative():
    history = History()
    history.sample({"mta_sent_messages": 7}, T0)
    history.last = [9] * len(history.last)  # as if the counters had been higher before
    history.sample({"mta_sent_messages": 2}, T0 + 1)
    assert history.series(False, T0 + 1)["delivered"][-1] == 7


def test_the_rings_keep_only_their_window():
    history = History()
    for minute in range(MINUTES + 10):
        history.sample({"mta_received_messages": minute + 1}, T0 + minute * 60)
    assert len(history.minutes) == MINUTES
    assert sum(history.series(False, T0 + (MINUTES + 9) * 60)["received"]) == MINUTES


def test_the_file_round_trips_and_a_damaged_one_starts_afresh(tmp_path):
    history = History()
    history.sample({"antiviral_status_infected": 4}, T0)
    path = str(tmp_path / "h")
    history.save(path)
    assert History.load(path).series(False, T0)["viruses"][-1] == 4
    (tmp_path / "h").write_text('{"series": ["received", "delivered", "refused", "spam", "viruses"], '
                                '"minutes": {"1": [1, -2, 0, 0, 0]}, "hours": {}}')
    assert History.load(path).minutes == {}
    (tmp_path / "h").write_bytes(b"\xff not json")
    assert History.load(path).minutes == {}
    assert History.load(str(tmp_path / "missing")).minutes == {}
