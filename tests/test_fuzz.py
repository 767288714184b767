"""The fuzz harness's short, fixed slice: the torture set and mutations of it through every target.

``bench/fuzz.py`` runs the same mutators for as long as it is given; this slice is the part every
change must pass: no input may crash a target, break what it promises, take more than the time
bound or raise RSS past the memory bound.
"""

from __future__ import annotations

import os

import pytest

from tests.support import fuzz

TORTURE = os.path.join(fuzz.CORPUS, "mime-torture")


def torture_seeds() -> list[bytes]:
    if not os.path.isdir(TORTURE):
        pytest.skip(f"{TORTURE} is not here")
    return fuzz.load_seeds(TORTURE)


def test_mutated_torture_set_through_every_target(tmp_path) -> None:  # type: ignore[no-untyped-def]
    fuzzer = fuzz.Fuzzer(torture_seeds(), seed=20261207, findings_dir=str(tmp_path), time_limit=10.0,
                         rss_limit_mb=256, cap=64 << 10)
    fuzzer.run(count=len(fuzzer.seeds) + 80)
    report = fuzzer.report()
    assert not fuzzer.findings, report
    for name in fuzz.TARGETS:
        assert fuzzer.figures[name].inputs == len(fuzzer.seeds) + 80, report
    assert len(fuzzer.figures["mime"].outcomes) > 10, report  # the mutations reach varied structures


def test_same_seed_same_inputs() -> None:
    seeds = fuzz.built_seeds()
    first = fuzz.Fuzzer(seeds, seed=7, findings_dir=None).inputs()
    second = fuzz.Fuzzer(seeds, seed=7, findings_dir=None).inputs()
    assert [next(first) for _ in range(60)] == [next(second) for _ in range(60)]


def test_a_bound_exceeded_is_a_finding_with_its_input(tmp_path) -> None:  # type: ignore[no-untyped-def]
    big = b"Subject: big\n\n" + b"A" * (8 << 20)
    fuzzer = fuzz.Fuzzer([big], seed=1, findings_dir=str(tmp_path), time_limit=0.001, cap=16 << 20)
    fuzzer.run(count=1, targets=("mime",))
    assert [f.kind for f in fuzzer.findings] == ["timeout"]
    with open(fuzzer.findings[0].path, "rb") as f:
        assert f.read() == big
    huge = b"Subject: huge\n\n" + b"A" * (16 << 20)  # decomposition copies the body: past the child's start-up peak
    fuzzer = fuzz.Fuzzer([huge], seed=1, findings_dir=str(tmp_path), time_limit=60.0, rss_limit_mb=1, cap=32 << 20)
    fuzzer.run(count=1, targets=("mime",))
    assert [f.kind for f in fuzzer.findings] == ["memory"]


def test_coverage_counts_line_pairs_of_smtpgw() -> None:
    fuzzer = fuzz.Fuzzer(fuzz.built_seeds(), seed=1, findings_dir=None, coverage=True)
    fuzzer.run(count=3, targets=("mime",))
    assert fuzzer.edges and all(name.endswith(".py") for name, _, _ in fuzzer.edges)
    assert any(name == "mail/mime.py" for name, _, _ in fuzzer.edges)
