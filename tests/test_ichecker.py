"""iChecker with a real clamd: identical clean objects are not scanned again; nothing else is cached."""

from __future__ import annotations

from smtpgw.av import ClamdPool
from smtpgw.ichecker import IChecker
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
