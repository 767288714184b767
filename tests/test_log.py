"""The log's one escaping function, the event-line builder and the line format (kmg-spec §7.1)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import pytest

from smtpgw import log
from smtpgw.log import ANGLE, BARE, QUOTED, SQUARE, TEXT, escape, line

RAW_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@pytest.mark.parametrize("raw, shown", [
    ("\x1b]0;owned\x07", r"\x1b]0;owned\x07"),  # a terminal title change, BEL-terminated
    ("a\x00b\r\nc\x7f", r"a\x00b\x0d\x0ac\x7f"),
    ("\x85\x9b", r"\x85\x9b"),  # C1 controls (NEL, CSI)
    ("\u202eevil\u2028", r"\u202eevil\u2028"),  # a bidirectional override, a line separator
    ("\xa0", r"\xa0"),  # a no-break space is not shown as a space
    ("\udc9b", r"\x9b"),  # a byte that was not UTF-8 (surrogateescape) is that byte
    ("Jörg 日本", "Jörg 日本"),  # printable UTF-8 text stays readable
    ("C:\\x1b", r"C:\\x1b"),  # a backslash is doubled: an escape cannot be faked
])
def test_escape_writes_every_unprintable_character_as_an_escape(raw: str, shown: str) -> None:
    assert escape(raw, TEXT) == shown


def test_escape_takes_bytes_as_utf8_and_shows_the_rest_as_bytes() -> None:
    assert escape(b"ok \xc3\xa9 \xff\x1b", TEXT) == r"ok é \xff\x1b"


@pytest.mark.parametrize("context, raw, shown", [
    (BARE, "plain.token@x", "plain.token@x"),
    (BARE, "a, b=c", '"a, b=c"'),
    (BARE, 'say "x"', r'"say \"x\""'),
    (BARE, "<m@x>", "<m@x>"),  # brackets end no bare field
    (ANGLE, "x>,message_id=<spoofed>,flags=X", '"x>,message_id=<spoofed>,flags=X"'),
    (ANGLE, "a>b", '"a>b"'),
    (SQUARE, "1.2.3.4]x", '"1.2.3.4]x"'),
    (QUOTED, 'he said "no", then, \\', r"he said \"no\", then, \\"),
    (TEXT, 'a, b "c"', 'a, b "c"'),
])
def test_escape_quotes_a_value_that_could_end_its_field(context: str, raw: str, shown: str) -> None:
    assert escape(raw, context) == shown


def test_escape_joins_a_list_item_by_item() -> None:
    assert escape(["a@x", "b,c@y", "d\n@z"]) == r'a@x,"b,c@y",d\x0a@z'


def test_line_escapes_each_value_for_the_place_its_template_gives_it() -> None:
    text = line('RECEIVED, from=<%s>, nrcpt=%d, client=[%s], helo=<%s>, reason="%s", to=%s, pct=100%%',
                "a@b.test", 2, "127.0.0.1", "x>,message_id=<spoofed>,flags=X", 'no "quotes"\x1b', ["a", "b"])
    assert text == ('RECEIVED, from=<a@b.test>, nrcpt=2, client=[127.0.0.1], '
                    'helo=<"x>,message_id=<spoofed>,flags=X">, reason="no \\"quotes\\"\\x1b", to=a,b, pct=100%')


def test_line_writes_a_value_given_for_a_number_as_an_escaped_value() -> None:
    assert line("size=%d", "1, fake=1") == 'size="1, fake=1"'


class Text(str):
    """A str that is not exactly ``str``: ``escape`` and ``render`` take their general path for it."""


def test_a_value_written_as_it_is_is_the_value_the_general_path_writes() -> None:
    """The fast path of ``escape`` and ``render`` (a text with nothing to escape or quote is
    written as it is) gives the same bytes as the general path, in every place of a line."""
    import random

    pick = random.Random(7)
    alphabet = ["a", "Z", "0", ".", "@", "=", " ", ",", '"', "<", ">", "[", "]", "\\", "%", "\x00", "\x1b",
                "\x7f", "\x85", "\xa0", "é", "日", "\u202e", "\udc9b"]
    values = ["", "plain", "127.0.0.1", "Probable Spam", "a@b.test", "<m@x>", "x" * 300]
    values += ["".join(pick.choice(alphabet) for _ in range(pick.randrange(1, 9))) for _ in range(3000)]
    template = 'EV, a=%s, b=<%s>, c=[%s], d="%s", e=%r, n=%d'
    for value in values:
        for context in (BARE, ANGLE, SQUARE, QUOTED, TEXT):
            assert escape(value, context) == str(escape(Text(value), context)), (value, context)
        assert line(template, *[value] * 5, 1) == line(template, *[Text(value)] * 5, 1), value
        assert log.render(template, (*[value] * 5, 1), TEXT) == log.render(template, (*[Text(value)] * 5, 1), TEXT)


def fields(event_line: str) -> list[str]:
    """The names of the fields of an event line, read as a parser would: split at ``, `` outside
    a quoted string, where a backslash takes the next character as it is."""
    names, in_quotes, current, chars = [], False, "", iter(enumerate(event_line))
    for i, char in chars:
        if char == "\\":
            current += char + next(chars)[1]
            continue
        if char == '"':
            in_quotes = not in_quotes
        if char == "," and not in_quotes and event_line[i + 1 : i + 2] == " ":
            names.append(current.strip().split("=", 1)[0])
            current = ""
            continue
        current += char
    names.append(current.strip().split("=", 1)[0])
    return names


def test_no_value_adds_a_field() -> None:
    hostile = ["x>, flags=ED", 'a", b="c', "a]\r\n[2024-01-01 00:00:00 I] X: DELIVERED",
               '\\", z=1', "end\\", 'x\\", y="']
    for value in hostile:
        built = line('EV, a=<%s>, b=[%s], c="%s", d=%s', value, value, value, value)
        assert fields(built) == ["EV", "a", "b", "c", "d"], built
        assert not RAW_CONTROL.search(built)


@pytest.fixture
def log_file(tmp_path) -> Iterator[str]:
    path = str(tmp_path / "smtpgw.log")
    log.setup(path, "debug")
    yield path
    log.setup(None, "info")


def written(path: str) -> list[str]:
    log.flush_all()
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def test_free_text_arguments_are_escaped_numbers_kept(log_file: str) -> None:
    logging.getLogger("smtpgw.deliver.client").info("next hop %s said %s (%d tries, %.1f s)", "[127.0.0.1]",
                                            "550 no\x1b[2J\r\nfake line", 3, 1.25)
    [text] = written(log_file)
    assert text.endswith(r"]: next hop [127.0.0.1] said 550 no\x1b[2J\x0d\x0afake line (3 tries, 1.2 s)")


def test_free_text_without_arguments_and_tracebacks_are_escaped(log_file: str) -> None:
    logger = logging.getLogger("smtpgw.receive.receiver")
    logger.warning("peer wrote \x07")
    try:
        raise ValueError("bad \x1b byte")
    except ValueError:
        logger.exception("failed %s", "\x00")
    lines = written(log_file)
    assert len(lines) == 2
    assert lines[0].endswith(r"peer wrote \x07")
    assert r"failed \x00 | Traceback" in lines[1] and r"ValueError: bad \x1b byte" in lines[1]
    assert not any(RAW_CONTROL.search(text) for text in lines)


def test_an_event_line_is_written_once_escaped(log_file: str) -> None:
    log.event("ABC\x1b", 'RELEASED, from=<%s>, reason="%s"', "a\\b@x", "q\"\x07")
    [text] = written(log_file)
    assert re.fullmatch(r'\[[-0-9 :]+ I\] ABC\\x1b: RELEASED, from=<a\\\\b@x>, reason="q\\"\\x07"', text), text


def test_an_event_line_is_the_same_written_directly_or_through_the_logging_machinery(log_file: str) -> None:
    """``event`` writes straight into the log file's batch when nothing else can see the line; a
    filter on the events logger sends it through ``logging`` as before: the same text, the same
    order, and an error written at once either way."""
    args = ("ABC\x1b", 'SENT, to=<%s>, relay=%s, reason="%s", size=%d', "a b@x", "[127.0.0.1]:25", "q\"\\", 4096)
    log.event(*args)
    log.events.addFilter(lambda record: True)
    try:
        log.event(*args)
        log.event("E1", "FAILED, why=%s", "disk", level=logging.ERROR)
        through_logging = open(log_file, encoding="utf-8").read().splitlines()  # the error flushed the batch
    finally:
        log.events.filters.clear()
    log.event("E2", "FAILED, why=%s", "disk", level=logging.ERROR)
    direct, logged, error = through_logging
    assert direct.split("] ", 1)[1] == logged.split("] ", 1)[1] == (
        'ABC\\x1b: SENT, to=<"a b@x">, relay=[127.0.0.1]:25, reason="q\\"\\\\", size=4096')
    assert re.fullmatch(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d I\]", direct.split(" ABC")[0])
    assert re.fullmatch(r"\[[-0-9 :]+ E\] E1: FAILED, why=disk", error)
    assert open(log_file, encoding="utf-8").read().splitlines()[3].endswith("] E2: FAILED, why=disk")


def test_free_text_values_in_brackets_or_quotes_are_escaped_for_that_place(log_file: str) -> None:
    logger = logging.getLogger("smtpgw.receive.receiver")
    logger.info('relay denied: client=[%s] rcpt=<%s> said "%s" %r', "127.0.0.1", '"a> rule=allow"@x',
                'q"uote', "r\x07")
    logger.info("mapping %(who)s <%(addr)s>", {"who": "a b", "addr": "x>y"})
    logger.info("too few %s %s", "one")
    lines = written(log_file)
    assert lines[0].endswith(r'relay denied: client=[127.0.0.1] rcpt=<"\"a> rule=allow\"@x"> said "q\"uote" '
                             r"'r\\x07'"), lines[0]
    assert lines[1].endswith('mapping a b <"x>y">'), lines[1]
    assert lines[2].endswith("too few %s %s ('one',)"), lines[2]
