"""Traffic observations: histogram bucket semantics (le: less than or equal), bounded top lists."""

from smtpgw.console import traffic
from smtpgw.console.traffic import BUCKETS, Histogram, Traffic
from smtpgw.spool.queue import Envelope, Recipient


def test_an_observation_counts_in_the_first_bucket_it_does_not_exceed_and_all_after():
    histogram = Histogram()
    for seconds in (0.005, 0.0051, 7.0, 10 ** 6, -1.0):
        histogram.observe(seconds)
    cumulative = dict(histogram.cumulative())
    assert cumulative["0.005"] == 2  # 0.005 itself and the negative one (clock step) as 0
    assert cumulative["0.01"] == 3 and cumulative["5"] == 3 and cumulative["10"] == 4
    assert cumulative["86400"] == 4 and cumulative["+Inf"] == 5
    assert len(cumulative) == len(BUCKETS) + 1 and histogram.total == 0.005 + 0.0051 + 7.0 + 10 ** 6


def test_top_lists_count_recipient_domains_and_delivered_groups_and_stay_bounded(monkeypatch):
    monkeypatch.setattr(traffic, "TOP_KEEP", 4)
    observed = Traffic()
    env = Envelope(id="a", sender="s@x.test", recipients=[Recipient("a@Big.test"), Recipient("b@big.test")],
                   received_at=0.0)
    observed.received(env)
    observed.delivered(env)
    env.group = "sales"
    observed.delivered(env)
    assert observed.top()["recipient domains (received)"] == [("big.test", 2)]
    assert sorted(observed.top()["groups (delivered)"]) == [("policy", 1), ("sales", 1)]
    for index in range(10):
        observed.received(Envelope(id="b", sender="", recipients=[Recipient(f"x@d{index}.test")], received_at=0.0))
    assert len(observed.domains) <= 4 and observed.domains["big.test"] == 2


def test_a_notification_made_by_a_scan_is_not_a_scan():
    observed = Traffic()
    for qid, srcid in (("A", None), ("A-1", "A"), ("N", "A")):
        observed.scanned(Envelope(id=qid, sender="", recipients=[], srcid=srcid, received_at=0.0))
    assert sum(observed.histograms["scan"].counts) == 2
