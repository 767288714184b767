"""The template language of every text the gateway writes from a template (kmg-spec §5.2, §10).

Owns: loading and checking templates (`load_template`, `load_templates`; a bad one is refused
when it is loaded, naming its file and line), what each kind of template may use (`SCHEMAS`:
notify.tmpl, dsn.tmpl, disclaimer.tmpl, digest.tmpl, placeholder.tmpl), and rendering a checked
template with macro values and block lists (`Template.render`).

Must never: let a macro value break out of its line (its control characters become spaces:
no value can start a header field, CPython gh-121650, or fake a line of the text), render more
than ``MAX_OUTPUT_CHARS`` characters or ``MAX_ITEMS`` items of a list, or know what the values
mean (notifications, DSNs, digests and placeholders fill them in: `smtpgw.reports.notify`,
`smtpgw.reports.dsn`, `smtpgw.reports.digest`, `smtpgw.scan.antivirus`).

Template language
-----------------
A template is UTF-8 text of at most 8 KB.

* ``%NAME%`` is replaced by the value of macro NAME; a name the template kind does not know
  is an error when the template is loaded.
* ``%%`` is a literal percent sign; any other ``%`` is an error.
* ``%BEGIN_X%`` ... ``%END_X%`` is a block. A *list* block (OBJECTS, RECIPIENTS) is repeated
  once per item, and the item macros (``%OBJECT_NAME%`` ...) are valid only inside it; list
  blocks do not nest. A *condition* block (FOR_ADMIN, BLOCKED, FAILURE ...) is kept or dropped.
  A block marker alone on its line takes that line with it, so blocks leave no blank lines.
  placeholder.tmpl has no blocks.
* A line starting with ``%#`` is a comment.
* notify.tmpl, dsn.tmpl and digest.tmpl begin with header lines (``Subject:`` required,
  ``X-...:`` allowed), then an empty line, then the body. A macro value is always one line:
  its control characters (CR and LF included) become spaces, wherever it is put; in the kinds
  with header lines (and the disclaimer) runs of white space also become one space.
"""

from __future__ import annotations

import bisect
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

__all__ = [
    "BASE_KINDS",
    "GROUP_KINDS",
    "MAX_ITEMS",
    "MAX_TEMPLATE_BYTES",
    "SCHEMAS",
    "Schema",
    "Template",
    "TemplateError",
    "flag",
    "get_template",
    "load_template",
    "load_templates",
    "one_line",
]

MAX_TEMPLATE_BYTES = 8 * 1024  # kmg-spec §10
MAX_ITEMS = 1000  # items rendered per list block
MAX_VALUE_CHARS = 4096  # one macro value
MAX_OUTPUT_CHARS = 1 << 20  # one rendered template
MAX_DEPTH = 8  # nested blocks


class TemplateError(ValueError):
    """A template that cannot be used: missing, too big, not UTF-8, or with a syntax error."""


# --- macro values and template kinds ------------------------------------------------------


UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


def one_line(value: Any) -> str:
    """A macro value as one line: control characters become spaces, runs of space collapse.

    This is what keeps a value from starting a header field (CPython gh-121650) or faking a
    line of a notification.
    """
    return " ".join(UNSAFE_CHARS.sub(" ", str(value)[:MAX_VALUE_CHARS]).split())


_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")


def no_controls(value: Any) -> str:
    """A macro value with its control characters made spaces, its spacing kept."""
    return _CONTROLS.sub(" ", str(value)[:MAX_VALUE_CHARS])




@dataclass(frozen=True)
class Schema:
    """What one kind of template may use."""

    name: str
    has_headers: bool
    macros: frozenset[str]
    lists: Mapping[str, frozenset[str]]  # list block -> the item macros valid inside it
    conditions: frozenset[str]
    value: Callable[[Any], str]  # a macro value as it is put into the text: `one_line` or `no_controls`


_EVENT_MACROS = frozenset(
    {
        "SENDER", "ALL_RECIPIENTS", "SUBJECT", "QUEUE_ID", "MESSAGE_ID", "GROUP", "STATUS",
        "VIRUSES", "ACTION", "CLIENT_IP", "CLIENT_NAME", "HELO", "SIZE", "DATE", "TIME",
        "RECEIVED_DATE", "RECEIVED_TIME", "PRODUCT", "SPAM_STATUS", "SPAM_METHOD",
        "OBJECT_COUNT",
    }
)
_EVENT_LISTS = {
    "OBJECTS": frozenset({"OBJECT_NAME", "OBJECT_STATUS", "OBJECT_VIRUSES", "OBJECT_ACTION"}),
    "RECIPIENTS": frozenset({"RECIPIENT"}),
}
_EVENT_CONDITIONS = frozenset({"BLOCKED", "DELIVERED", "SPAM"})

SCHEMAS: dict[str, Schema] = {
    "notify": Schema(
        "notify", True, _EVENT_MACROS, _EVENT_LISTS,
        _EVENT_CONDITIONS | {"FOR_ADMIN", "FOR_SENDER", "FOR_RECIPIENT"}, one_line,
    ),
    "disclaimer": Schema("disclaimer", False, _EVENT_MACROS, _EVENT_LISTS, _EVENT_CONDITIONS, one_line),
    "dsn": Schema(
        "dsn", True,
        frozenset(
            {
                "SENDER", "REPORTING_MTA", "POSTMASTER", "QUEUE_ID", "ENVID", "ARRIVAL_DATE",
                "RETRY_UNTIL", "SUBJECT", "MESSAGE_ID", "DATE",
            }
        ),
        {
            "RECIPIENTS": frozenset(
                {"RCPT", "RCPT_ORCPT", "RCPT_ACTION", "RCPT_STATUS", "RCPT_DIAG", "RCPT_REMOTE_MTA"}
            )
        },
        frozenset({"FAILURE", "DELAY", "SUCCESS", "FULL_MESSAGE", "HEADERS_ONLY"}), one_line,
    ),
    # the quarantine digest (smtpgw.digest): optional, loaded only where it is used
    "digest": Schema(
        "digest", True,
        frozenset({"RECIPIENT", "ITEM_COUNT", "DATE", "TIME", "PRODUCT", "HOSTNAME", "CONSOLE_URL"}),
        {
            "ITEMS": frozenset(
                {"ITEM_ID", "ITEM_DATE", "ITEM_TIME", "ITEM_SENDER", "ITEM_SUBJECT", "ITEM_STATUS",
                 "ITEM_RELEASE", "ITEM_LINK"}
            )
        },
        frozenset({"CONSOLE"}), one_line,
    ),
    # the text standing in for a removed object (smtpgw.scan.antivirus): no header lines, no
    # blocks; a value keeps its own spacing (a file name is shown as it is), controls excepted
    "placeholder": Schema(
        "placeholder", False,
        frozenset(
            {
                "OBJECT_NAME", "OBJECT_PATH", "OBJECT_TYPE", "OBJECT_SIZE", "STATUS",
                "VIRUS_NAMES", "ACTION", "REASON", "PRODUCT", "DATE",
            }
        ),
        {}, frozenset(), no_controls,
    ),
}

# --- the compiled template ---------------------------------------------------------------


@dataclass(frozen=True)
class _Macro:
    name: str


@dataclass(frozen=True)
class _Block:
    name: str
    body: tuple["_Node", ...]


_Node = Union[str, _Macro, _Block]
Values = Mapping[str, str]
Lists = Mapping[str, Sequence[Mapping[str, str]]]


@dataclass(frozen=True)
class Template:
    """A checked template, ready to render."""

    path: str
    schema: Schema
    header: tuple[_Node, ...]
    body: tuple[_Node, ...]

    def render(self, values: Values, lists: Lists) -> tuple[list[tuple[str, str]], str]:
        """(header fields, body text with LF line endings) for these values.

        ``lists`` maps each list block to its items and each condition block to ``[{}]``
        (kept) or ``[]`` (dropped); a block missing from ``lists`` is dropped.
        """
        clean = self.schema.value
        return _header_fields(_render(self.header, values, lists, clean)), _render(self.body, values, lists, clean)


def flag(on: bool) -> list[dict[str, str]]:
    """The ``lists`` entry for a condition block."""
    return [{}] if on else []


class _Budget:
    def __init__(self, chars: int) -> None:
        self.left = chars


def _render(nodes: tuple[_Node, ...], values: Values, lists: Lists, clean: Callable[[Any], str]) -> str:
    out: list[str] = []
    _render_into(nodes, values, lists, out, _Budget(MAX_OUTPUT_CHARS), clean)
    return "".join(out)


def _render_into(nodes: tuple[_Node, ...], scope: Values, lists: Lists, out: list[str], budget: _Budget,
                 clean: Callable[[Any], str]) -> None:
    for node in nodes:
        if budget.left <= 0:
            return
        if isinstance(node, _Block):
            for item in list(lists.get(node.name, ()))[:MAX_ITEMS]:
                _render_into(node.body, {**scope, **item} if item else scope, lists, out, budget, clean)
            continue
        piece = node if isinstance(node, str) else clean(scope.get(node.name, ""))
        out.append(piece[: budget.left])
        budget.left -= len(piece)


_HEADER_NAME = re.compile(r"(Subject|X-[A-Za-z0-9-]+)[ \t]*:", re.IGNORECASE)


def _header_fields(text: str) -> list[tuple[str, str]]:
    fields: list[tuple[str, str]] = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        if line[0] in " \t":
            if fields:
                name, value = fields[-1]
                fields[-1] = (name, f"{value} {line.strip()}".strip())
            continue
        match = _HEADER_NAME.match(line)
        if match is None:
            continue
        name = "Subject" if match.group(1).lower() == "subject" else match.group(1)
        fields.append((name, line[match.end() :].strip()))
    return fields


# --- loading and checking ------------------------------------------------------------------

_TOKEN = re.compile(r"%(?:(%)|([A-Z][A-Z0-9_]{0,63})%)?")
_MARKER = re.compile(r"%(?:BEGIN|END)_[A-Z][A-Z0-9_]*%")
_BAD_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CACHE: dict[tuple[str, str], tuple[tuple[int, int], Template]] = {}


def load_template(path: str | os.PathLike[str], kind: str | None = None) -> Template:
    """Load and check a template; ``kind`` (a `SCHEMAS` name) defaults to the file name.

    Raises TemplateError naming the file (and line) for a missing, unreadable, oversized,
    non-UTF-8 template, an unknown macro or block, a stray ``%`` or an unclosed block.
    """
    path = os.fspath(path)
    schema = SCHEMAS.get(kind or os.path.basename(path).split(".")[0])
    if schema is None:
        raise TemplateError(f"{path}: unknown template kind {kind!r} (one of {', '.join(SCHEMAS)})")
    try:
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            key = (os.path.abspath(path), schema.name)
            cached = _CACHE.get(key)
            if cached and cached[0] == (stat.st_mtime_ns, stat.st_size):
                return cached[1]
            data = handle.read(MAX_TEMPLATE_BYTES + 1)
    except OSError as exc:
        raise TemplateError(f"{path}: cannot read template: {exc.strerror or exc}") from None
    if len(data) > MAX_TEMPLATE_BYTES:
        raise TemplateError(f"{path}: template larger than {MAX_TEMPLATE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TemplateError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    template = _compile(text, schema, path)
    if len(_CACHE) > 64:
        _CACHE.clear()
    _CACHE[key] = ((stat.st_mtime_ns, stat.st_size), template)
    return template


# What a group's own TemplatesPath holds: DSNs are the gateway's, from [path] TemplatesPath.
GROUP_KINDS = ("notify", "disclaimer")


# What every [path] TemplatesPath holds; digest.tmpl is optional (smtpgw.digest falls back to the shipped one).
BASE_KINDS = ("notify", "dsn", "disclaimer")


def load_templates(templates_path: str | os.PathLike[str], kinds: Sequence[str] = BASE_KINDS) -> dict[str, Template]:
    """Load ``kinds`` (notify.tmpl, dsn.tmpl and disclaimer.tmpl) from a folder, reporting every problem."""
    loaded: dict[str, Template] = {}
    problems: list[str] = []
    for kind in kinds:
        try:
            loaded[kind] = load_template(os.path.join(templates_path, f"{kind}.tmpl"), kind)
        except TemplateError as exc:
            problems.append(str(exc))
    if problems:
        raise TemplateError("\n".join(problems))
    return loaded


def get_template(source: str | os.PathLike[str] | Template, kind: str) -> Template:
    if isinstance(source, Template):
        if source.schema.name != kind:
            raise TemplateError(f"{source.path}: a {source.schema.name} template, not {kind}")
        return source
    return load_template(source, kind)


def _compile(text: str, schema: Schema, path: str) -> Template:
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    numbered = [(n, line) for n, line in enumerate(lines, 1) if not line.startswith("%#")]
    for number, line in numbered:
        if _BAD_CHARS.search(line):
            raise TemplateError(f"{path}:{number}: control character in template")
    head: list[tuple[int, str]] = []
    if schema.has_headers:
        split = next((i for i, (_, line) in enumerate(numbered) if not line.strip()), len(numbered))
        head, numbered = numbered[:split], numbered[split + 1 :]
        _check_header_lines(head, path)
    return Template(path, schema, _parse(head, schema, path), _parse(numbered, schema, path))


def _check_header_lines(lines: list[tuple[int, str]], path: str) -> None:
    subject = False
    for number, line in lines:
        bare = _MARKER.sub("", line)
        if not bare.strip() or bare[0] in " \t":
            continue
        match = _HEADER_NAME.match(bare)
        if match is None:
            raise TemplateError(
                f"{path}:{number}: header lines may be Subject: or X-...: only "
                "(end the header lines with an empty line)"
            )
        subject = subject or match.group(1).lower() == "subject"
    if not subject:
        first = lines[0][0] if lines else 1
        raise TemplateError(f"{path}:{first}: the template must begin with a Subject: line")


def _parse(lines: list[tuple[int, str]], schema: Schema, path: str) -> tuple[_Node, ...]:
    starts: list[int] = []
    pieces: list[str] = []
    offset = 0
    for _, line in lines:
        starts.append(offset)
        piece = line.strip() if _MARKER.fullmatch(line.strip()) else line + "\n"
        pieces.append(piece)
        offset += len(piece)
    text = "".join(pieces)

    def fail(pos: int, problem: str) -> TemplateError:
        number = lines[max(bisect.bisect_right(starts, pos) - 1, 0)][0] if lines else 0
        return TemplateError(f"{path}:{number}: {problem}")

    stack: list[tuple[str, list[_Node], int]] = [("", [], 0)]
    pos = 0
    for match in _TOKEN.finditer(text):
        if match.start() > pos:
            stack[-1][1].append(text[pos : match.start()])
        pos = match.end()
        if match.group(1):
            stack[-1][1].append("%")
            continue
        name = match.group(2)
        if name is None:
            raise fail(match.start(), "stray '%' (write %% for a literal percent sign)")
        if name.startswith("BEGIN_"):
            _open_block(name[6:], stack, schema, match.start(), fail)
        elif name.startswith("END_"):
            block, body, _ = stack.pop() if len(stack) > 1 else ("", [], 0)
            if block != name[4:]:
                expected = f"%END_{block}%" if block else "no block to close"
                raise fail(match.start(), f"%{name}% does not match ({expected})")
            stack[-1][1].append(_Block(block, tuple(body)))
        else:
            _check_macro(name, stack, schema, match.start(), fail)
            stack[-1][1].append(_Macro(name))
    if pos < len(text):
        stack[-1][1].append(text[pos:])
    if len(stack) > 1:
        raise fail(stack[-1][2], f"%BEGIN_{stack[-1][0]}% is never closed")
    return tuple(stack[0][1])


def _open_block(block: str, stack: list[tuple[str, list[_Node], int]], schema: Schema, pos: int, fail: Any) -> None:
    if block not in schema.lists and block not in schema.conditions:
        raise fail(pos, f"unknown block %BEGIN_{block}% in a {schema.name} template")
    open_names = [name for name, _, _ in stack[1:]]
    if block in open_names:
        raise fail(pos, f"%BEGIN_{block}% inside itself")
    if block in schema.lists and any(name in schema.lists for name in open_names):
        raise fail(pos, f"list block %BEGIN_{block}% inside another list block")
    if len(stack) > MAX_DEPTH:
        raise fail(pos, f"blocks nested deeper than {MAX_DEPTH}")
    stack.append((block, [], pos))


def _check_macro(name: str, stack: list[tuple[str, list[_Node], int]], schema: Schema, pos: int, fail: Any) -> None:
    if name in schema.macros:
        return
    for block, items in schema.lists.items():
        if name in items:
            if any(open_name == block for open_name, _, _ in stack):
                return
            raise fail(pos, f"%{name}% is valid only inside %BEGIN_{block}% ... %END_{block}%")
    raise fail(pos, f"unknown macro %{name}% in a {schema.name} template")
