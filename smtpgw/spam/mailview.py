"""A bounded, decoded view of one message for the anti-spam engine.

Owns: turning raw message bytes into what the tokenizer and the rules read —
decoded header values (RFC 2047 encoded words, raw 8-bit bytes), the text of
text/plain and text/html parts (HTML reduced to text by ``htmltext``), the
names and types of other parts, and the URLs seen.

Must never: raise on malformed input, decode more than ``MAX_MESSAGE_BYTES`` of a
message, visit more than ``MAX_PARTS`` parts or nest deeper than ``MAX_DEPTH``,
or change the message (the view is read-only; the gateway delivers the original
bytes).
"""

from __future__ import annotations

import codecs
import logging
import re
from dataclasses import dataclass, field
from email import policy as email_policy
from email.header import decode_header
from email.message import Message
from email.errors import MissingHeaderBodySeparatorDefect
from email.parser import BytesParser, Parser

from smtpgw.mail import dkim, headers
from smtpgw.spam.htmltext import HtmlText, html_to_text

log = logging.getLogger("smtpgw.spam.mailview")

MAX_MESSAGE_BYTES = 256 * 1024  # the head of a long message carries its spam signs
MAX_PART_TEXT = 64 * 1024  # characters of text kept from one part
MAX_TOTAL_TEXT = 192 * 1024  # characters of text kept from the whole message
MAX_PARTS = 64
MAX_DEPTH = 8  # RFC 2046 §5.1 nesting; deeper structure is not visited
MAX_HEADERS = 200
MAX_HEADER_VALUE = 4096

# Charsets that name the same encoding under a name Python does not know
# (seen in the wild, RFC 1922 / vendor spellings).
_CHARSET_ALIASES = {
    "x-unknown": "latin-1",
    "unknown-8bit": "latin-1",
    "x-user-defined": "latin-1",
    "default": "latin-1",
    "ks_c_5601-1987": "cp949",
    "ks_c_5601": "cp949",
    "x-sjis": "shift_jis",
    "x-euc-jp": "euc_jp",
    "x-gbk": "gbk",
    "gb2312-80": "gb2312",
    "windows-874": "cp874",
    "x-mac-roman": "mac_roman",
    "iso-8859-8-i": "iso-8859-8",
}

# RFC 3986 URI schemes a reader can follow, plus bare "www." hosts.
_URL = re.compile(r"""(?:(?:https?|ftp)://|www\.)[^\s<>"'()\[\]{}\\^`|]{2,512}""", re.I)



@dataclass
class Part:
    """One leaf MIME part as the anti-spam engine sees it."""

    content_type: str  # lower-case "type/subtype"
    charset: str  # lower-case declared charset, "" when none
    filename: str  # decoded file name, "" when none
    size: int  # decoded payload size in bytes
    encoding: str  # lower-case Content-Transfer-Encoding, "" when none
    disposition: str = ""  # lower-case Content-Disposition type (RFC 2183 §2: inline, attachment), "" when none


@dataclass
class MailView:
    """What the tokenizer and the rules look at."""

    headers: list[tuple[str, str]] = field(default_factory=list)  # (lower name, decoded value)
    raw_headers: dict[str, bytes] = field(default_factory=dict)  # first raw value by lower name
    text: str = ""  # text/plain parts, joined
    html_text: str = ""  # text rendered from text/html parts, joined
    html: HtmlText | None = None  # structure signs from the HTML parts
    parts: list[Part] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    charsets: set[str] = field(default_factory=set)
    defects: list[str] = field(default_factory=list)
    truncated: bool = False
    memo: dict[str, object] = field(default_factory=dict)  # derived values, computed once
    # the DKIM verification a scanner worker made for this message (smtpgw.mail.dkim.verified);
    # None when none ran (the offline tools, DKIMVerify=no): the signatures are then only read
    dkim: list[dkim.Result] | None = None

    def header(self, name: str) -> str | None:
        """The first decoded value of header ``name`` (lower-case), or None."""
        for hname, value in self.headers:
            if hname == name:
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        return [value for hname, value in self.headers if hname == name]

    @property
    def body(self) -> str:
        """All body text (plain and rendered HTML)."""
        if self.text and self.html_text:
            return self.text + "\n" + self.html_text
        return self.text or self.html_text


def codec_for(charset: str | None) -> str | None:
    """The Python codec name for a MIME charset, or None when it is unknown."""
    if not charset:
        return None
    name = charset.strip().strip("\"'").lower()
    name = _CHARSET_ALIASES.get(name, name)
    try:
        return codecs.lookup(name).name
    except (LookupError, ValueError):
        return None


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode ``data`` with ``charset``; unknown or wrong charsets degrade, never raise."""
    codec = codec_for(charset)
    if codec is not None:
        try:
            return data.decode(codec, "replace")
        except Exception:  # a codec's own bugs must not stop filtering
            log.debug("codec %s failed", codec)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def decode_header_value(value: str, fallback: str | None) -> str:
    """Decode RFC 2047 encoded words and raw 8-bit bytes of one header value.

    With ``compat32`` raw 8-bit bytes arrive as surrogate escapes; they are
    decoded as UTF-8 when valid, else with the message's body charset.
    """
    value = value[:MAX_HEADER_VALUE]
    raw8 = value.encode("ascii", "surrogateescape") if not value.isascii() else None
    if raw8 is not None:
        value = decode_bytes(raw8, fallback if _not_utf8(raw8) else "utf-8")
    if "=?" not in value:
        return value
    try:
        pieces = decode_header(value)
    except Exception:  # RFC 2047 §6.3: a bad encoded word is shown as it is
        return value
    out: list[str] = []
    for chunk, charset in pieces:
        if isinstance(chunk, str):
            out.append(chunk)
        elif charset is None:  # text between encoded words, which decode_header escaped
            out.append(chunk.decode("raw-unicode-escape", "replace"))
        else:
            out.append(decode_bytes(chunk, charset))
    return "".join(out)


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


class _BoundedCompat32(email_policy.Compat32):
    """compat32 keeping no more than ``MAX_HEADER_VALUE`` characters of a header value.

    ``Message.get_param`` (which the parser calls for every boundary) splits
    parameters in time quadratic in the value's length: a 100 KB Content-Type
    of quoted semicolons took 25 s. The view reads no more of a value anyway.
    """

    def header_source_parse(self, sourcelines: list[str]) -> tuple[str, str]:
        name, value = super().header_source_parse(sourcelines)
        return name, value[:MAX_HEADER_VALUE]


_POLICY = _BoundedCompat32()
_MIME_FIELDS = frozenset({"content-type", "content-transfer-encoding", "content-disposition"})


class _BoundedMessage(Message):
    """A Message keeping its first ``MAX_HEADERS`` fields (all the view reads) and, past them,
    the first of each MIME field (still in force for mail readers).

    ``Message.get`` scans every field, and the parser asks the enclosing entity's Content-Type
    once for each new part: 20,000 fields above 2,000 parts took 12 s.
    """

    def __init__(self, policy: email_policy.Compat32 = _POLICY) -> None:
        super().__init__(policy)
        self._mime_seen: set[str] = set()

    def set_raw(self, name: str, value: str) -> None:
        lname = name.strip().lower()
        mime = lname in _MIME_FIELDS
        if len(self._headers) < MAX_HEADERS or (mime and lname not in self._mime_seen):
            super().set_raw(name, value)
            if mime:
                self._mime_seen.add(lname)


def _parse(raw: bytes) -> Message | None:
    try:
        msg = _parse_one_part(raw)
        return msg if msg is not None else BytesParser(_BoundedMessage, policy=_POLICY).parsebytes(raw)
    except Exception:  # compat32 records defects; anything else falls back below
        log.debug("message parser failed", exc_info=True)
        return None


def _parse_one_part(raw: bytes) -> Message | None:
    """The message ``BytesParser`` gives for a one-part message, without handing its body to the
    parser line by line: the header block (to the first empty line) is parsed alone and the rest
    set as the payload, which is what the parser does with the body of a type that is neither
    multipart nor message. None (parse it whole) when the header block may not end where the
    parser would end it (a bare CR, RFC 5322 §2.2: the parser's lines end at CR too; a line that
    is no header field) or the type has parts."""
    # as BytesParser.parsebytes reads it: one character a byte, so offsets in raw are offsets in text
    text = raw.decode("ascii", "surrogateescape")
    end = headers.header_end(raw)
    if end == 0:  # an empty header block: the whole parse decides
        return None
    head = text[:end]
    if "\r" in head and head.count("\r") != head.count("\r\n"):
        return None
    try:
        msg = Parser(_BoundedMessage, policy=_POLICY).parsestr(head)
        if (msg.get_content_maintype() in ("multipart", "message") or msg.get_payload() != ""
                or any(isinstance(d, MissingHeaderBodySeparatorDefect) for d in msg.defects)):
            return None
    except Exception:  # the whole parse decides
        return None
    msg.set_payload(text[end:])
    return msg


def _payload(part: Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if isinstance(data, bytes):
        return data
    try:
        text = part.get_payload()
    except Exception:
        return b""
    return text.encode("utf-8", "surrogateescape") if isinstance(text, str) else b""


def _param(part: Message, name: str) -> str:
    try:
        value = part.get_param(name)
        if isinstance(value, tuple):  # RFC 2231 (charset, language, value)
            value = decode_bytes(value[2].encode("latin-1", "replace"), value[0])
        return str(value or "")[:256]
    except Exception:
        return ""


def _leaves(msg: Message) -> list[tuple[Message, int]]:
    """Leaf parts in document order, bounded in count and depth (iterative walk)."""
    out: list[tuple[Message, int]] = []
    stack: list[tuple[Message, int]] = [(msg, 0)]
    visited = 0
    while stack and visited < MAX_PARTS * 2:
        part, depth = stack.pop()
        visited += 1
        payload = part.get_payload() if part.is_multipart() else None
        if isinstance(payload, list):
            if depth >= MAX_DEPTH:
                continue
            stack.extend((sub, depth + 1) for sub in reversed(payload[:MAX_PARTS]) if isinstance(sub, Message))
        else:
            out.append((part, depth))
            if len(out) >= MAX_PARTS:
                break
    return out


def build(raw: bytes) -> MailView:
    """Build the view of ``raw``; never raises for any input bytes."""
    view = MailView(dkim=dkim.current())
    try:
        _build(raw, view)
    except Exception:  # the last line of defence: a partial view is still classified
        log.warning("unexpected failure reading a message", exc_info=True)
        view.defects.append("ViewError")
    return view


def strip_mbox_from(raw: bytes) -> bytes:
    """Drop a leading mbox ``From `` separator line (not a header, RFC 4155)."""
    if raw.startswith(b"From "):
        nl = raw.find(b"\n", 0, 1024)
        return raw[nl + 1 :] if nl >= 0 else raw
    return raw


def _build(raw: bytes, view: MailView) -> None:
    raw = strip_mbox_from(raw)
    if len(raw) > MAX_MESSAGE_BYTES:
        raw = raw[:MAX_MESSAGE_BYTES]
        view.truncated = True
    msg = _parse(raw)
    if msg is None:
        view.defects.append("ParseError")
        view.text = decode_bytes(raw, None)[:MAX_PART_TEXT]
        return
    view.defects.extend(type(d).__name__ for d in getattr(msg, "defects", []))
    body_charset = _param(msg, "charset") or None
    for name, value in list(msg.raw_items())[:MAX_HEADERS]:  # raw: compat32 would wrap 8-bit values
        lname = name.strip().lower()
        if lname not in view.raw_headers:
            view.raw_headers[lname] = str(value).encode("utf-8", "surrogateescape")[:MAX_HEADER_VALUE]
        view.headers.append((lname, decode_header_value(str(value), body_charset)))
    _read_parts(msg, view)
    view.urls = _urls(view.body[:MAX_TOTAL_TEXT])[:200]
    if view.html is not None:
        view.urls.extend(view.html.links[:200])


def _urls(text: str) -> list[str]:
    """``_URL.findall(text)``. Every match holds "://" or "www." (W and w are the only characters
    the pattern's case-blind "w" matches), so a text holding neither, in any case, has none and is
    not tried position by position (about 30 ns a character)."""
    if "://" not in text and "www." not in text.lower():
        return []
    return _URL.findall(text)


def _read_parts(msg: Message, view: MailView) -> None:
    texts: list[str] = []
    htmls: list[str] = []
    budget = MAX_TOTAL_TEXT
    for part, _depth in _leaves(msg):
        try:
            ctype = part.get_content_type().lower()
        except Exception:
            ctype = "text/plain"
        charset = _param(part, "charset").lower()
        if charset:
            view.charsets.add(charset)
        filename = ""
        try:
            filename = decode_header_value(str(part.get_filename("") or ""), None)[:256]
        except Exception:
            view.defects.append("BadFilename")
        data = _payload(part)
        encoding = str(part.get("content-transfer-encoding", "") or "").strip().lower()[:32]
        disposition = str(part.get("content-disposition", "") or "").split(";", 1)[0].strip().lower()[:32]
        view.parts.append(Part(ctype, charset, filename, len(data), encoding, disposition))
        view.defects.extend(type(d).__name__ for d in getattr(part, "defects", []) if part is not msg)
        if budget <= 0 or not ctype.startswith("text/") and ctype != "message/delivery-status":
            continue
        text = decode_bytes(data[: MAX_PART_TEXT * 4], charset or None)[:MAX_PART_TEXT]
        if ctype == "text/html" or (ctype == "text/plain" and _looks_html(text)):
            rendered = html_to_text(text)
            view.html = rendered if view.html is None else view.html.merged(rendered)
            htmls.append(rendered.text[:budget])
            budget -= len(htmls[-1])
        else:
            texts.append(text[:budget])
            budget -= len(texts[-1])
    view.text = "\n".join(texts)
    view.html_text = "\n".join(htmls)


def _looks_html(text: str) -> bool:
    head = text[:2048].lower()
    return "<html" in head or ("<body" in head and "</" in head)
