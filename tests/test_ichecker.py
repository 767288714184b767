"""iChecker with a real clamd: identical clean objects are not scanned again; nothing else is cached."""

from __future__ import annotations

from smtpgw.scan.clamd import ClamdPool
from smtpgw.scan.ichecker import IChecker
from tests.support.clamd import eicar


def test_clean_objects_are_remembered_across_workers(clamd, tmp_path):
    db = str(tmp_path / "ichecker.db")
    first = IChecker(ClamdPool([clamd.unix_address]), db)
    assert first.scan(b"harmless text" * 100).status == "clean"
    assert first.scan(b"harmless text" * 100).server == "ichecker" and first.hits == 1
    second = IChecker(ClamdPool([clamd.unix_address]), db)  # another worker, the same file
    assert second.scan(b"harmless text" * 100).server == "ichecker"
    assert second.scan(eicar()).status == "infected"
    assert second.scan(eicar()).status == "infected" and second.hits == 1  # never cached


def test_new_databases_empty_the_cache(clamd):
    checker = IChecker(ClamdPool([clamd.unix_address]))
    checker.scan(b"some object")
    checker._generation = "an older database"  # as if clamd had loaded new databases since
    checker._checked = 0.0
    assert checker.scan(b"some object").server != "ichecker"


def test_the_cache_holds_at_most_its_size_in_memory_and_in_the_file(clamd, tmp_path, monkeypatch):
    import sqlite3

    from smtpgw.scan import ichecker

    monkeypatch.setattr(ichecker, "PRUNE_EVERY", 5)
    db = str(tmp_path / "ichecker.db")
    checker = IChecker(ClamdPool([clamd.unix_address]), db, size=3)
    for n in range(10):
        assert checker.scan(f"object {n}".encode()).status == "clean"
    assert len(checker.memory) == 3
    rows = sqlite3.connect(db).execute("SELECT COUNT(*) FROM clean").fetchone()[0]
    assert rows == 3  # trimmed at the fifth and the tenth
    assert checker.scan(b"object 9").server == "ichecker"  # the most recent stay
    assert checker.scan(b"object 0").server != "ichecker"  # the oldest went


def test_entries_of_older_databases_leave_the_file(clamd, tmp_path):
    import sqlite3

    db = str(tmp_path / "ichecker.db")
    checker = IChecker(ClamdPool([clamd.unix_address]), db)
    checker.db.execute("INSERT INTO clean VALUES (?, ?, ?)", (b"d" * 32, "an older database", 0.0))
    checker._generation = "an older database"  # as if clamd had loaded new databases since
    checker._checked = 0.0
    checker.scan(b"another object")
    generations = {row[0] for row in sqlite3.connect(db).execute("SELECT generation FROM clean")}
    assert generations == {checker._generation} != {"an older database"}
