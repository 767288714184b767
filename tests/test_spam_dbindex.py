"""The mapped index of the spam database: the same scores as the loaded database, rebuilt when
the database changes or the index is damaged, never trusted when it does not check."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from types import SimpleNamespace
from typing import Callable

import pytest

from smtpgw.spam import dbindex, spamfilter
from smtpgw.spam.database import DatabaseError, DatabaseInfo, SpamDatabase, database_file, site_file
from smtpgw.spam.rules import RuleSet
from smtpgw.spam.spamfilter import SpamFilter, default_bases
from smtpgw.spam.training import learn_files
from tests.support.components import missing
from tests.test_spam_filter import CORPUS, HAM, SPAM

SHIPPED = database_file(default_bases())
SAMPLE_EVERY = 40  # one corpus message in 40: about 250 of them, from every set


@pytest.fixture
def logs(caplog, monkeypatch):  # type: ignore[no-untyped-def]
    """caplog, with the gateway's loggers reaching it (smtpgw.log.setup may have closed them)."""
    monkeypatch.setattr(logging.getLogger("smtpgw"), "propagate", True)
    return caplog


def corpus_sample() -> list[bytes]:
    if not os.path.isdir(CORPUS):
        missing(f"corpus not found at {CORPUS}")
    paths = sorted(os.path.join(folder, name) for folder, _dirs, names in os.walk(CORPUS) for name in names)
    out = []
    for path in paths[::SAMPLE_EVERY]:
        with open(path, "rb") as src:
            out.append(src.read())
    return out


def loaded_filter(bases: str | None) -> SpamFilter:
    """A filter that holds the database loaded whole, as before the index (the reference)."""
    reference = SpamFilter(SimpleNamespace(SpamDetection="standard"), bases)
    database = SpamDatabase.load(reference.path)
    reference._loaded = (database, RuleSet(database.rules))
    return reference


def verdicts(spam_filter: SpamFilter, messages: list[bytes]) -> list[object]:
    return [spam_filter.classify(raw, "192.0.2.1", "sender@example.com", ["rcpt@example.org"], []) for raw in messages]


def small_database(path: str, weight: float = 0.25) -> SpamDatabase:
    database = SpamDatabase.empty(info=DatabaseInfo(version="1.0", date="2024-01-01"))
    database.bayes.counts.update({"viagra": (0, 40), "meeting": (30, 1), "lunch": (9, 0), "free": (5, 30),
                                  "grüße": (3, 0), "url:example.com": (2, 2)})
    database.bayes.nham, database.bayes.nspam = 40, 45
    database.terms.weights.update({"viagra": 1.5, "meeting": -weight, "free": 0.3333})
    database.terms.bias = -0.1
    database.save(path)
    return database


def test_mapped_scores_equal_the_loaded_database_on_the_corpus() -> None:
    messages = corpus_sample() + [HAM, SPAM]
    mapped = SpamFilter(SimpleNamespace(SpamDetection="standard"), None)
    assert isinstance(mapped.database.bayes, dbindex.MappedBayes)
    assert verdicts(mapped, messages) == verdicts(loaded_filter(None), messages)


def test_the_site_layer_still_adds_to_the_mapped_database(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bases = tmp_path / "bases"
    bases.mkdir()
    shutil.copy(SHIPPED, bases / "spam.db")
    (tmp_path / "spam.mbox").write_bytes(b"From x\n" + SPAM.replace(b"\r\n", b"\n"))
    learn_files(str(bases), [str(tmp_path / "spam.mbox")], True)
    assert os.path.exists(site_file(str(bases)))
    messages = [HAM, SPAM, SPAM.replace(b"Viagra", b"Cialis")]
    mapped = SpamFilter(SimpleNamespace(SpamDetection="standard"), str(bases))
    assert mapped.site.current() is not None
    assert verdicts(mapped, messages) == verdicts(loaded_filter(str(bases)), messages)


def test_lookups_match_the_dicts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "spam.db")
    loaded = small_database(path)
    mapped = dbindex.open_database(path)
    assert dict(mapped.bayes.counts) == loaded.bayes.counts
    assert dict(mapped.terms.weights) == loaded.terms.weights
    assert len(mapped.bayes.counts) == 6 and len(mapped.terms.weights) == 3
    assert mapped.bayes.counts.get("nothing") is None and mapped.terms.weights.get("lunch") is None
    assert mapped.bayes.probability("viagra") == loaded.bayes.probability("viagra")
    tokens = {"viagra", "grüße", "lunch", "free", "unknown", "\udcff-lone-surrogate"}
    assert mapped.bayes.score(tokens) == loaded.bayes.score(tokens)
    assert mapped.terms.score(tokens) == loaded.terms.score(tokens)
    assert mapped.to_bytes() == loaded.to_bytes()  # what load() gives, byte for byte
    with pytest.raises(TypeError):
        mapped.bayes.learn(["viagra"], True)


def test_a_token_of_more_than_255_bytes_is_found_as_in_the_dicts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Key lengths of 63 bytes and more follow the tag: the lookup reads them entry by entry."""
    path = str(tmp_path / "spam.db")
    long_token = "\U0001f600" * 64  # 256 bytes of UTF-8
    write_edited(path, small_database(path), "lunch\t9\t0", f"{long_token}\t9\t0")
    mapped = dbindex.open_database(path)
    tokens = {long_token, "viagra", "meeting", "\U0001f600" * 63, "unknown"}
    assert mapped.bayes.score(tokens) == SpamDatabase.load(path).bayes.score(tokens)
    assert dict(mapped.bayes.counts) == SpamDatabase.load(path).bayes.counts


def test_entries_of_every_shape_are_found_as_in_the_dicts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Narrow and wide counts, with and without a weight, keys on both sides of the tag's 63 bytes,
    all in one small table (8 buckets: several entries of each shape share one)."""
    path = str(tmp_path / "spam.db")
    database = SpamDatabase.empty(info=DatabaseInfo(version="1.0", date="2024-01-01"))
    counts = {}
    for length in (1, 2, 61, 62, 63, 64, 65, 300):
        for ham, spam in ((0, 1), (255, 255), (256, 0), (3, 70_000), (2**31 - 1, 7)):
            counts[f"{length}:{ham}:{spam}:".ljust(length, "x")] = (ham, spam)
    database.bayes.counts.update(counts)
    database.bayes.nham, database.bayes.nspam = 40, 45
    database.terms.weights.update({token: 0.0125 * (i % 3 - 1) for i, token in enumerate(counts) if i % 3 != 1})
    database.save(path)
    loaded = SpamDatabase.load(path)
    mapped = dbindex.open_database(path)
    assert dict(mapped.bayes.counts) == loaded.bayes.counts == counts
    assert dict(mapped.terms.weights) == loaded.terms.weights
    probes = set(counts) | {token[:-1] for token in counts} | {token + "x" for token in counts}
    assert mapped.bayes.index._find(probes) == {
        token: (*counts[token], loaded.terms.weights.get(token, 0.0)) for token in counts}


def test_weights_that_are_not_four_decimals_are_kept_exactly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "spam.db")
    write_edited(path, small_database(path), "meeting\t30\t1\t-0.25", "meeting\t30\t1\t-0.123456789")
    mapped = dbindex.open_database(path)
    assert mapped.terms.weights.get("meeting") == -0.123456789
    assert dict(mapped.terms.weights) == SpamDatabase.load(path).terms.weights


def write_edited(path: str, database: SpamDatabase, old: str, new: str) -> None:
    """``database`` written to ``path`` with one line edited, under a checksum that matches."""
    body = database.to_bytes().decode().replace(old, new).rsplit("end\t", 1)[0].encode()
    with open(path, "wb") as out:
        out.write(body + b"end\t" + hashlib.sha256(body).hexdigest().encode() + b"\n")


def test_a_new_database_gets_a_new_index(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "spam.db")
    small_database(path)
    assert dbindex.open_database(path).terms.weights.get("meeting") == -0.25
    first = os.stat(dbindex.index_file(path))
    small_database(path, weight=0.5)  # as keepup2date installs one: a new file under the name
    assert dbindex.open_database(path).terms.weights.get("meeting") == -0.5
    assert os.stat(dbindex.index_file(path)).st_ino != first.st_ino


def edited_index(path: str, edit: Callable[[bytearray], bytearray]) -> str:
    """The index of ``small_database`` at ``path`` rewritten as ``edit`` makes it; its name."""
    small_database(path)
    dbindex.open_database(path)
    index = dbindex.index_file(path)
    with open(index, "r+b") as f:
        data = edit(bytearray(f.read()))
        f.seek(0)
        f.truncate()
        f.write(data)
    return index


def damaged(data: bytearray, damage: str) -> bytearray:
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "empty":
        data = bytearray()
    else:
        data[:8] = b"NOTANIDX"
    return data


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "foreign"])
def test_a_damaged_index_is_built_again(tmp_path, logs, damage: str) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "spam.db")
    index = edited_index(path, lambda data: damaged(data, damage))
    with logs.at_level(logging.WARNING, logger="smtpgw.spam.dbindex"):
        mapped = dbindex.open_database(path)
    assert mapped.bayes.counts.get("viagra") == (0, 40)
    assert any("built again" in r.getMessage() for r in logs.records)
    with open(index, "rb") as f:
        fd = f.fileno()
        assert dbindex._check(fd, dbindex._source_of(path)) is None  # written anew, whole


def test_an_index_of_an_older_format_is_built_again_without_a_warning(tmp_path, logs) -> None:  # type: ignore[no-untyped-def]
    """As after an upgrade: format 1 had fixed-width entries; its header and checksum still hold."""
    def older(data: bytearray) -> bytearray:
        data[8:12] = (dbindex.FORMAT - 1).to_bytes(4, "little")
        data[-dbindex.TRAILER:] = hashlib.sha256(data[:-dbindex.TRAILER]).digest()
        return data

    path = str(tmp_path / "spam.db")
    index = edited_index(path, older)
    with logs.at_level(logging.INFO, logger="smtpgw.spam.dbindex"):
        mapped = dbindex.open_database(path)
    assert mapped.bayes.counts.get("viagra") == (0, 40)
    assert [(r.levelno, r.getMessage()) for r in logs.records if "built again" in r.getMessage()] == [
        (logging.INFO, f"spam database index {index} is of an older format: built again")]


def test_an_index_that_cannot_be_written_stays_in_memory(tmp_path, logs) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "spam.db")
    small_database(path)
    os.mkdir(dbindex.index_file(path))  # in the way of the rename, whoever runs this
    with logs.at_level(logging.WARNING, logger="smtpgw.spam.dbindex"):
        mapped = dbindex.open_database(path)
    assert mapped.bayes.counts.get("lunch") == (9, 0)
    assert isinstance(mapped.bayes.index.image, bytes)
    assert any("keeps its own copy" in r.getMessage() for r in logs.records)


def test_a_damaged_database_is_refused_even_with_an_index(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "spam.db")
    small_database(path)
    dbindex.open_database(path)
    with open(path, "r+b") as f:
        f.seek(40)
        f.write(b"X")  # the checksum line is left as it was
    with pytest.raises(DatabaseError, match="checksum mismatch"):
        dbindex.open_database(path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 5)
    with pytest.raises(DatabaseError, match="truncated"):
        dbindex.open_database(path)


@pytest.mark.parametrize("line", ["viagra\t-1\t40\t1.5", "viagra\t0\t+4\t1.5", "viagra\t0\t٣\t1.5", "viagra\t0\t40"])
def test_bad_count_fields_are_refused_by_both_readers(tmp_path, line: str) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "spam.db")
    write_edited(path, small_database(path), "viagra\t0\t40\t1.5", line)
    with pytest.raises(DatabaseError, match="bad token line"):
        SpamDatabase.load(path)
    with pytest.raises(DatabaseError, match="bad token line"):
        dbindex.open_database(path)


def test_the_shared_copy_is_the_mapped_one_and_reload_keeps_it_on_failure(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bases = tmp_path / "bases"
    bases.mkdir()
    path = str(bases / "spam.db")
    small_database(path)
    spam_filter = SpamFilter(SimpleNamespace(SpamDetection="standard"), str(bases))
    assert isinstance(spam_filter.database.terms, dbindex.MappedTerms)
    assert spamfilter.load_shared(path)[0] is spam_filter.database  # one copy per process
    with open(path, "ab") as out:
        out.write(b"junk\n")
    assert not spam_filter.reload()
    assert spam_filter.database.bayes.counts.get("viagra") == (0, 40)


def test_a_token_twice_is_refused_by_both_readers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "spam.db")
    write_edited(path, small_database(path), "lunch\t9\t0\t0", "viagra\t9\t0\t0")
    with pytest.raises(DatabaseError, match="duplicate"):
        SpamDatabase.load(path)
    with pytest.raises(DatabaseError, match="duplicate"):
        dbindex.open_database(path)
