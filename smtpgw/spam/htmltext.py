"""HTML parts reduced to readable text plus the structural signs spammers leave.

Owns: rendering an HTML body to the text a reader would see (stdlib
``html.parser``), and recording links, the tags used and hidden-text tricks
(text styled invisible, zero-size fonts, white-on-white, comments splitting
words, invisible images).

Must never: raise on malformed HTML, fetch anything a link points to, or keep
more than a bounded number of links, tags and stack entries.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser

MAX_LINKS = 200
MAX_STACK = 256
MAX_SIGNS = 64
MAX_WORDS_BEFORE_PICTURE = 100
MAX_UNTERMINATED = 16  # constructs left open at the end of the input that are read as text

# Elements whose content is not shown to the reader (HTML Living Standard §15.3.1).
_NOT_RENDERED = {"script", "style", "head", "template", "noscript", "xml"}
# Void elements never have an end tag (HTML §13.1.2).
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}
# Elements that end a line of rendered text.
_BLOCK = {"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "td", "th", "blockquote", "title"}
# Tags worth a token of their own: presence says something about who wrote the mail.
NOTABLE_TAGS = frozenset({
    "font", "center", "table", "img", "form", "input", "script", "iframe", "object", "embed",
    "map", "area", "blink", "marquee", "base", "meta", "style", "button", "select", "frame",
})

_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden|font-size\s*:\s*[01](?:\.\d+)?(?:px|pt)?\s*(?:;|$)", re.I)
_WHITE = re.compile(r"^\s*(?:#?f{3}(?:f{3})?|white|#fefefe|rgb\(\s*255\s*,\s*255\s*,\s*255\s*\))\s*$", re.I)
_STYLE_COLOR = re.compile(r"(?<![-\w])color\s*:\s*([^;]+)", re.I)
_WS = re.compile(r"[ \t\r\f\v]+")


@dataclass
class HtmlText:
    """The rendered text and the signs found in one or more HTML parts."""

    text: str = ""
    links: list[str] = field(default_factory=list)
    tags: Counter[str] = field(default_factory=Counter)
    signs: set[str] = field(default_factory=set)
    hidden_chars: int = 0
    comments: int = 0
    link_texts: list[tuple[str, str]] = field(default_factory=list)  # (href, shown text)
    # visible words before the first picture carried in the message (<img src="cid:...">, RFC 2392),
    # counted up to MAX_WORDS_BEFORE_PICTURE; -1 when no such picture is shown
    words_before_embedded: int = -1

    def merged(self, other: HtmlText) -> HtmlText:
        return HtmlText(
            text=self.text + "\n" + other.text,
            links=(self.links + other.links)[:MAX_LINKS],
            tags=self.tags + other.tags,
            signs=set(list(self.signs | other.signs)[:MAX_SIGNS]),
            hidden_chars=self.hidden_chars + other.hidden_chars,
            comments=self.comments + other.comments,
            link_texts=(self.link_texts + other.link_texts)[:MAX_LINKS],
            words_before_embedded=self.words_before_embedded if self.words_before_embedded >= 0
            else _words_before(self.text, other.words_before_embedded),
        )


def _words_before(text: str, then: int) -> int:
    """Words of ``text`` plus ``then`` more, bounded; -1 when ``then`` is -1 (no picture after it)."""
    if then < 0:
        return -1
    return min(len(text.split(None, MAX_WORDS_BEFORE_PICTURE)) + then, MAX_WORDS_BEFORE_PICTURE)


class _Renderer(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.result = HtmlText()
        # (tag, hidden, not_rendered) for each open element
        self.stack: list[tuple[str, bool, bool]] = []
        self.anchor: tuple[str, list[str]] | None = None
        self.comment_after_letter = False

    # -- state of the innermost open element -------------------------------------
    def _hidden(self) -> bool:
        return bool(self.stack) and self.stack[-1][1]

    def _not_rendered(self) -> bool:
        return bool(self.stack) and self.stack[-1][2]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        result = self.result
        result.tags[tag] += 1
        values = {name: (value or "") for name, value in attrs[:32]}
        hidden = self._hidden() or self._hides(tag, values)
        for name in ("href", "src", "action", "background"):
            link = values.get(name, "").strip()
            if link and len(result.links) < MAX_LINKS:
                result.links.append(link[:512])
        if tag == "a" and values.get("href"):
            self.anchor = (values["href"].strip()[:512], [])
        if tag == "img":
            self._image_signs(values)
            if result.words_before_embedded < 0 and values.get("src", "").strip()[:4].lower() == "cid:":
                result.words_before_embedded = _words_before("".join(self.out), 0)
        if tag == "input" and values.get("type", "").strip().lower() == "password":
            result.signs.add("password-field")
        if tag in _BLOCK:
            self.out.append("\n")
        if tag in _VOID:
            return
        if len(self.stack) >= MAX_STACK:
            self.stack.pop(0)
        self.stack.append((tag, hidden, self._not_rendered() or tag in _NOT_RENDERED))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCK:
            self.out.append("\n")
        if tag == "a" and self.anchor is not None:
            href, shown = self.anchor
            self.result.link_texts.append((href, " ".join(shown)[:256]))
            self.anchor = None
        # Pop to the matching open element; a stray end tag is ignored (HTML §13.2.6).
        for index in range(len(self.stack) - 1, -1, -1):
            if self.stack[index][0] == tag:
                del self.stack[index:]
                break

    def handle_data(self, data: str) -> None:
        if self._not_rendered() or not data:
            return
        if self._hidden():
            stripped = data.strip()
            self.result.hidden_chars += len(stripped)
            if stripped:
                self.result.signs.add("hidden-text")
            return
        if self.comment_after_letter and data[:1].isalpha():
            self.result.signs.add("comment-in-word")
        self.comment_after_letter = False
        self.out.append(data)
        if self.anchor is not None:
            self.anchor[1].append(data.strip())

    def handle_comment(self, data: str) -> None:
        self.result.comments += 1
        # A comment glued between letters splits a word for filters only ("V<!--x-->iagra").
        self.comment_after_letter = bool(self.out) and self.out[-1][-1:].isalpha()

    def finish(self) -> None:
        """``close()``, with at most ``MAX_UNTERMINATED`` constructs that never end read as text.

        What ``feed()`` leaves starts with a tag, comment or declaration that
        does not end. ``close()`` reads its "<" as text and parses on, but in
        Python < 3.13.4 it re-scans the whole rest for every such construct
        (quadratic: 64 KB of "<a" took 6 s). That is done here for the first
        ``MAX_UNTERMINATED`` of them; the rest of the input is then dropped, as
        HTML drops a construct still open at the end of the input (§13.2.5).
        """
        for _ in range(MAX_UNTERMINATED):
            pending = self.rawdata
            if not pending.startswith("<"):
                break
            self.rawdata = ""
            self.handle_data("<")
            self.feed(pending[1:])
        if self.rawdata.startswith("<"):
            self.rawdata = ""
        self.close()

    # -- signs -------------------------------------------------------------------
    def _hides(self, tag: str, values: dict[str, str]) -> bool:
        signs = self.result.signs
        style = values.get("style", "")
        if style and _HIDDEN_STYLE.search(style):
            signs.add("style-hidden")
            return True
        if "hidden" in values and tag not in ("input",):
            signs.add("attr-hidden")
            return True
        if tag == "font":
            size = values.get("size", "").strip()
            if size in ("0", "1", "-2", "-3", "-4"):
                signs.add("font-tiny")
            color = values.get("color", "")
            if color and _WHITE.match(color):
                signs.add("white-text")
        if style:
            for color in _STYLE_COLOR.findall(style):
                if _WHITE.match(color):
                    signs.add("white-text")
        return False

    def _image_signs(self, values: dict[str, str]) -> None:
        width, height = values.get("width", "").strip(), values.get("height", "").strip()
        if width in ("0", "1") or height in ("0", "1"):
            self.result.signs.add("web-bug")
        if not values.get("alt"):
            self.result.signs.add("img-no-alt")


def html_to_text(html: str) -> HtmlText:
    """Render ``html``; malformed input gives whatever was rendered before the fault."""
    renderer = _Renderer()
    try:
        renderer.feed(html)
        renderer.finish()
    except Exception:  # html.parser can assert on broken declarations; keep what we have
        renderer.result.signs.add("html-parse-error")
    result = renderer.result
    text = "".join(renderer.out)
    result.text = "\n".join(_WS.sub(" ", line).strip() for line in text.splitlines() if line.strip())
    if result.tags and not result.text:
        result.signs.add("no-visible-text")
    return result
