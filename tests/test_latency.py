"""Latency histograms: Prometheus bucket semantics (le: less than or equal)."""

from smtpgw.latency import BUCKETS, Histogram


def test_an_observation_counts_in_the_first_bucket_it_does_not_exceed_and_all_after():
    histogram = Histogram()
    for seconds in (0.005, 0.0051, 7.0, 10 ** 6, -1.0):
        histogram.observe(seconds)
    cumulative = dict(histogram.cumulative())
    assert cumulative["0.005"] == 2  # 0.005 itself and the negative one (clock step) as 0
    assert cumulative["0.01"] == 3 and cumulative["5"] == 3 and cumulative["10"] == 4
    assert cumulative["86400"] == 4 and cumulative["+Inf"] == 5
    assert len(cumulative) == len(BUCKETS) + 1 and histogram.total == 0.005 + 0.0051 + 7.0 + 10 ** 6
