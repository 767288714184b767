"""Formal (structural) signs of spam in a message's headers and layout.

Owns: the named built-in checks that the rules database refers to as
``check NAME`` — the header "formal signs" of the reference's header analysis
(missing To or From, random-looking addresses, an empty X-Mailer, a Subject
padded with spaces and a random tail, Asian character sets) and layout signs
(HTML-only mail, hidden text, links to numeric hosts), a Date field that is no
RFC 5322 date-time (``malformed_date``), plus the GTUBE test pattern.

Must never: look anything up on the network, raise on odd input, or hold the
GTUBE string whole in this file (it is assembled from pieces at import time so
that a scanner reading the source does not flag it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from email.utils import getaddresses, parseaddr
from functools import lru_cache
from urllib.parse import urlsplit

from smtpgw.spam.mailview import MailView

# GTUBE, the Generic Test for Unsolicited Bulk Email (SpamAssassin's test string).
GTUBE = "".join(
    ("XJS*C4JDBQADN1.NSBN3*2IDNEN*", "GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL", "*C.34X")
)

ASIAN_CHARSETS = frozenset({
    "gb2312", "gbk", "gb18030", "hz-gb-2312", "big5", "big5-hkscs", "euc-kr", "ks_c_5601-1987",
    "iso-2022-kr", "euc-jp", "shift_jis", "shift-jis", "iso-2022-jp", "x-sjis", "cp949", "cp936",
    "windows-936", "windows-949", "tis-620", "windows-874",
})

_VOWELS = set("aeiouy")
_CONSONANT_RUN = re.compile(r"[bcdfghjklmnpqrstvwxz]{6,}")
_SEGMENTS = re.compile(r"[-._+=]+")
_REPEATS = re.compile(r"(.)\1+")
_SUBJECT_TAIL = re.compile(r"\S\s{3,}[A-Za-z0-9]{3,16}\s*$")
_IP_HOST = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$|^0x[0-9a-f]+$|^\d{8,10}$", re.I)
# The helpers below that read one string are pure functions: their answers are kept for the strings
# met last (one message asks for the same URL, host or address from its tokens and several signs).
MEMO_STRINGS = 1024


@lru_cache(maxsize=MEMO_STRINGS)
def registered_domain(host: str) -> str:
    """The last two labels of ``host`` (three under a two-letter country second level)."""
    labels = [label for label in host.split(".") if label]
    if len(labels) >= 3 and len(labels[-1]) == 2 and len(labels[-2]) <= 3:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


@lru_cache(maxsize=MEMO_STRINGS)
def looks_random(word: str) -> bool:
    """True for strings that look machine-made: ``xkqzjw``, ``a8f3k29d``, ``ttt73522``.

    Used on address local parts and Subject tails, one segment at a time
    (``-``, ``.``, ``_``, ``+`` and ``=`` separate segments). Runs of one letter
    are counted once, so ``zzzz`` or ``qqqq`` placeholders do not look random.
    Real names rarely have six consonants in a row, under 20% vowels over eight
    letters, or letters and digits alternating four times.
    """
    for segment in _SEGMENTS.split(_REPEATS.sub(r"\1", word.lower())):
        if len(segment) < 6:
            continue
        if _CONSONANT_RUN.search(segment):
            return True
        switches = sum(1 for a, b in zip(segment, segment[1:]) if a.isdigit() != b.isdigit())
        if switches >= 4:
            return True
        letters = [c for c in segment if c.isalpha()]
        if len(letters) >= 8 and sum(1 for c in letters if c in _VOWELS) / len(letters) < 0.2:
            return True
    return False


@lru_cache(maxsize=MEMO_STRINGS)
def address_of(value: str | None) -> str:
    """The bare lower-case address in a From-like header value, or ""."""
    if not value:
        return ""
    try:
        return parseaddr(value)[1].strip().lower()[:320]
    except Exception:
        return ""


def addresses_of(values: list[str]) -> list[str]:
    try:
        return [addr.lower()[:320] for _, addr in getaddresses(values[:8])[:200] if addr]
    except Exception:
        return []


def from_address(view: MailView) -> str:
    """The From: address (lower case), parsed once per message."""
    if "from" not in view.memo:
        view.memo["from"] = address_of(view.header("from"))
    return str(view.memo["from"])


def to_addresses(view: MailView) -> list[str]:
    """The To: addresses (lower case), parsed once per message."""
    if "to" not in view.memo:
        view.memo["to"] = addresses_of(view.header_all("to"))
    return list(view.memo["to"])  # type: ignore[call-overload]


def recipient_count(view: MailView) -> int:
    """Addresses in To: and Cc:."""
    if "ncpt" not in view.memo:
        view.memo["ncpt"] = len(to_addresses(view)) + len(addresses_of(view.header_all("cc")))
    return int(view.memo["ncpt"])  # type: ignore[call-overload]


def _local(address: str) -> str:
    return address.rsplit("@", 1)[0] if "@" in address else address


@lru_cache(maxsize=MEMO_STRINGS)
def url_host(url: str) -> str:
    """The lower-case host of ``url`` ("www.x" links count as http)."""
    if url[:4].lower() == "www.":
        url = "http://" + url
    try:
        host = urlsplit(url[:512]).hostname or ""
    except ValueError:
        return ""
    return host.strip(".").lower()


def once(view: MailView, check: Callable[[MailView], bool]) -> bool:
    """The result of ``check`` on ``view``, computed once per message (kept in ``view.memo`` under the
    check's name); False when it fails: a sign that cannot be judged is not a hit."""
    key = "check:" + check.__name__
    found = view.memo.get(key)
    if found is None:
        try:
            found = bool(check(view))
        except Exception:
            found = False
        view.memo[key] = found
    return bool(found)


# -- the checks -------------------------------------------------------------------------------


def gtube(view: MailView) -> bool:
    return GTUBE in view.body or GTUBE in (view.header("subject") or "")


def missing_from(view: MailView) -> bool:
    return not from_address(view)


def missing_to(view: MailView) -> bool:
    return view.header("to") is None and view.header("cc") is None


def missing_date(view: MailView) -> bool:
    return view.header("date") is None


def missing_message_id(view: MailView) -> bool:
    return view.header("message-id") is None


def empty_x_mailer(view: MailView) -> bool:
    value = view.header("x-mailer")
    return value is not None and not value.strip()


def random_from(view: MailView) -> bool:
    return looks_random(_local(from_address(view)))


def random_to(view: MailView) -> bool:
    return any(looks_random(_local(a)) for a in to_addresses(view)[:10])


def numeric_from(view: MailView) -> bool:
    local = _local(from_address(view))
    return sum(c.isdigit() for c in local) >= 5


def subject_random_tail(view: MailView) -> bool:
    # Reference: "trailing spaces in Subject followed by a random letter string".
    subject = view.header("subject") or ""
    match = _SUBJECT_TAIL.search(subject)
    if match is None:
        return False
    tail = match.group(0).split()[-1]
    return looks_random(tail) or len(tail) <= 8


def subject_all_caps(view: MailView) -> bool:
    letters = [c for c in view.header("subject") or "" if c.isalpha()]
    return len(letters) >= 12 and all(c.isupper() for c in letters)


def asian_charset(view: MailView) -> bool:
    charsets = set(view.charsets)
    for value in (view.raw_headers.get("subject", b""), view.raw_headers.get("from", b"")):
        for match in re.finditer(rb"=\?([^?]{1,40})\?", value):
            charsets.add(match.group(1).decode("ascii", "replace").lower())
    return bool(charsets & ASIAN_CHARSETS)


def html_only(view: MailView) -> bool:
    types = [p.content_type for p in view.parts]
    return "text/html" in types and "text/plain" not in types


def hidden_html_text(view: MailView) -> bool:
    return view.html is not None and view.html.hidden_chars >= 20


def white_text(view: MailView) -> bool:
    return view.html is not None and "white-text" in view.html.signs


def comment_in_word(view: MailView) -> bool:
    return view.html is not None and "comment-in-word" in view.html.signs


def url_numeric_host(view: MailView) -> bool:
    return any(_IP_HOST.match(url_host(u)) for u in view.urls[:100])


def url_text_mismatch(view: MailView) -> bool:
    """A link whose shown text is a URL on another site than it leads to (phishing).

    Sites are compared by registered domain: a newsletter's link showing www.proflowers.com that
    goes to news.proflowers.com, or www.hp.com to h30046.www3.hp.com, is the same owner's, not a
    disguise (the host comparison fired on them: ham/spam hits modern-mixed 2/0 -> 1/0, phishing
    79 -> 77, trec-2007 22/771 -> 22/768, sa 3/13 -> 3/12)."""
    if view.html is None:
        return False
    for href, shown in view.html.link_texts[:100]:
        if not re.match(r"\s*(?:https?://|www\.)", shown, re.I):
            continue
        real, claimed = url_host(href), url_host(shown.strip().split()[0])
        if real and claimed and registered_domain(real) != registered_domain(claimed):
            return True
    return False


def from_is_to(view: MailView) -> bool:
    sender = from_address(view)
    return bool(sender) and to_addresses(view) == [sender]


def to_undisclosed(view: MailView) -> bool:
    value = (view.header("to") or "").lower()
    return "undisclosed" in value or value.strip() in ("", ":;")


def many_recipients(view: MailView) -> bool:
    return recipient_count(view) > 15


def text_base64(view: MailView) -> bool:
    """A plain-text body sent base64-encoded in US-ASCII hides its words from naive filters."""
    return any(p.content_type == "text/plain" and p.encoding == "base64" and p.charset in ("", "us-ascii") for p in view.parts)


def executable_attachment(view: MailView) -> bool:
    return any(
        p.filename.lower().rsplit(".", 1)[-1] in ("exe", "scr", "pif", "com", "bat", "cmd", "vbs", "js", "lnk", "cpl")
        for p in view.parts
        if "." in p.filename
    )


def high_priority(view: MailView) -> bool:
    return (view.header("x-priority") or "").strip()[:1] == "1"


MAX_LURE_LINKS = 2  # web or mail links beside the embedded picture
MAX_LURE_WORDS_BEFORE = 5  # visible words before it: a greeting at most
MAX_LURE_PICTURE_BYTES = 64 * 1024  # all the message's pictures together, decoded


def embedded_image_lure(view: MailView) -> bool:
    """The message opens with a small picture it carries itself (``cid:``, RFC 2392) and hardly links
    anywhere else: the offer is in the picture, and the words after it, often pasted from books or
    news, are there for word filters. A newsletter or receipt that embeds its logo links to its site
    many times; a letter's logo in its signature comes after the text; a photo sent to family is
    larger; and a message that shows remote pictures embeds none."""
    html = view.html
    if html is None or not 0 <= html.words_before_embedded <= MAX_LURE_WORDS_BEFORE:
        return False
    pictures = [p.size for p in view.parts if p.content_type.startswith("image/")]
    if not pictures or sum(pictures) > MAX_LURE_PICTURE_BYTES:
        return False
    others = sum(1 for link in html.links[:100] if link[:4].lower() != "cid:")
    return others <= MAX_LURE_LINKS


# -- the mail programs' own marks (the ratware of 2002-07 names a program it is not) -------------
# A mail program writes its Message-ID in a form of its own. Outlook Express 5-6 and Outlook
# 2002-03 (Build 10-11): "<" four hex digits, the FILETIME's high word (01c...), "$" its low word,
# "$" the client's IPv4 address in hex, "@" host; The Bat!: "<" a number "." the local time as
# YYYYMMDDhhmmss "@" host. Spam tools of the era wrote the X-Mailer of one and a Message-ID of
# another (or none, which a relay then made: "<E17sjK3-0008ST-00@...>"), or filled the low word
# with the high one. Hotmail's web client also says Outlook Express but names its own ids
# ("<DAV...@hotmail.com>", "<BAY141-DAV...@phx.gbl>"); Outlook for the Mac and Outlook 2000's
# "IMO" builds have other forms: none of them counts.
_OUTLOOK_MAILER = re.compile(r"^\s*Microsoft (?:Outlook Express [56]\.\d|Outlook, Build 1[01]\.)")
_OUTLOOK_ID = re.compile(r"^\s*<[0-9a-f]{4}(01c[0-9a-f]{5})\$([0-9a-f]{8})\$[0-9a-f]{8}@[^<>\s]+>\s*$", re.I)
_WEBMAIL_ID = re.compile(r"@(?:hotmail|msn)\.com>|[@.]phx\.gbl>", re.I)
_BAT_MAILER = re.compile(r"^\s*The Bat!")
_BAT_ID = re.compile(r"^\s*<\d{5,12}\.(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:[0-2]\d|3[01])(?:[01]\d|2[0-3])[0-5]\d[0-5]\d"
                     r"@[^<>\s]+>\s*$")


def forged_mailer_id(view: MailView) -> bool:
    """The X-Mailer names Outlook (Express) or The Bat!, and the Message-ID is not of that program's form."""
    mailer, msgid = view.header("x-mailer") or "", view.header("message-id")
    if msgid is None:
        return False
    if _OUTLOOK_MAILER.match(mailer):
        if _WEBMAIL_ID.search(msgid):
            return False
        match = _OUTLOOK_ID.match(msgid)
        return match is None or match.group(1).lower() == match.group(2).lower()
    if _BAT_MAILER.match(mailer):
        return _BAT_ID.match(msgid) is None
    return False


# Words of the software and pharmacy spam of 2006-07 as its Subjects spelt them to pass word
# filters: "Mlcrosoft7,Adobeu+M0RE starting at 29$", "0ffice6 2OO7", "Snatch away Soft C1alis!".
# A word (or the word and one trailing character the spammer glued on) that reads as one of these
# once look-alike characters are made letters (0 o, 1 l | ! i, 3 e, 4 @ a, 5 $ s), but is not
# written so: the plain word, a version number or a year of digits is not.
OBFUSCATED_WORDS = ("microsoft", "adobe", "office", "oem", "photoshop", "windows", "software", "cialis", "viagra",
                    "levitra", "pharmacy", "rolex", "replica", "watches", "timepieces", "more", "meds", "pills",
                    "2007")
_LOOKALIKE_LETTERS = str.maketrans({"0": "o", "1": "i", "l": "i", "|": "i", "!": "i", "3": "e", "4": "a", "@": "a",
                                    "5": "s", "$": "s"})
_OBFUSCATED_KEYS = {word.translate(_LOOKALIKE_LETTERS): word for word in OBFUSCATED_WORDS}
_SUBJECT_WORD = re.compile(r"[A-Za-z0-9|!@$]{3,14}")


def obfuscated_subject(view: MailView) -> bool:
    """A Subject word that spells a word of software or pharmacy spam with look-alike characters."""
    for match in _SUBJECT_WORD.finditer((view.header("subject") or "")[:256]):
        word = match.group(0).lower()
        for candidate in (word, word[:-1]):
            plain = _OBFUSCATED_KEYS.get(candidate.translate(_LOOKALIKE_LETTERS))
            if plain is not None and candidate != plain and not candidate.isdigit():
                return True
    return False


# -- the Date field (RFC 5322 §3.3) ----------------------------------------------------------------
# A date-time ends in a zone: "+" or "-" and four digits, hours up to 14 (UTC+14 is the farthest
# zone in use) and minutes under 60, or an obsolete zone name (§4.3: "UT", "GMT", "EST", a military
# letter). The bulk tools of 2001-03 wrote the local time with no zone ("Wed, 24 Jul 2002 20:03:30"),
# an offset no zone has ("-1900", "+0960"), or the year as C's tm_year ("Mon, 04 Feb 0102"). A
# mail program or a relay that completes a message writes the field whole (RFC 6409 §8.1).
_DATE_TAIL = re.compile(r"(\d{1,4})\s+\d{1,2}:\d\d(?::\d\d)?\s*(?:([+-])(\d\d)(\d\d)|([A-Za-z]{1,5}))?\s*(?:\(.*\))?\s*$")
MAX_ZONE_HOURS = 14
YEARS = range(1980, 2100)


def malformed_date(view: MailView) -> bool:
    """The Date field's time has no zone, a zone offset no zone has, or a year no mail program writes
    (three digits, "0102", before 1980); a Date that cannot be read as a date-time at all is not judged."""
    value = view.header("date")
    if value is None:
        return False
    match = _DATE_TAIL.search(value.strip()[:200])
    if match is None:
        return False
    year, sign, hours, minutes, name = match.groups()
    if sign is None and name is None:
        return True
    if sign is not None and (int(hours) > MAX_ZONE_HOURS or int(minutes) >= 60):
        return True
    return len(year) == 3 or (len(year) == 4 and int(year) not in YEARS)


CHECKS: dict[str, Callable[[MailView], bool]] = {
    fn.__name__: fn
    for fn in (
        gtube, missing_from, missing_to, missing_date, missing_message_id, empty_x_mailer, random_from,
        random_to, numeric_from, subject_random_tail, subject_all_caps, asian_charset, html_only,
        hidden_html_text, white_text, comment_in_word, url_numeric_host, url_text_mismatch, from_is_to,
        to_undisclosed, many_recipients, text_base64, executable_attachment, high_priority,
        embedded_image_lure, forged_mailer_id, obfuscated_subject, malformed_date,
    )
}
