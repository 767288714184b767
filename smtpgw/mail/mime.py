"""MIME decomposition of a raw message into an object tree, and byte-exact rebuilding.

Owns: splitting a raw RFC 5322 message (bytes) into the objects the anti-virus
stage judges — body parts, attachments, encapsulated messages
(message/rfc822), uuencoded blocks in text bodies and members of zip, tar and
gzip archives — with each object's name, MIME type, decoded content and, for
MIME entities and uuencoded blocks, its byte span in the original message;
and rebuilding the message with objects removed or replaced while every other
byte stays as it was. Bodies are decoded by ``smtpgw.transfer`` and archives
read, within their bounds, by ``smtpgw.archives``; this module makes tree
nodes of what they return.

Must never: raise on malformed input (malformations become ``defects`` and, when
content cannot be obtained, an object with status ``error``), run a
subprocess, write anything to disk, or re-serialise untouched parts through
``email.generator`` (no re-encoding, no header refolding).

Decisions (documented behaviour):
* Transfer encodings are decoded leniently, as ``smtpgw.transfer`` documents;
  archive bounds are per message, as ``smtpgw.archives`` documents. MIME
  nesting has its own bound, ``MAX_MIME_DEPTH``.
* The message's scan budget (``Limits``: ``MaximalMessageObjects`` objects
  made, entities, uuencoded blocks and archive members alike, and
  ``MaximalDecodedSize`` bytes of content they hold) ends the walk where it
  runs out: the object that crosses it is an error with the reason, no
  further object is made, and ``MimeTree.spent`` and a defect say why.
* A leading mbox ``From `` line (RFC 4155) is skipped, not parsed as a header.

Paths name objects the way an IMAP client numbers parts (RFC 3501 §6.4.5),
joined with ``/``; a named object adds ``:name``; objects inside a named object
(archive members, uuencoded files) follow with ``/name``:
``1/2:invoice.zip/readme.exe``.
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email.errors import HeaderParseError
from email.header import decode_header

from smtpgw.mail import fields, headers
from smtpgw.mail.archives import (
    ARCHIVE_ERRORS,
    Budget,
    LimitExceeded,
    Limits,
    Member,
    archive_format,
)
from smtpgw.mail.compose import encode_text
from smtpgw.mail.transfer import (
    IDENTITY_ENCODINGS,
    UU_BEGIN,
    UU_END,
    decode_transfer,
    decode_uu,
    too_large,
)
from smtpgw.rules.policy import ERROR, PROTECTED

__all__ = [
    "ERROR",
    "PROTECTED",
    "Edit",
    "Limits",
    "MimeObject",
    "MimeTree",
    "decompose",
    "rebuild",
]

MAX_MIME_DEPTH = 32  # nested multiparts and messages
MAX_MIME_PARTS = 5000  # MIME entities per message
MAX_HEADER_FIELDS = 500  # fields kept per entity header, besides the first of each MIME field
MAX_UU_BLOCKS = 100  # uuencoded blocks per text part
MAX_NAME = 255
# Characters of an encoded file name decoded (RFC 2047 words): ample for MAX_NAME
# decoded characters, and a bound on email.header.decode_header, whose joining of
# adjacent words is quadratic in their number.
MAX_ENCODED_NAME = 4096

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TYPES = mimetypes.MimeTypes()
_MIME_FIELDS = frozenset({"content-type", "content-transfer-encoding", "content-disposition"})

@dataclass(eq=False)
class MimeObject:
    """One node of the tree: a MIME entity, an archive member or a uuencoded block.

    ``kind``: ``multipart`` and ``message`` are containers; ``part`` is a leaf
    entity (it may hold archive members or uuencoded blocks as children);
    ``member`` is an archive member; ``uuencoded`` a block inside a text part.
    ``start``/``end`` are the node's span in the original message (headers
    included) or None when it has no span of its own; ``cut`` is the range a
    removal deletes (with its boundary delimiter line, RFC 2046 §5.1.1).
    """

    path: str
    kind: str
    content_type: str
    name: str = ""
    # the entity's other declared file name: Content-Type name= when Content-Disposition
    # filename= differs from it (mail readers disagree on which one they show and save)
    other_names: tuple[str, ...] = ()
    data: bytes | None = None
    archive: str = ""  # "zip", "tar" or "gzip" when the content is an archive
    status: str | None = None  # ERROR or PROTECTED when set by decomposition
    reason: str = ""
    start: int | None = None
    end: int | None = None
    body_start: int | None = None
    cut: tuple[int, int] | None = None
    children: list[MimeObject] = field(default_factory=list)
    parent: MimeObject | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else 0

    def walk(self) -> Iterator[MimeObject]:
        """This node and all nodes below it, depth first, in message order."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))

    def edit_target(self) -> MimeObject:
        """The nearest node (this one or an ancestor) that has a span to edit."""
        node: MimeObject = self
        while node.start is None and node.parent is not None:
            node = node.parent
        return node


@dataclass
class MimeTree:
    raw: bytes
    root: MimeObject
    defects: list[str]
    outside: int = 0  # non-blank bytes of multipart preambles and epilogues (RFC 2046 §5.1.1)
    spent: str = ""  # why the message's scan budget ran out (objects not made), or empty

    def walk(self) -> Iterator[MimeObject]:
        return self.root.walk()


@dataclass(frozen=True)
class Edit:
    """Remove ``node`` (``text`` is None) or replace it with a text/plain ``text``."""

    node: MimeObject
    text: str | None = None


# region header fields and parameters


def _split_header(
    buf: bytes, start: int, end: int, defects: list[str], label: str
) -> tuple[dict[str, bytes], int]:
    """Parse an entity's header section: (first value of each MIME field, body offset)."""
    # past the bound only the first of each MIME field is kept: mail readers still read
    # them there, and a bound that hid a Content-Type would hide the parts it declares
    head = fields.split(buf, start, end, MAX_HEADER_FIELDS, _MIME_FIELDS)
    if head.over:
        defects.append(f"{label}: more than {MAX_HEADER_FIELDS} header fields")
    if head.stray:
        # RFC 5322 §2.2: a line that is neither a field nor a continuation
        # ends the header section early.
        defects.append(f"{label}: missing header/body separator")
    elif not head.blank and start < end:
        defects.append(f"{label}: no body (header section runs to the end)")
    values: dict[str, bytes] = {}
    for found in head.fields:
        if found.name not in _MIME_FIELDS:
            continue  # the only fields an entity reads: no other value is unfolded
        if found.name not in values:  # the first occurrence wins, as in clamd
            values[found.name] = found.value(buf)
        else:
            # readers differ on which one counts: worth a second opinion
            defects.append(f"{label}: repeated {found.name} field")
    return values, head.body


def _rfc2047(value: str) -> str:
    """Decode RFC 2047 encoded-words, which many mailers put in filenames.

    Only the first ``MAX_ENCODED_NAME`` characters are decoded (the name is cut
    to ``MAX_NAME`` afterwards anyway).
    """
    value = value[:MAX_ENCODED_NAME]
    if "=?" not in value:
        return value
    try:
        chunks = decode_header(value)
    except (HeaderParseError, ValueError):
        return value
    out: list[str] = []
    for chunk, charset in chunks:
        if isinstance(chunk, str):
            out.append(chunk)
            continue
        out.append(fields.decode_charset(chunk, charset or "us-ascii"))
    return "".join(out)


def _clean_name(name: str) -> str:
    """A displayable object name: no control characters, bounded length."""
    return _CONTROL.sub("?", name.strip())[:MAX_NAME]


def _filenames(found: dict[str, bytes], params: dict[str, str]) -> tuple[str, tuple[str, ...]]:
    """(the object's name, its other declared names).

    The name is Content-Disposition filename= (RFC 2183 §2.3), else Content-Type name=
    (RFC 2046 §4.5.1); when both are given and differ, the latter is kept as another name
    so that the attachment filter sees it too (kmg-spec §3.13).
    """
    by_type = _clean_name(_rfc2047(params.get("name", "")))
    disposition = found.get("content-disposition")
    if disposition is not None:
        _, _, rest = fields.decode_text(disposition).partition(";")
        name = fields.parameters(rest).get("filename")
        if name:
            chosen = _clean_name(_rfc2047(name))
            return chosen, (by_type,) if by_type and by_type != chosen else ()
    return by_type, ()


# endregion


class _Decomposer:
    """One message's walk: counters for the per-message budgets, and the defects."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.defects: list[str] = []
        self.parts = 0
        self.archives = Budget(limits)
        self.outside = 0
        self.objects = 0  # objects made: entities, uuencoded blocks, archive members
        self.held = 0  # bytes of content they hold
        self.spent = ""  # why the message's scan budget ran out, once it has

    # region the message's scan budget

    def _room(self) -> int:
        """Bytes of content the budget still allows."""
        return max(0, self.limits.max_decoded - self.held)

    def _count(self, node: MimeObject, size: int = 0, object_made: bool = True) -> bool:
        """Count ``node`` (and ``size`` bytes it holds); once the budget is spent, False and ``node`` an error.

        The first crossing is recorded as a defect of the message: the objects not made are not
        judged, so the message goes whole to the scanner as well, and its status is error.
        """
        self.objects += object_made
        self.held += size
        if not self.spent:
            if self.objects > self.limits.max_objects:
                self.spent = f"more than MaximalMessageObjects ({self.limits.max_objects}) objects in the message"
            elif self.held > self.limits.max_decoded:
                self.spent = (
                    f"content above MaximalDecodedSize ({self.limits.max_decoded // 1024} KB) for the message"
                )
            else:
                return True
            self.defects.append(f"message: scan budget exceeded: {self.spent}")
        node.status, node.reason, node.data = ERROR, self.spent, b""
        return False

    def _decode(self, node: MimeObject, cte: str, body: bytes) -> tuple[bytes | None, str, str]:
        """``decode_transfer`` within the budget's room; content past it spends the budget."""
        room = self._room()
        data, error, defect = decode_transfer(cte, body, room)
        if data is None and error == too_large(room):
            self._count(node, room + 1, object_made=False)
            return None, self.spent, defect
        return data, error, defect

    # endregion

    # region MIME entities

    def entity(
        self,
        buf: bytes,
        start: int,
        end: int,
        number: str,
        leaf_number: str,
        depth: int,
        default_type: str,
        editable: bool,
    ) -> MimeObject:
        """Parse one MIME entity in ``buf[start:end]``.

        ``number`` is its part number as a multipart (its children are
        ``number/1`` …); ``leaf_number`` its number as a single part (the body
        of a message is part ``N/1``, RFC 3501 §6.4.5).
        """
        self.parts += 1
        label = number or "message"
        found, body_start = _split_header(buf, start, end, self.defects, label)
        declared = fields.content_type(found.get("content-type"), default_type)
        ctype, params, valid = declared
        if not valid:
            self.defects.append(f"{label}: invalid Content-Type, read as text/plain")
        cte = fields.decode_text(found.get("content-transfer-encoding", b"")).strip().lower()
        name, other_names = _filenames(found, params)
        node = MimeObject(
            path=_named(leaf_number, name), kind="part", content_type=ctype, name=name, other_names=other_names
        )
        if editable:
            node.start, node.end, node.body_start = start, end, body_start
        if not self._count(node):
            return node
        if depth > MAX_MIME_DEPTH or self.parts > MAX_MIME_PARTS:
            node.status = ERROR
            node.reason = (
                f"MIME nesting deeper than {MAX_MIME_DEPTH}"
                if depth > MAX_MIME_DEPTH
                else f"more than {MAX_MIME_PARTS} MIME parts"
            )
            return node
        multipart = ctype.startswith("multipart/")
        if multipart or ctype in ("message/rfc822", "message/global"):
            if cte not in IDENTITY_ENCODINGS:
                # RFC 2045 §6.4: composite types must not be encoded; decode anyway
                # and parse the decoded copy, whose nodes have no span of their own.
                self.defects.append(f"{label}: {ctype} with {cte} encoding")
                data, error, _ = self._decode(node, cte, buf[body_start:end])
                if data is None or not self._count(node, len(data), object_made=False):
                    return self._leaf(node, None, error or self.spent, cte)
                buf, body_start, end, editable = data, 0, len(data), False
            if not multipart:
                inner = self.entity(
                    buf, body_start, end, leaf_number, f"{leaf_number}/1", depth + 1, "text/plain", editable
                )
                node.kind = "message"
                inner.parent = node
                node.children.append(inner)
                return node
            boundary = declared.boundary
            if boundary:
                node.path = number
                return self._multipart(node, buf, body_start, end, boundary, depth, editable)
            self.defects.append(f"{label}: multipart without boundary")
        data, error, defect = self._decode(node, cte, buf[body_start:end])
        if defect:
            self.defects.append(f"{label}: {defect}")
        return self._leaf(node, data, error, cte)

    def _leaf(self, node: MimeObject, data: bytes | None, error: str, cte: str) -> MimeObject:
        if data is None or not self._count(node, len(data), object_made=False):
            node.status, node.reason = ERROR, error or self.spent
            node.data = b""
            return node
        node.data = data
        if self.limits.scan_archives:
            self._expand(node, 1)
        if not node.children and node.content_type.startswith("text/"):
            self._uuencoded(node, cte in IDENTITY_ENCODINGS and node.start is not None)
        return node

    def _multipart(
        self,
        node: MimeObject,
        buf: bytes,
        body_start: int,
        end: int,
        boundary: str,
        depth: int,
        editable: bool,
    ) -> MimeObject:
        """Split a multipart body at its delimiter lines (RFC 2046 §5.1.1)."""
        number = node.path
        label = number or "message"
        delimiters = _delimiters(buf, body_start, end, boundary.encode("utf-8", "replace"))
        if not delimiters or delimiters[0].close:
            self.defects.append(f"{label}: boundary {boundary!r} not found")
            node.path = _named(number or "1", node.name)
            return self._leaf(node, buf[body_start:end], "", "")
        node.kind = "multipart"
        self.outside += len(buf[body_start : delimiters[0].break_start].strip())
        if delimiters[-1].close:
            self.outside += len(buf[delimiters[-1].content_start : end].strip())
        else:
            self.defects.append(f"{label}: missing close-delimiter")
        digest = node.content_type == "multipart/digest"
        for index, delim in enumerate(delimiters):
            if delim.close:
                break
            follower = delimiters[index + 1] if index + 1 < len(delimiters) else None
            part_end = max(follower.break_start if follower else end, delim.content_start)
            child_number = f"{number}/{index + 1}" if number else str(index + 1)
            child = self.entity(
                buf,
                delim.content_start,
                part_end,
                child_number,
                child_number,
                depth + 1,
                "message/rfc822" if digest else "text/plain",  # RFC 2046 §5.1.5
                editable,
            )
            if editable:
                # the line break before a delimiter belongs to it (RFC 2046 §5.1.1)
                child.cut = (delim.break_start, part_end)
            child.parent = node
            node.children.append(child)
            if self.spent:  # the parts not made are not judged: the multipart is not whole
                node.status, node.reason = ERROR, self.spent
                break
            if self.parts > MAX_MIME_PARTS:
                node.status, node.reason = ERROR, f"more than {MAX_MIME_PARTS} MIME parts"
                break
        return node

    # endregion
    # region uuencoded blocks

    def _uuencoded(self, node: MimeObject, spans: bool) -> None:
        """Find ``begin NNN name`` … ``end`` blocks in a text body."""
        data = node.data or b""
        if b"begin " not in data:
            return
        pos = 0
        for _ in range(MAX_UU_BLOCKS):
            if self.spent:
                return
            begin = UU_BEGIN.search(data, pos)
            if not begin:
                return
            line_start = begin.end() + 1
            finish = UU_END.search(data, line_start)
            block_end = len(data) if finish is None else min(len(data), finish.end() + 1)
            room = self._room()
            content, problem = decode_uu(data, line_start, finish.start() if finish else len(data), room)
            name = _clean_name(fields.decode_text(begin.group(2))) or "uuencoded"
            child = MimeObject(
                path=_member_path(node, name),
                kind="uuencoded",
                content_type=_guess_type(name),
                name=name,
                data=content if content is not None else b"",
                parent=node,
            )
            if finish is None:
                child.status, child.reason = ERROR, "uuencoded block without end line (truncated)"
            elif content is None:
                child.status, child.reason = ERROR, problem
            if spans and node.body_start is not None:
                child.start = node.body_start + begin.start()
                child.end = node.body_start + block_end
                child.cut = (child.start, child.end)
            node.children.append(child)
            pos = block_end
            if not self._count(child, room + 1 if problem == too_large(room) else child.size):
                return
            if child.status is None and self.limits.scan_archives:
                self._expand(child, 1)

    # endregion
    # region archives

    def _expand(self, node: MimeObject, depth: int) -> None:
        """Open ``node.data`` as an archive, adding its members as children."""
        fmt = archive_format(node.data or b"")
        if not fmt:
            return
        node.archive = fmt
        try:
            for member in self.archives.members_of(fmt, node.data or b"", node.name, depth):
                self._member(node, member, depth)
                if self.spent:
                    return
        except LimitExceeded as exc:
            node.status, node.reason = ERROR, str(exc)
        except ARCHIVE_ERRORS as exc:
            node.status, node.reason = ERROR, f"corrupt {fmt} archive: {exc}"

    def _member(self, parent: MimeObject, member: Member, depth: int) -> None:
        """Add one archive member as a child of ``parent`` and open it in turn."""
        name = _clean_name(member.name) or "unnamed"
        child = MimeObject(
            path=_member_path(parent, name),
            kind="member",
            content_type=_guess_type(name),
            name=name,
            data=member.data,
            status=member.status,
            reason=member.reason,
            parent=parent,
        )
        parent.children.append(child)
        if not self._count(child, child.size):
            return
        if member.corrupt and parent.status is None:
            parent.status, parent.reason = ERROR, f"corrupt member {name}: {member.corrupt}"
        if member.status is None:
            self._expand(child, depth + 1)

    # endregion


@dataclass(frozen=True)
class _Delimiter:
    line_start: int  # the "--" of the delimiter line
    break_start: int  # the line break before it (RFC 2046: part of the delimiter)
    content_start: int  # first byte after the delimiter line
    close: bool


def _delimiters(buf: bytes, start: int, end: int, boundary: bytes) -> list[_Delimiter]:
    """Delimiter lines of one multipart body, up to and including the close-delimiter."""
    marker = b"--" + boundary
    out: list[_Delimiter] = []
    pos = start
    while True:
        found = buf.find(marker, pos, end)
        if found < 0:
            return out
        pos = found + len(marker)
        if found != start and buf[found - 1] != 0x0A:  # must begin a line
            continue
        nl = buf.find(b"\n", pos, end)
        line_end = end if nl < 0 else nl
        rest = buf[pos:line_end]
        close = rest.startswith(b"--")
        if close:
            rest = rest[2:]
        if rest.strip(b" \t\r"):  # only transport padding may follow (RFC 2046 §5.1.1)
            continue
        break_start = found
        if found > start:
            break_start = found - 2 if found - 2 >= start and buf[found - 2] == 0x0D else found - 1
        out.append(_Delimiter(found, break_start, end if nl < 0 else nl + 1, close))
        if close:
            return out
        pos = line_end


def _guess_type(name: str) -> str:
    return _TYPES.guess_type(name, strict=False)[0] or "application/octet-stream"


def _named(number: str, name: str) -> str:
    return f"{number}:{name}" if name else number


def _member_path(parent: MimeObject, name: str) -> str:
    return f"{parent.path}{'/' if ':' in parent.path else ':'}{name}"


def decompose(raw: bytes, limits: Limits | None = None) -> MimeTree:
    """Split ``raw`` into its object tree. Never raises on malformed input."""
    walker = _Decomposer(limits or Limits())
    start = fields.message_start(raw)  # past an mbox separator line (RFC 4155), not a header
    root = walker.entity(raw, start, len(raw), "", "1", 0, "text/plain", True)
    return MimeTree(raw=raw, root=root, defects=walker.defects, outside=walker.outside, spent=walker.spent)


# region rebuilding


def _placeholder_entity(raw: bytes, node: MimeObject, text: str) -> bytes:
    """A text/plain entity standing in for ``node``: its other header fields kept."""
    assert node.start is not None and node.body_start is not None
    head = raw[node.start : node.body_start]
    eol = headers.line_ending(raw[node.start : node.end] if head.strip() else raw)
    if not head.endswith(b"\n"):
        head += eol  # the entity ended inside its header section
    if not head.strip(b"\r\n"):
        head = eol  # no header fields: the entity starts with its blank line
    elif not re.search(rb"\n\r?\n\Z", head):
        head += eol  # RFC 5322 §2.1: the blank line before the body
    charset, cte, body = _encode_text(text, eol)
    blank = b"\r\n" if head.endswith(b"\r\n") else b"\n"
    for name, value in (
        ("Content-Type", f'text/plain; charset="{charset}"'),
        ("Content-Transfer-Encoding", cte),
        ("Content-Disposition", "inline"),
    ):
        if headers.get_raw(head, name) is not None:
            head = headers.replace(head, name, value)
        else:  # a new field goes last, before the blank line
            head = head[: len(head) - len(blank)] + headers.render(name, value, eol) + blank
    return head + body


def _encode_text(text: str, eol: bytes) -> tuple[str, str, bytes]:
    """(charset, transfer encoding, body) of a 7-bit text part in the message's line ending."""
    charset, cte, body = encode_text(text)
    return charset, cte, body if eol == b"\r\n" else body.replace(b"\r\n", eol)


def _removal_target(node: MimeObject) -> MimeObject:
    """The entity to cut out: climb from a single-part encapsulated body to its message part."""
    target = node.edit_target()
    while target.cut is None and target.parent is not None and target.parent.kind == "message":
        target = target.parent
    return target


def _keep_one_part(merged: dict[int, tuple[MimeObject, list[str], bool]]) -> None:
    """A multipart whose every part is removed keeps its first one as an empty text part.

    RFC 2046 §5.1.1: a multipart body has at least one body part; a bare close-delimiter
    is not valid MIME (readers report a missing start boundary).
    """
    removed = [target for target, _, remove in merged.values() if remove and target.cut is not None]
    parents = {id(t.parent): t.parent for t in removed if t.parent is not None and t.parent.kind == "multipart"}
    gone = {id(t) for t in removed}
    for parent in parents.values():
        if parent.children and all(id(child) in gone for child in parent.children):
            first = parent.children[0]
            merged[id(first)] = (first, [""], False)


def rebuild(raw: bytes, edits: Iterable[Edit]) -> bytes:
    """Apply removals and replacements; bytes outside the edited spans are kept as they are.

    Objects without a span (archive members, nodes of an encoded encapsulated
    message) are edited through the nearest ancestor that has one. Removing
    an entity that is not a multipart child (a single-part message body), or
    every part of a multipart, replaces it (the first part) with an empty
    text part. Several edits of one entity merge:
    removal wins, placeholder texts are joined; an edit inside an entity that
    is itself edited is dropped.
    """
    merged: dict[int, tuple[MimeObject, list[str], bool]] = {}
    for edit in edits:
        target = _removal_target(edit.node) if edit.text is None else edit.node.edit_target()
        if target.start is None:
            continue  # no span anywhere up the tree: nothing can be edited
        entry = merged.setdefault(id(target), (target, [], False))
        if edit.text is None and target.cut is not None:
            merged[id(target)] = (target, entry[1], True)
        elif edit.text is not None:
            entry[1].append(edit.text)
    _keep_one_part(merged)
    spans: list[tuple[int, int, bytes]] = []
    for target, texts, remove in merged.values():
        if remove and target.cut is not None:
            spans.append((target.cut[0], target.cut[1], b""))
            continue
        text = "\n\n".join(texts)
        if target.kind == "uuencoded":
            _, _, body = _encode_text(text, headers.line_ending(raw))
            spans.append((target.start or 0, target.end or 0, body + headers.line_ending(raw)))
        else:
            spans.append((target.start or 0, target.end or 0, _placeholder_entity(raw, target, text)))
    spans.sort(key=lambda s: (s[0], -s[1]))
    out = bytearray()
    pos = 0
    for start, end, replacement in spans:
        if start < pos:
            continue  # inside an entity already edited
        out += raw[pos:start]
        out += replacement
        pos = end
    out += raw[pos:]
    return bytes(out)


# endregion
