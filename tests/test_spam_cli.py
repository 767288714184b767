"""`spam train / classify / learn / info` round trip on a small temporary corpus."""

from __future__ import annotations

import os

import pytest

from smtpgw.spam.cli import main
from smtpgw.spam.database import SpamDatabase
from smtpgw.spam.training import message_tokens

HAM_WORDS = ["meeting", "agenda", "minutes", "project", "review", "schedule", "notes", "budget"]
SPAM_WORDS = ["winner", "casino", "pills", "discount", "lottery", "bonus", "jackpot", "offer"]


def _message(index: int, words: list[str], sender: str) -> bytes:
    body = " ".join(words[(index + k) % len(words)] for k in range(6))
    return (f"From: {sender}\nTo: you@example.org\nSubject: {words[index % len(words)]} {index}\n"
            f"Date: Mon, 01 Jan 2024 10:00:00 +0000\nMessage-ID: <{index}.{sender}>\n\n{body}\n").encode()


@pytest.fixture()
def corpus(tmp_path):  # type: ignore[no-untyped-def]
    ham = tmp_path / "ham"
    (ham / "cur").mkdir(parents=True)
    (ham / "new").mkdir()
    for i in range(12):  # a Maildir
        (ham / ("cur" if i % 2 else "new") / f"{i}.msg").write_bytes(_message(i, HAM_WORDS, "colleague@example.net"))
    mbox = bytearray()
    for i in range(12):  # an mbox, with a quoted ">From " body line
        mbox += b"From spammer@example.com Mon Jan  1 10:00:00 2024\n" + _message(i, SPAM_WORDS, "promo@example.com")
        mbox += b">From the desk of the director\n\n"
    (tmp_path / "spam.mbox").write_bytes(bytes(mbox))
    return tmp_path


def test_train_classify_learn_round_trip(corpus, capsys) -> None:  # type: ignore[no-untyped-def]
    db_dir = str(corpus / "db")
    assert main(["train", "--ham", str(corpus / "ham"), "--spam", str(corpus / "spam.mbox"), "--db", db_dir,
                 "--date", "2024-01-02"], None) == 0
    database = SpamDatabase.load(os.path.join(db_dir, "spam.db"))
    assert (database.bayes.nham, database.bayes.nspam) == (12, 12)
    assert database.info.date == "2024-01-02"
    assert "director" in database.bayes.counts  # the mbox ">From" line was unquoted and learned

    ham_file = corpus / "new_ham.eml"
    ham_file.write_bytes(_message(3, HAM_WORDS, "colleague@example.net"))
    spam_file = corpus / "new_spam.eml"
    spam_file.write_bytes(b"From spammer Mon Jan  1 10:00:00 2024\n" + _message(5, SPAM_WORDS, "promo@example.com"))
    capsys.readouterr()
    assert main(["classify", "--db", db_dir, str(ham_file), str(spam_file)], None) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    # Two dozen training messages give evidence enough for Probable Spam at least, not always for Spam.
    assert [f for f, _, _ in lines] == [str(ham_file), str(spam_file)]
    assert lines[0][1] == "Not Detected" and lines[1][1] in ("Probable Spam", "Spam")
    assert all(0.0 <= float(score) <= 1.0 for _, _, score in lines)

    assert main(["learn", "--db", db_dir, "--spam", str(ham_file)], None) == 0
    assert SpamDatabase.load(os.path.join(db_dir, "spam.db")).to_bytes() == database.to_bytes()  # only read
    site = SpamDatabase.load(str(corpus / "site-spam.db"))  # the site layer, beside the bases folder
    assert (site.bayes.nham, site.bayes.nspam) == (0, 1)
    tokens = message_tokens(ham_file.read_bytes())
    assert site.terms.score(tokens) > 0  # the term weights learned it too, as changes to the shipped ones
    assert site.terms.bias == 0.0  # but not a bias, which would move every message's score
    capsys.readouterr()
    assert main(["classify", "--db", db_dir, str(ham_file)], None) == 0
    assert float(capsys.readouterr().out.split("\t")[2]) > float(lines[0][2])
    assert main(["info", "--db", db_dir], None) == 0
    out = capsys.readouterr().out
    assert "spam\t12" in out and "term-weights\t" in out and "site-spam\t1" in out


def test_errors_are_one_line(corpus, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["classify", "--db", str(corpus / "nowhere"), str(corpus / "spam.mbox")], None) == 1
    assert main(["learn", "--db", str(corpus), "--ham", str(corpus / "missing.eml")], None) == 1
    assert main(["frobnicate"], None) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_classify_with_shipped_database(corpus, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["classify", str(corpus / "spam.mbox")], None) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 12 and out[0].startswith(str(corpus / "spam.mbox") + ":1\t")


def _learn_many(db_dir: str, message: str, times: int) -> None:
    from smtpgw.spam.training import learn_files

    for _ in range(times):
        learn_files(db_dir, [message], is_spam=True)


def test_concurrent_learners_lose_no_message(corpus) -> None:  # type: ignore[no-untyped-def]
    """Each learning reads, changes and rewrites the site layer under its fcntl lock: learners in
    several processes at once add up to every message they learned."""
    import multiprocessing

    db_dir = str(corpus / "db")
    assert main(["train", "--ham", str(corpus / "ham"), "--spam", str(corpus / "spam.mbox"), "--db", db_dir], None) == 0
    message = corpus / "one.eml"
    message.write_bytes(_message(1, SPAM_WORDS, "promo@example.com"))
    context = multiprocessing.get_context("fork")
    learners = [context.Process(target=_learn_many, args=(db_dir, str(message), 15)) for _ in range(3)]
    for learner in learners:
        learner.start()
    for learner in learners:
        learner.join(60)
        assert learner.exitcode == 0
    site = SpamDatabase.load(str(corpus / "site-spam.db"))
    assert (site.bayes.nham, site.bayes.nspam) == (0, 45)
    assert site.bayes.counts["casino"] == (0, 45)
