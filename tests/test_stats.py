"""Statistics that survive restarts: StatFilename read back, and the daily history (smtpgw.stats)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from smtpgw.stats import HISTORY_DAYS, Stats, format_history, read_history, save


def counted(stats: Stats) -> Stats:
    stats.inc("mta_received_messages", 3)
    stats.inc("mta_received_bytes", 3000)
    stats.inc("mta_sent_messages", 2)
    stats.inc("antispam_status_spam")
    stats.inc("antispam_status_probable_spam", 2)
    stats.inc("antispam_status_not_detected", 5)
    stats.inc("antiviral_status_infected")
    stats.inc("mta_blocked_messages", 2)
    stats.inc("mta_incoming_connections_current", 4)
    return stats


def saved(stats: Stats, tmp_path: Path) -> tuple[str, str]:
    files = str(tmp_path / "stats"), str(tmp_path / "stats.history")
    save(*files, stats.snapshot())
    return files


def test_counters_and_todays_line_go_on_after_a_restart(tmp_path: Path) -> None:
    first = counted(Stats())
    first.started = 1_700_000_000
    files = saved(first, tmp_path)
    today = date.today().isoformat()
    assert read_history(files[1]) == [f"{today} received=3 delivered=2 viruses=1 blocked=2 refused=0 bytes=3000 "
                                      "spam_probable_spam=2 spam_spam=1"]
    second = Stats()
    second.restore(*files)
    assert second.counters["mta_received_messages"] == 3 and second.started == 1_700_000_000
    assert second.counters["mta_incoming_connections_current"] == 0  # a gauge starts afresh
    second.inc("mta_received_messages")
    second.inc("antispam_status_spam")
    save(*files, second.snapshot())
    assert read_history(files[1]) == [f"{today} received=4 delivered=2 viruses=1 blocked=2 refused=0 bytes=3000 "
                                      "spam_probable_spam=2 spam_spam=2"]
    assert "mta_received_messages=4\n" in Path(files[0]).read_text()


def test_a_new_day_closes_the_last_one_and_a_year_is_kept(tmp_path: Path) -> None:
    history = tmp_path / "stats.history"
    history.write_text("".join(f"2020-01-01 received={n}\n" for n in range(HISTORY_DAYS + 10)) + "garbage\n")
    stats = Stats()
    stats.restore(str(tmp_path / "stats"), str(history))
    stats.day = "2020-01-02"  # the day the gateway last counted in
    stats.inc("mta_received_messages", 7)
    files = saved(stats, tmp_path)
    lines = read_history(files[1])
    assert len(lines) == HISTORY_DAYS
    assert lines[-2].startswith("2020-01-02 received=7 ")
    assert lines[-1].startswith(f"{date.today().isoformat()} received=0 ")
    assert format_history(lines, 2) == lines[-2] + "\n" + lines[-1] + "\n"
